"""``accessflow submit`` and ``accessflow decide``: publishing as a portal and as an admin tool do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from domain.errors import AccessflowError
from infra.cli import producer
from infra.cli.common import (
    echo_json,
    load_settings,
)
from infra.credentials import signing
from infra.messaging.topology import Topology
from infra.settings import Settings


@contextmanager
def _wire() -> Iterator[tuple[producer.AmqpWire, Settings]]:
    settings = load_settings()
    try:
        yield producer.AmqpWire(settings.broker_url, Topology(settings.queue_prefix)), settings
    except producer.InvalidMessage as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # the broker is unreachable or refused the message
        raise click.ClickException(f"could not publish: {type(error).__name__}: {error}") from None


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--portal", "portal_id", default=None, help="The sending portal's id, if FILE has no portal_id."
)
@click.option("--json", "as_json", is_flag=True, help="Print the published message as JSON.")
def submit(file: Path, portal_id: str | None, as_json: bool) -> None:
    """Publish the access request in FILE as a portal does, and print its id.

    FILE holds an access_request.submitted message (messages/schemas); it is sent as
    contract v2, with request_id and submitted_at filled in when missing. Publish as
    the portal's own AMQP user: ACCESSFLOW_BROKER_URL names it.
    """
    with _wire() as (wire, _):
        message = producer.submit(wire, producer.read_request_file(file), portal_id=portal_id)
    if as_json:
        echo_json(message.model_dump(mode="json"))
    else:
        click.echo(message.request_id)


@click.command()
@click.argument("request_id")
@click.argument("decision", type=click.Choice(["approve", "reject"]))
@click.option("--reason", default=None, help="Why; required to reject, and sent to the consumer.")
@click.option("--admin", "admin_id", required=True, help="The deciding admin's id (accessflow admins list).")
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
@click.option("--json", "as_json", is_flag=True, help="Print the published decision as JSON.")
def decide(
    request_id: str,
    decision: str,
    reason: str | None,
    admin_id: str,
    key_file: Path | None,
    key_id: str | None,
    as_json: bool,
) -> None:
    """Sign an admin's decision on a pending request with the admin's key, and publish it."""
    if decision == "reject" and not reason:
        raise click.UsageError("a rejection needs --reason: the consumer reads it")
    if key_file is None or not key_id:
        raise click.UsageError("a decision is signed: give --key-file and --key-id (or their variables)")
    try:
        private_key = signing.load_private_key(key_file)
    except (ValueError, AccessflowError) as error:
        raise click.ClickException(str(error)) from None
    with _wire() as (wire, settings):
        message = producer.decide(
            wire,
            producer.signed_decision(
                request_id=request_id,
                approve=decision == "approve",
                admin_id=admin_id,
                reason=reason or "approved",
                audience=settings.queue_prefix,
                key_id=key_id,
                private_key=private_key,
            ),
        )
    if as_json:
        echo_json(message.model_dump(mode="json"))
    else:
        click.echo(f"decision {message.decision_id} published: {decision} {request_id}")
