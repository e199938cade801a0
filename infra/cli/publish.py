"""``accessflow submit``, ``decide`` and ``decide-bulk``: publishing as a portal and as an admin tool do."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from infra.cli import producer
from infra.cli.common import AdminSigner, echo_json, open_services, print_table, publishing, signed_by_admin
from infra.db import views

#: Seconds between two looks for a bulk decision's recorded results.
POLL_SECONDS = 0.5


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


@click.command("decide-bulk")
@click.argument("decision", type=click.Choice(["approve", "reject"]))
@click.option("--reason", required=True, help="Why; sent to each consumer.")
@click.option("--ids", default=None, help="The requests: comma-separated ids (at most 200).")
@click.option("--plan", "plan_id", default=None, help="Filter: pending requests for this plan.")
@click.option("--consumer", "consumer_id", default=None, help="Filter: pending requests of this consumer.")
@click.option(
    "--older-than",
    "older_than",
    type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
    default=None,
    help="Filter: pending requests received before this ISO time (UTC unless it says).",
)
@signed_by_admin
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=None,
    help="Wait up to SECONDS for the results and print one line per request (reads the database).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def decide_bulk(
    decision: str,
    reason: str,
    ids: str | None,
    plan_id: str | None,
    consumer_id: str | None,
    older_than: datetime | None,
    admin: AdminSigner,
    wait: float | None,
    as_json: bool,
) -> None:
    """Sign one decision on many pending requests, by --ids or a filter, and publish it.

    Each request is decided on its own and audited as a decision of its own; with --wait,
    the results per request (applied, counted, already_decided, ignored, not_found, refused).
    """
    filtered = (plan_id, consumer_id, older_than) != (None, None, None)
    if (ids is not None) == filtered:
        raise click.UsageError("give --ids, or a filter: --plan, --consumer, --older-than")
    if older_than is not None and older_than.tzinfo is None:
        older_than = older_than.replace(tzinfo=UTC)
    key_id, private_key = admin.key()
    with publishing() as (wire, settings):
        message = producer.decide_bulk(
            wire,
            producer.signed_bulk_decision(
                approve=decision == "approve",
                admin_id=admin.admin_id,
                reason=reason,
                audience=settings.queue_prefix,
                key_id=key_id,
                private_key=private_key,
                request_ids=ids.split(",") if ids is not None else None,
                plan_id=plan_id,
                consumer_id=consumer_id,
                submitted_before=older_than,
            ),
        )
    if wait is None:
        if as_json:
            echo_json(message.model_dump(mode="json", exclude_none=True))
        else:
            click.echo(f"bulk decision {message.bulk_id} published: {decision}")
        return
    results = _wait_for_results(message.bulk_id, wait)
    if results is None:
        raise click.ClickException(f"bulk decision {message.bulk_id}: no results after {wait:g}s")
    if as_json:
        echo_json(results)
        return
    title = f"bulk decision {results['bulk_id']}: {results['decision']} ({results['outcome']})"
    if results["outcome_reason"]:
        title += f": {results['outcome_reason']}"
    rows = [(item["request_id"], item["result"], item["status"]) for item in results["items"]]
    print_table(("request", "result", "status now"), rows, empty=f"{title}: no request selected", title=title)


def _wait_for_results(bulk_id: str, seconds: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    with open_services(readonly=True) as services:
        while True:
            results = views.bulk_results(services.uow(), bulk_id)
            if results is not None or time.monotonic() >= deadline:
                return results
            time.sleep(POLL_SECONDS)
