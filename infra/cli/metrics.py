"""``accessflow metrics``: the one collector of the database and queue series."""

from __future__ import annotations

import click

from infra.cli.common import load_settings
from infra.observability.server import run_collector


@click.command()
def metrics() -> None:
    """Serve the database and queue series on ACCESSFLOW_METRICS_PORT until SIGTERM.

    Requests by state, completion times, the pending review, the outbox, emails,
    credentials, refused messages, queue depths, consumers and dead letters; read at most
    every ACCESSFLOW_METRICS_REFRESH_SECONDS. Run one replica: the worker pools serve only
    their own message series, so that N pools never each scan the tables.
    /healthz/ready answers 200 while the database and the broker answer.
    """
    settings = load_settings()
    if not settings.metrics_port:
        raise click.ClickException("set ACCESSFLOW_METRICS_PORT: the port to serve the series on")
    run_collector(settings)
