"""``accessflow console``: the admins' review console, served over HTTP; and the hash of a console password."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import uvicorn

from infra.bootstrap import build
from infra.cli import producer
from infra.cli.common import load_settings
from infra.console import auth
from infra.console.app import Console, create_app
from infra.messaging.topology import Topology

#: Hosts on which the session cookie may travel without TLS.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: The shortest session secret accepted.
MIN_SECRET = 32


@click.group(invoke_without_command=True)
@click.option("--host", default=None, help="Address to listen on; default ACCESSFLOW_CONSOLE_HOST.")
@click.option("--port", type=int, default=None, help="Port to listen on; default ACCESSFLOW_CONSOLE_PORT.")
@click.pass_context
def console(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the review console: the pending queue, each request's page, approve, reject, bulk approve.

    Admins log in with the credentials in ACCESSFLOW_CONSOLE_ADMINS_FILE; their decisions are
    published as signed decisions, as `accessflow decide` does, over ACCESSFLOW_BROKER_URL.
    Reads use ACCESSFLOW_READONLY_DATABASE_URL when it is set.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = load_settings()
    if (
        settings.console_session_secret is None
        or len(settings.console_session_secret.get_secret_value()) < MIN_SECRET
    ):
        raise click.UsageError(f"set ACCESSFLOW_CONSOLE_SESSION_SECRET (at least {MIN_SECRET} characters)")
    if not settings.console_admins_file:
        raise click.UsageError("set ACCESSFLOW_CONSOLE_ADMINS_FILE: who may log in")
    try:
        admins = auth.read_admins(Path(settings.console_admins_file))
    except auth.ConsoleConfigError as error:
        raise click.ClickException(str(error)) from None
    host = host or settings.console_host
    port = port or settings.console_port
    services = build(settings.model_copy(update={"database_url": settings.readonly_url()}))
    try:
        app = create_app(
            Console(
                reads=services.uow,
                wire=producer.AmqpWire(settings.broker_url, Topology(settings.queue_prefix)),
                admins=admins,
                audience=settings.queue_prefix,
            ),
            session_secret=settings.console_session_secret.get_secret_value(),
            secure_cookie=host not in LOOPBACK,
        )
        click.echo(f"accessflow console on http://{host}:{port}/", err=True)
        uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False)
    finally:
        services.close()


@console.command("hash-password")
def hash_password() -> None:
    """Read a password on stdin (or at a prompt) and print its scrypt hash, for the admins file."""
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise click.UsageError("an empty password")
    click.echo(auth.hash_password(password))
