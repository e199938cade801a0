"""``accessflow requests``: listing, showing and retrying access requests."""

from __future__ import annotations

import click

from domain import handlers
from domain.commands import RetryProvisioning
from domain.model import Status
from infra.cli.common import (
    echo_json,
    open_services,
    operator_name,
    print_table,
)
from infra.db import views


@click.group()
def requests() -> None:
    """Inspect access requests."""


@requests.command("list")
@click.option(
    "--status", type=click.Choice([s.value for s in Status]), default=None, help="Only this status."
)
@click.option("--limit", default=100, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def requests_list(status: str | None, limit: int, as_json: bool) -> None:
    """List requests, newest first."""
    with open_services(readonly=True) as services, services.uow() as uow:
        rows = [
            views.request_summary(r)
            for r in uow.requests.list(status=Status(status) if status else None, limit=limit)
        ]
    if as_json:
        echo_json(rows)
        return
    print_table(
        ["id", "status", "app", "plan", "products", "updated", "reason"],
        [
            (
                r["id"],
                r["status"],
                r["app_id"],
                r["plan_id"],
                ",".join(r["product_ids"]),
                r["updated_at"],
                r["reason"],
            )
            for r in rows
        ],
        empty="no requests",
    )


@requests.command("show")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def requests_show(request_id: str, as_json: bool) -> None:
    """Show one request with its audit trail."""
    with open_services(readonly=True) as services:
        details = views.request_details(services.uow(), request_id)
    if details is None:
        raise click.ClickException(f"no request {request_id}")
    if as_json:
        echo_json(details)
        return
    kind = (
        f" (plan change of credential {details['credential_id']})" if details["kind"] == "plan_change" else ""
    )
    click.echo(f"request {details['id']}{kind}: {details['status']}  {details['reason']}")
    click.echo(
        f"  consumer {details['consumer_id']}, app {details['app_id']}, plan {details['plan_id']}, "
        f"products {', '.join(details['product_ids'])}"
    )
    if details["review_deadline_at"]:
        sent = ", ".join(details["review_notices"]) or "none yet"
        click.echo(f"  review deadline {details['review_deadline_at']} (reminders sent: {sent})")
    if details["routed_by"]:
        click.echo(f"  routed by: {details['routed_by']}")
    print_table(
        ["at", "from", "to", "actor", "reason"],
        [(e["at"], e["from"] or "-", e["to"], e["actor"], e["reason"]) for e in details["audit"]],
        empty="  no audit trail",
        title="audit trail",
    )
    for d in details["decisions"]:
        click.echo(
            f"  decision {d['decision']} by {d['admin']}: {d['outcome']} {d['outcome_reason']}".rstrip()
        )
    for n in details["notifications"]:
        click.echo(f"  email {n['kind']}: {n['status']} after {n['attempts']} attempt(s)")
    if details["credential"]:
        c = details["credential"]
        click.echo(f"  credential {c['id']} {c['kind']} {c['public_id']}: {c['status']}, plan {c['plan_id']}")


@requests.command("retry")
@click.argument("request_id")
@click.option(
    "--reason",
    default="provisioning retried",
    show_default=True,
    help="Why, for the audit trail: what was fixed.",
)
def requests_retry(request_id: str, reason: str) -> None:
    """Approve again a request whose provisioning failed, so that its credential is issued anew.

    Fix the cause first (restore the plan, unblock the issuer): the request goes back to
    approved, its portal is told, and the credentials worker issues the credential.
    """
    command = RetryProvisioning(request_id=request_id, operator=operator_name(), reason=reason)
    with open_services() as services:
        status = handlers.retry_provisioning(command, uow=services.uow())
    click.echo(f"request {request_id}: {status.value}, its credential will be issued")
