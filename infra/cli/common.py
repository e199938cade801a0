"""What every command group shares: settings, services, JSON output and validation errors."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table

from domain.errors import AccessflowError
from infra.bootstrap import Services, build
from infra.db import catalogue_file
from infra.settings import Settings
from messages.routes import ROUTES
from messages.validation import explain

QUEUE_CHOICES = [route.queue for route in ROUTES]
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
