"""``accessflow credentials``: revealing and verifying issued credentials."""

from __future__ import annotations

import sys

import click

from domain.model import utcnow
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
@click.argument("app_id", required=False)
@click.option(
    "--request",
    "request_id",
    default=None,
    help="Instead of APP_ID: the app this request is for (a new app gets its id when the request is approved).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def credentials_show(app_id: str | None, request_id: str | None, as_json: bool) -> None:
    """Show the credentials of APP_ID, or of the app of --request ID.

    A secret is printed once, on its first reveal, and never again.
    """
    if (app_id is None) == (request_id is None):
        raise click.UsageError("give APP_ID or --request ID")
    with open_services() as services:
        if request_id is not None:
            app_id = views.app_of_request(services.uow(), request_id)
            if app_id is None:
                raise click.ClickException(
                    f"no request {request_id}, or it has no app yet (a new app is created when approved)"
                )
        assert app_id is not None
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
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def credentials_verify(client_id: str | None, as_json: bool) -> None:
    """Check a secret read from standard input, as a gateway would. Exit 0 if valid, 1 if not.

    A valid secret's answer names the app, the products and the limits it grants. A suspended,
    revoked or expired credential is invalid, and so is a rotated-out secret after its grace period.
    """
    secret = sys.stdin.readline().strip()
    public_id = client_id or api_key_public_id(secret)
    with open_services() as services, services.uow() as uow:
        credential = uow.credentials.by_public_id(public_id) if public_id else None
        valid = verify(secret, public_id or "", credential, utcnow())
    answer: dict[str, object] = {"valid": valid}
    if valid and credential is not None:
        answer.update(
            credential_id=credential.id,
            app_id=credential.app_id,
            consumer_id=credential.consumer_id,
            plan_id=credential.plan_id,
            product_ids=list(credential.product_ids),
            rate_limit_per_minute=credential.rate_limit_per_minute,
            monthly_quota=credential.monthly_quota,
            expires_at=credential.expires_at.isoformat() if credential.expires_at else None,
        )
    if as_json:
        echo_json(answer)
    elif valid and credential is not None:
        click.echo(
            f"valid  app {credential.app_id}  products {','.join(credential.product_ids)}  "
            f"{credential.rate_limit_per_minute}/min, quota {credential.monthly_quota or 'unlimited'}"
        )
    else:
        click.echo("invalid")
    sys.exit(0 if valid else 1)
