"""``accessflow submit`` and ``accessflow decide``: publishing as a portal and as an admin tool do."""

from __future__ import annotations

from pathlib import Path

import click

from infra.cli import producer
from infra.cli.common import AdminSigner, echo_json, publishing, signed_by_admin


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
    with publishing() as (wire, _):
        message = producer.submit(wire, producer.read_request_file(file), portal_id=portal_id)
    if as_json:
        echo_json(message.model_dump(mode="json"))
    else:
        click.echo(message.request_id)


@click.command()
@click.argument("request_id")
@click.argument("decision", type=click.Choice(["approve", "reject"]))
@click.option("--reason", default=None, help="Why; required to reject, and sent to the consumer.")
@signed_by_admin
@click.option("--json", "as_json", is_flag=True, help="Print the published decision as JSON.")
def decide(
    request_id: str,
    decision: str,
    reason: str | None,
    admin: AdminSigner,
    as_json: bool,
) -> None:
    """Sign an admin's decision on a pending request with the admin's key, and publish it."""
    if decision == "reject" and not reason:
        raise click.UsageError("a rejection needs --reason: the consumer reads it")
    key_id, private_key = admin.key()
    with publishing() as (wire, settings):
        message = producer.decide(
            wire,
            producer.signed_decision(
                request_id=request_id,
                approve=decision == "approve",
                admin_id=admin.admin_id,
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
