"""``accessflow credentials``: revealing and verifying issued credentials."""

from __future__ import annotations

import sys

import click

from infra.cli.common import (
    echo_json,
    open_services,
)
from infra.credentials.issuing import api_key_public_id, verify
from infra.db import views


@click.group()
def credentials() -> None:
    """Credentials issued to apps."""


@credentials.command("show")
@click.argument("app_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def credentials_show(app_id: str, as_json: bool) -> None:
    """Show APP_ID's credentials. A secret is printed once, on its first reveal, and never again."""
    with open_services() as services:
        shown = views.reveal_credentials(services.uow(), services.sealer().unseal, app_id)
    if as_json:
        echo_json(shown)
        return
    if not shown:
        click.echo(f"app {app_id} has no credentials")
    for c in shown:
        label = "client_id" if c["kind"] == "oauth2_client_credentials" else "key prefix"
        click.echo(
            f"{c['kind']}  {label} {c['public_id']}  products {','.join(c['products'])}  "
            f"{c['rate_limit_per_minute']}/min, quota {c['monthly_quota'] or 'unlimited'}"
        )
        if c["secret"] is not None:
            click.echo(f"  secret (shown once, store it now): {c['secret']}")
        elif c["delivered_to_portal"]:
            click.echo(f"  secret delivered, sealed to its key, to portal {c['delivered_to_portal']} only")
        else:
            click.echo(f"  secret already revealed at {c['revealed_at']}")


@credentials.command("verify")
@click.option("--client-id", default=None, help="The OAuth2 client id; omit for an API key.")
def credentials_verify(client_id: str | None) -> None:
    """Check a secret read from standard input, as a gateway would. Exit 0 if valid, 1 if not."""
    secret = sys.stdin.readline().strip()
    public_id = client_id or api_key_public_id(secret)
    with open_services() as services, services.uow() as uow:
        credential = uow.credentials.by_public_id(public_id) if public_id else None
        valid = verify(secret, credential)
    click.echo("valid" if valid else "invalid")
    sys.exit(0 if valid else 1)
