"""``accessflow outbox`` and ``accessflow relay``: messages committed but not yet published."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta

import click

from infra.bootstrap import build
from infra.cli.common import (
    echo_json,
    load_settings,
    open_services,
    print_table,
)
from infra.messaging.relay import run_relay


@click.group()
def outbox() -> None:
    """Messages committed but not yet published: pending, and parked after the broker kept refusing them."""


@outbox.command("list")
@click.option("--parked", is_flag=True, help="Only rows the relay gave up on, waiting for an operator.")
@click.option("--limit", default=100, show_default=True, help="At most this many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_list(parked: bool, limit: int, as_json: bool) -> None:
    """List unsent outbox rows with their tries and why the last one failed."""
    with open_services() as services:
        rows = services.relay.unsent(parked_only=parked, limit=limit)
    if as_json:
        echo_json(rows)
        return
    print_table(
        ["id", "status", "destination", "created", "attempts", "last error"],
        [
            (r["id"], r["status"], r["destination"], r["created_at"], r["attempts"], r["last_error"])
            for r in rows
        ],
        empty="no parked rows" if parked else "no unsent rows",
    )


@outbox.command("retry")
@click.argument("row_ids", nargs=-1)
@click.option("--all-parked", is_flag=True, help="Put back every parked row.")
def outbox_retry(row_ids: tuple[str, ...], all_parked: bool) -> None:
    """Put parked rows back for the relay's next sweep, with fresh attempts: fix the cause first."""
    if bool(row_ids) == all_parked:
        raise click.UsageError("give row ids, or --all-parked")
    with open_services() as services:
        put_back = services.relay.unpark(None if all_parked else list(row_ids))
    for row_id in put_back:
        click.echo(f"{row_id}: back in the outbox")
    missing = sorted(set(row_ids) - set(put_back))
    if missing:
        raise click.ClickException(f"not parked (or already sent): {', '.join(missing)}")
    if not put_back:
        click.echo("no parked rows")


@click.command()
def relay() -> None:
    """Publish outbox rows no worker published (a crash, pools scaled to zero), and prune sent ones.

    Sweeps every ACCESSFLOW_OUTBOX_SWEEP_SECONDS and prunes rows sent more than
    ACCESSFLOW_OUTBOX_RETAIN_HOURS ago. Safe to run several; the worker pools sweep too.
    SIGTERM or SIGINT stops it once its sweep in progress ends.
    """
    settings = load_settings()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    services = build(settings)
    try:
        run_relay(
            services.relay,
            sweep_seconds=settings.outbox_sweep_seconds,
            prune_seconds=settings.outbox_prune_seconds,
            retain=timedelta(hours=settings.outbox_retain_hours),
            stop=stop,
        )
    finally:
        services.close()
