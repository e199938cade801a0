"""What every command group shares: settings, services, JSON output and validation errors."""

from __future__ import annotations

import functools
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table

from domain.errors import AccessflowError
from infra.bootstrap import Services, build
from infra.cli import producer
from infra.credentials import signing
from infra.db import catalogue_file
from infra.messaging.topology import Topology
from infra.settings import Settings
from messages.routes import QUEUES
from messages.validation import explain

QUEUE_CHOICES = list(QUEUES)
#: How wide a table may be when the output is not a terminal: wide enough never to wrap a
#: cell, so that what a script greps for stays on one line.
PIPED_WIDTH = 10_000


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise click.ClickException(f"invalid ACCESSFLOW_* settings:\n{error}") from None


@contextmanager
def open_services(*, readonly: bool = False) -> Iterator[Services]:
    """The services, built from the settings; ``readonly`` ones on ACCESSFLOW_READONLY_DATABASE_URL when set."""
    settings = load_settings()
    if readonly:
        settings = settings.model_copy(update={"database_url": settings.readonly_url()})
    services = build(settings)
    try:
        yield services
    except AccessflowError as error:
        raise click.ClickException(str(error)) from None
    finally:
        services.close()


@contextmanager
def publishing() -> Iterator[tuple[producer.AmqpWire, Settings]]:
    """A wire to accessflow's exchanges, as ``ACCESSFLOW_BROKER_URL``'s user; failures as one-line errors."""
    settings = load_settings()
    try:
        yield producer.AmqpWire(settings.broker_url, Topology(settings.queue_prefix)), settings
    except producer.InvalidMessage as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # the broker is unreachable or refused the message
        raise click.ClickException(f"could not publish: {type(error).__name__}: {error}") from None


@dataclass(frozen=True)
class AdminSigner:
    """Who signs what a command publishes as an admin: the admin, and the key registered for them.

    The key is read when the command signs, after it has checked its own arguments, so that a
    usage error is told as such whatever the key options say.
    """

    admin_id: str
    key_file: Path | None
    key_id: str | None

    def key(self) -> tuple[str, Ed25519PrivateKey]:
        """The key's registered id and the private key itself."""
        if self.key_file is None or not self.key_id:
            raise click.UsageError("it is signed: give --key-file and --key-id (or their variables)")
        try:
            return self.key_id, signing.load_private_key(self.key_file)
        except (ValueError, AccessflowError) as error:
            raise click.ClickException(str(error)) from None


def signed_by_admin(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the admin's id and signing key (``--admin``, ``--key-file``, ``--key-id``), as ``admin``.

    Decisions and credential operations are authenticated alike: signed by a key registered
    for the admin they name (``accessflow admins keys add``).
    """

    @click.option("--admin", "admin_id", required=True, help="The admin's id (accessflow admins list).")
    @click.option(
        "--key-file",
        envvar="ACCESSFLOW_ADMIN_KEY_FILE",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="The admin's Ed25519 private key (accessflow keys admin-generate); env ACCESSFLOW_ADMIN_KEY_FILE.",
    )
    @click.option(
        "--key-id",
        envvar="ACCESSFLOW_ADMIN_KEY_ID",
        help="The id the key's public half is registered under; env ACCESSFLOW_ADMIN_KEY_ID.",
    )
    @functools.wraps(command)
    def with_signer(
        *args: Any, admin_id: str, key_file: Path | None, key_id: str | None, **kwargs: Any
    ) -> None:
        command(*args, admin=AdminSigner(admin_id, key_file, key_id), **kwargs)

    return with_signer


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=False))


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that prints text as given: no markup, emoji or highlighting.

    As wide as the terminal; when piped, wide enough that no cell wraps.
    """
    stream = sys.stderr if stderr else sys.stdout
    return Console(
        file=stream,
        markup=False,
        emoji=False,
        highlight=False,
        width=None if stream.isatty() else PIPED_WIDTH,
    )


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], *, empty: str, title: str | None = None
) -> None:
    """Print ``rows`` as a table under ``columns`` (None as blank, numbers to the right), or ``empty``."""
    values = [list(row) for row in rows]
    if not values:
        click.echo(empty)
        return
    numeric = [
        all(isinstance(row[i], int) and not isinstance(row[i], bool) for row in values if row[i] is not None)
        for i in range(len(columns))
    ]
    cells = [["" if value is None else str(value) for value in row] for row in values]
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", show_edge=False, pad_edge=False)
    for name, right in zip(columns, numeric, strict=True):
        table.add_column(name, justify="right" if right else "left", overflow="fold")
    for row in cells:
        table.add_row(*row)
    console().print(table)


def validated_entry(entry: type[catalogue_file.Entry], values: dict[str, Any]) -> Any:
    try:
        return entry.model_validate(values)
    except ValidationError as error:
        raise click.ClickException(explain(error)) from None


def operator_name() -> str:
    """Who runs this command, for the audit trail: the login of the machine's user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        return f"uid:{os.getuid()}"
