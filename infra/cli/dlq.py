"""``accessflow dlq``: dead-lettered messages, why each died, and replaying them."""

from __future__ import annotations

import dataclasses
import functools

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from infra.cli.common import (
    QUEUE_CHOICES,
    console,
    echo_json,
    load_settings,
    open_services,
    print_table,
)
from infra.messaging import dead_letters
from infra.settings import Settings
from messages.routes import ROUTES


@click.group()
def dlq() -> None:
    """Dead-letter queues: what failed for good, why, and replaying it."""


def _xq_names(settings: Settings, queue: str | None) -> list[str]:
    return [f"{r.queue_name(settings.queue_prefix)}.XQ" for r in ROUTES if queue in (None, r.queue)]


@dlq.command("list")
@click.option("--queue", "-Q", type=click.Choice(QUEUE_CHOICES), default=None, help="Only this queue's DLQ.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_list(queue: str | None, as_json: bool) -> None:
    """Show every dead-lettered message with its reason; each stays in its queue, in order, uncounted."""
    with open_services() as services:
        settings = services.settings
        letters = [
            letter
            for xq in _xq_names(settings, queue)
            for letter in dead_letters.peek(
                settings.broker_url,
                services.session_factory,
                xq,
                # Whose headers to believe, and how the consumer read a refusal: as for a replay.
                internal_senders=settings.internal_users(),
                external_queues=[r.queue_name(settings.queue_prefix) for r in ROUTES if r.external],
            )
        ]
    if as_json:
        echo_json([dataclasses.asdict(letter) for letter in letters])
        return
    ttl = load_settings().dead_letter_ttl_days
    click.echo(
        f"{len(letters)} dead letter(s); kept {'until replayed or purged' if not ttl else f'{ttl} days'}"
    )
    print_table(
        ["queue", "message id", "actor", "dead-lettered", "reason"],
        [
            (
                letter.queue_name,
                letter.message_id or "(not a message)",
                letter.actor_name,
                letter.dead_lettered_at.isoformat() if letter.dead_lettered_at else None,
                letter.reason,
            )
            for letter in letters
        ],
        empty="",
    )


@dlq.command("replay")
@click.option("--queue", "-Q", type=click.Choice(QUEUE_CHOICES), default=None, help="Only this queue's DLQ.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Replay at most this many per queue.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; move nothing.")
def dlq_replay(queue: str | None, limit: int | None, dry_run: bool) -> None:
    """Put dead-lettered messages back on their queues, with fresh retries."""
    with open_services() as services:
        url = services.settings.broker_url
        for xq in _xq_names(services.settings, queue):
            total = min(dead_letters.depth(url, xq), limit or 10**9)
            if total == 0:
                continue
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console(stderr=True),
            ) as progress:
                task = progress.add_task(xq, total=total)
                result = dead_letters.replay(
                    url,
                    services.session_factory,
                    xq,
                    limit=limit,
                    dry_run=dry_run,
                    on_each=functools.partial(progress.advance, task),
                    internal_senders=services.settings.internal_users(),
                    external_queues=[
                        r.queue_name(services.settings.queue_prefix) for r in ROUTES if r.external
                    ],
                )
            verb = "would replay" if dry_run else "replayed"
            kept = f", kept {result.kept} that are not messages" if result.kept else ""
            click.echo(f"{xq}: {verb} {result.replayed}{kept}")
