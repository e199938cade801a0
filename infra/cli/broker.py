"""``accessflow broker``: the RabbitMQ definitions of a deployment, printed or applied to a node.

``broker definitions`` prints the document (users without passwords); ``broker setup``
builds the same document, with password hashes for the users in ``--passwords FILE``,
and imports it into a node with rabbitmqctl (:mod:`infra.messaging.broker_admin`). Passwords are
read from a file, never from arguments, and never logged or printed.

The portals come from ``--portal ID=USER`` options and, for ``setup``, from a source that
the composition root may pass to :func:`make_group` (the portals table of the database).
Each gets its user, its permissions and its events queue, bound to its own events: a
portal declares and binds nothing itself (:mod:`infra.messaging.topology` says why).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import click
import yaml
from pydantic import ValidationError

from infra.logs import configure as configure_logging
from infra.messaging.broker_admin import BrokerAdminError, Rabbitmqctl, apply_definitions
from infra.messaging.topology import Accounts, QueueArguments, Topology, definitions, render
from infra.settings import Settings, split_broker_urls

#: Where ``setup`` may get more portals from: settings -> (portal id, AMQP user) pairs.
PortalSource = Callable[[Settings], Iterable[tuple[str, str]]]


def vhost_of(broker_url: str) -> str:
    """The vhost an AMQP URL names: its path, percent-decoded; ``/`` when it names none.

    Of several comma-separated URLs (a cluster's nodes, which share one vhost), the first's.
    """
    path = urlsplit(split_broker_urls(broker_url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise click.ClickException(f"invalid ACCESSFLOW_* settings:\n{error}") from None


def _portal_pairs(values: Iterable[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        portal_id, sep, user = value.partition("=")
        if not sep or not portal_id or not user:
            raise click.BadParameter(f"{value!r} is not ID=USER", param_hint="--portal")
        pairs.append((portal_id, user))
    return pairs


def _accounts(
    topology: Topology,
    portals: Iterable[tuple[str, str]],
    workers: str | None,
    admin: str | None,
    ops: str | None,
) -> Accounts:
    by_id: dict[str, str] = {}
    for portal_id, user in portals:
        if by_id.get(portal_id, user) != user:
            raise click.UsageError(f"portal {portal_id} is given two users: {by_id[portal_id]} and {user}")
        by_id[portal_id] = user
    defaults = Accounts.defaults(topology)
    try:
        return Accounts(
            workers=workers or defaults.workers,
            admin_tool=admin or defaults.admin_tool,
            ops=ops or defaults.ops,
            portals=by_id,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def read_passwords(path: Path) -> dict[str, str]:
    """A YAML or JSON mapping user -> password; refuses anything else (the file is never echoed)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        click.echo(f"warning: {path} is readable by others than its owner (chmod 600 it)", err=True)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        # No detail: a parser's message quotes the offending line, which may be a password.
        raise click.ClickException(f"{path} is not YAML or JSON") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in loaded.items()
    ):
        raise click.ClickException(f"{path} must map each user name to a non-empty password string")
    if any("\n" in v or "\r" in v for v in loaded.values()):
        raise click.ClickException(f"{path}: a password must be one line")
    return dict(loaded)


def _common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--vhost", default=None, help="Vhost; default: the path of ACCESSFLOW_BROKER_URL."),
        click.option(
            "--portal",
            "portals",
            multiple=True,
            metavar="ID=USER",
            help="A portal and the AMQP user it connects as; repeat for each portal.",
        ),
        click.option(
            "--workers-user", default=None, help="AMQP user of the worker pools [<prefix>-workers]."
        ),
        click.option("--admin-user", default=None, help="AMQP user of the admin tool [<prefix>-admin]."),
        click.option("--ops-user", default=None, help="AMQP user of the operators' CLI [<prefix>-ops]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _document(
    settings: Settings,
    *,
    vhost: str | None,
    portals: Iterable[tuple[str, str]],
    workers_user: str | None,
    admin_user: str | None,
    ops_user: str | None,
    passwords: Mapping[str, str],
) -> dict[str, Any]:
    topology = Topology(settings.queue_prefix)
    accounts = _accounts(topology, portals, workers_user, admin_user, ops_user)
    try:
        return definitions(
            topology,
            vhost=vhost or vhost_of(settings.broker_url),
            accounts=accounts,
            passwords=passwords,
            queue_arguments=QueueArguments.from_settings(settings),
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def make_group(portal_source: PortalSource | None = None) -> click.Group:
    """The ``broker`` command group; ``portal_source`` adds portals to ``broker setup``."""

    @click.group("broker")
    def broker() -> None:
        """RabbitMQ users, permissions and topology of this deployment (the broker is a boundary)."""

    @broker.command("definitions")
    @_common_options
    def broker_definitions(
        vhost: str | None,
        portals: tuple[str, ...],
        workers_user: str | None,
        admin_user: str | None,
        ops_user: str | None,
    ) -> None:
        """Print the definitions document (JSON, for rabbitmqctl import_definitions); no passwords."""
        document = _document(
            _settings(),
            vhost=vhost,
            portals=_portal_pairs(portals),
            workers_user=workers_user,
            admin_user=admin_user,
            ops_user=ops_user,
            passwords={},
        )
        click.echo(render(document), nl=False)

    @broker.command("setup")
    @_common_options
    @click.option("--node", default=None, help="Node to apply to (rabbitmqctl -n); default: rabbitmqctl's.")
    @click.option(
        "--rabbitmqctl", "executable", default="rabbitmqctl", show_default=True, help="rabbitmqctl to run."
    )
    @click.option(
        "--passwords",
        "passwords_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="YAML or JSON file: user -> password. Users without one keep theirs (new ones get none).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
    def broker_setup(
        vhost: str | None,
        portals: tuple[str, ...],
        workers_user: str | None,
        admin_user: str | None,
        ops_user: str | None,
        node: str | None,
        executable: str,
        passwords_file: Path | None,
        as_json: bool,
    ) -> None:
        """Create or update the vhost, users, permissions, exchanges, queues (each portal's events queue too) and bindings."""
        settings = _settings()
        pairs = _portal_pairs(portals)
        if portal_source is not None:
            pairs += list(portal_source(settings))
        passwords = read_passwords(passwords_file) if passwords_file else {}
        document = _document(
            settings,
            vhost=vhost,
            portals=pairs,
            workers_user=workers_user,
            admin_user=admin_user,
            ops_user=ops_user,
            passwords=passwords,
        )
        try:
            applied = apply_definitions(Rabbitmqctl(executable=executable, node=node), document)
        except BrokerAdminError as error:
            raise click.ClickException(str(error)) from None
        summary = {
            "vhost": applied.vhost,
            "with_new_password": list(applied.with_new_password),
            "created_without_password": list(applied.created_without_password),
            "kept": list(applied.kept),
        }
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        click.echo(f"vhost {applied.vhost}: definitions applied")
        for label, users in (
            ("new password", applied.with_new_password),
            ("created without a password (set one before it can log in)", applied.created_without_password),
            ("kept as they were", applied.kept),
        ):
            if users:
                click.echo(f"  {label}: {', '.join(users)}")

    return broker


#: The group with no portal source; infra/cli/main.py registers it (or one from :func:`make_group`).
broker = make_group()


def main() -> None:
    """``python -m infra.cli.broker``: the group on its own, logging to stderr as ``accessflow`` does."""
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    broker(prog_name="accessflow broker")


if __name__ == "__main__":
    main()
