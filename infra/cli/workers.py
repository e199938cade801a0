"""``accessflow workers``: a supervised dramatiq worker pool."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import click

from infra.cli.common import (
    QUEUE_CHOICES,
    load_settings,
)
from infra.messaging.supervisor import supervise as run_supervised
from infra.observability.health import prepare_pool_dir


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
    to finish, and anything unfinished goes back to its queue. With ACCESSFLOW_METRICS_PORT
    set, the pool serves /metrics, /healthz/live and /healthz/ready on it.
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
    env = dict(os.environ)
    prepare = None
    made: Path | None = None  # a temporary directory of ours, removed once the pool stopped
    if settings.metrics_port:
        # One directory per pool: its processes' multiprocess files and heartbeats, emptied at each start.
        if not settings.metrics_dir:
            made = Path(tempfile.mkdtemp(prefix="accessflow-pool-"))
        pool_dir = made or Path(settings.metrics_dir)
        env.update(PROMETHEUS_MULTIPROC_DIR=str(pool_dir), ACCESSFLOW_METRICS_DIR=str(pool_dir))
        prepare = partial(prepare_pool_dir, pool_dir, processes=processes, queues=names)
    if supervise:
        # A little longer than dramatiq's own timeout, so that dramatiq requeues before we kill.
        try:
            code = run_supervised(
                argv,
                shutdown_timeout=settings.shutdown_timeout_seconds + 10,
                max_pause=settings.restart_pause_max_seconds,
                env=env,
                before_start=prepare,
            )
        finally:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
        sys.exit(code)
    if prepare is not None:
        prepare()
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)  # noqa: S606 - become the dramatiq process, so signals reach it
