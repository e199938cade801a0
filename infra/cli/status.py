"""``accessflow status``: queue depths, backlogs and stuck states, and whether a human is needed."""

from __future__ import annotations

import sys
from typing import Any

import click

from infra.cli.common import (
    echo_json,
    open_services,
    print_table,
)
from infra.observability import status as read_model

#: The exit status when something needs a human (as a monitoring check's CRITICAL).
NEEDS_A_HUMAN = 2


def _age(seconds: float | None) -> str:
    return "" if seconds is None else read_model.duration(seconds)


def _database_rows(shown: dict[str, Any]) -> list[tuple[str, int, str]]:
    r, o, e = shown["requests"], shown["outbox"], shown["emails"]
    return [
        ("requests pending review", r["pending_review"], _age(r["oldest_pending_review_seconds"])),
        ("requests approved, awaiting their credential", r["approved"], _age(r["oldest_approved_seconds"])),
        ("requests in provisioning_failed", r["provisioning_failed"], ""),
        ("requests pending past their review deadline", r["past_review_deadline"], ""),
        ("outbox rows unsent", o["unsent"], _age(o["oldest_unsent_seconds"])),
        ("outbox rows parked", o["parked"], ""),
        ("emails sending", e["sending"], ""),
        ("emails stuck in sending", e["stuck_sending"], ""),
        ("emails failed", e["failed"], ""),
        ("emails partial", e["partial"], ""),
    ]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(0),
    default=None,
    help="First wait up to this many seconds for a consumer on every work queue (after starting pools).",
)
def status(as_json: bool, wait_seconds: float | None) -> None:
    """Queue depths and consumers, the review and outbox backlogs, dead letters, stuck requests and emails.

    Exits 2, saying why, when something needs a human: a dead letter, a parked or overdue
    outbox row, a request waiting for review or for its credential too long (thresholds:
    ACCESSFLOW_STATUS_*), one in provisioning_failed, an email stuck in sending, a queue
    with messages and no consumer, a broker or database that cannot be read. Exits 0 otherwise.
    """
    with open_services(readonly=True) as services:
        still_missing = (
            read_model.wait_for_consumers(services.settings, wait_seconds) if wait_seconds is not None else []
        )
        shown = read_model.report(services.settings, services.uow)
    if still_missing:
        shown["needs_a_human"].insert(
            0, f"no consumer after {wait_seconds:g}s on {', '.join(still_missing)}: are the pools running?"
        )
        shown["ok"] = False
    if as_json:
        echo_json(shown)
    else:
        print_table(
            ["queue", "messages", "consumers", "note"],
            [(q["name"], q["messages"], q["consumers"], q["note"]) for q in shown["queues"]],
            empty="no queues",
        )
        click.echo()
        if shown["requests"] is not None:
            print_table(["in the database", "count", "oldest"], _database_rows(shown), empty="")
            click.echo()
        if shown["needs_a_human"]:
            click.echo("needs a human:")
            for problem in shown["needs_a_human"]:
                click.echo(f"  - {problem}")
        else:
            click.echo("all clear: nothing needs a human")
    if not shown["ok"]:
        sys.exit(NEEDS_A_HUMAN)
