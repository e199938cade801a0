"""``accessflow notifications``: the emails owed, sent, partly sent and failed."""

from __future__ import annotations

import click

from domain.model import DeliveryStatus
from infra.cli.common import (
    echo_json,
    open_services,
    print_table,
)


@click.group()
def notifications() -> None:
    """Emails owed, sent, partly sent and failed."""


@notifications.command("list")
@click.option(
    "--status", type=click.Choice([s.value for s in DeliveryStatus]), default=None, help="Only this status."
)
@click.option("--limit", default=100, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def notifications_list(status: str | None, limit: int, as_json: bool) -> None:
    """List emails; `--status failed` shows those refused for good or given up on, `--status partial`
    those the SMTP server took for some recipients and refused for others."""
    with open_services() as services, services.uow() as uow:
        rows = [
            {
                "request_id": n.request_id,
                "kind": n.kind.value,
                "status": n.status.value,
                "attempts": n.attempts,
                "last_error": n.last_error,
                "message_id": n.message_id,
                "created_at": n.created_at.isoformat(),
            }
            for n in uow.notifications.recent(status=DeliveryStatus(status) if status else None, limit=limit)
        ]
    if as_json:
        echo_json(rows)
        return
    print_table(
        ["request", "kind", "status", "attempts", "created", "last error"],
        [
            (r["request_id"], r["kind"], r["status"], r["attempts"], r["created_at"], r["last_error"])
            for r in rows
        ],
        empty="no emails",
    )
