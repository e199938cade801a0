"""``accessflow``: the one command line for operators, admins, and the demo; each group is its own module."""

from __future__ import annotations

import click

from infra.bootstrap import build
from infra.cli import (
    admins,
    catalog,
    console,
    credentials,
    db,
    demo,
    dlq,
    keys,
    metrics,
    notifications,
    outbox,
    portals,
    publish,
    requests,
    status,
    workers,
)
from infra.cli import broker as cli_broker
from infra.cli.common import (
    load_settings,
)
from infra.logs import configure as configure_logging
from infra.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """accessflow: API access requests in, provisioned credentials and emails out.

    Settings come from ACCESSFLOW_* environment variables (see the README).
    """
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)


def _registered_portals(settings: Settings) -> list[tuple[str, str]]:
    """Every registered portal's id and AMQP user, for ``broker setup``."""
    services = build(settings)
    try:
        with services.uow() as uow:
            return [(p.id, p.broker_user) for p in uow.portals.list()]
    finally:
        services.close()


main.add_command(db.db)
main.add_command(catalog.catalog)
main.add_command(publish.submit)
main.add_command(publish.decide)
main.add_command(publish.decide_bulk)
main.add_command(admins.admins)
main.add_command(portals.portals)
main.add_command(requests.requests)
main.add_command(credentials.credentials)
main.add_command(notifications.notifications)
main.add_command(dlq.dlq)
main.add_command(outbox.outbox)
main.add_command(outbox.relay)
main.add_command(status.status)
main.add_command(keys.keys)
main.add_command(cli_broker.make_group(portal_source=_registered_portals))
main.add_command(workers.workers)
main.add_command(metrics.metrics)
main.add_command(demo.demo)
main.add_command(console.console)


if __name__ == "__main__":
    main()
