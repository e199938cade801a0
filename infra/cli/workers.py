"""``accessflow workers``: a supervised dramatiq worker pool."""

from __future__ import annotations

import os
import sys

import click

from infra.cli.common import (
    QUEUE_CHOICES,
    load_settings,
)
from infra.messaging.supervisor import supervise as run_supervised


@click.command()
@click.option(
    "--queues",
    "-Q",
    multiple=True,
    type=click.Choice(QUEUE_CHOICES),
    help="Consume only these queues (repeatable); default: all.",
)
@click.option(
    "--processes", "-p", default=1, show_default=True, type=click.IntRange(1), help="Worker processes."
)
@click.option(
    "--threads", "-t", default=4, show_default=True, type=click.IntRange(1), help="Threads per process."
)
@click.option(
    "--supervise/--no-supervise",
    default=True,
    show_default=True,
    help="Restart the pool when a worker process dies. Turn off under a supervisor that restarts it.",
)
def workers(queues: tuple[str, ...], processes: int, threads: int, supervise: bool) -> None:
    """Run a dramatiq worker pool; run one pool per queue to scale each on its own.

    SIGTERM stops it gracefully: in-flight messages get ACCESSFLOW_SHUTDOWN_TIMEOUT_SECONDS
    to finish, and anything unfinished goes back to its queue.
    """
    settings = load_settings()
    chosen = queues or tuple(QUEUE_CHOICES)
    names = [f"{settings.queue_prefix}.{q}" for q in chosen]
    argv = [
        sys.executable, "-m", "dramatiq", "infra.bootstrap:boot_workers",
        "--processes", str(processes), "--threads", str(threads),
        "--worker-shutdown-timeout", str(settings.shutdown_timeout_seconds * 1000),
        "--queues", *names,
    ]  # fmt: skip
    if supervise:
        # A little longer than dramatiq's own timeout, so that dramatiq requeues before we kill.
        sys.exit(
            run_supervised(
                argv,
                shutdown_timeout=settings.shutdown_timeout_seconds + 10,
                max_pause=settings.restart_pause_max_seconds,
            )
        )
    sys.stdout.flush()
    os.execv(sys.executable, argv)  # noqa: S606 - become the dramatiq process, so signals reach it
