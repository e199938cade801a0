"""``accessflow credentials``: revealing, verifying, and managing issued credentials through their life."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click

from domain.model import CredentialStatus, utcnow
from infra.cli import producer
from infra.cli.common import AdminSigner, echo_json, open_services, print_table, publishing, signed_by_admin
from infra.credentials.issuing import api_key_public_id, verify
from infra.db import views
from messages.v2 import MAX_GRACE_SECONDS


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
            f"{c['id']}  {c['status']}  {c['kind']}  {label} {c['public_id']}  plan {c['plan_id']}  "
            f"products {','.join(c['products'])}  "
            f"{c['rate_limit_per_minute']}/min, quota {c['monthly_quota'] or 'unlimited'}"
            + (f"  expires {c['expires_at']}" if c["expires_at"] else "")
        )
        if c["secret"] is not None:
            click.echo(f"  secret (shown once, store it now): {c['secret']}")
        elif c["delivered_to_portal"]:
            click.echo(f"  secret delivered, sealed to its key, to portal {c['delivered_to_portal']} only")
        else:
            click.echo(f"  secret already revealed at {c['revealed_at']}")


@credentials.command("list")
@click.option("--app", "app_id", default=None, help="Only this app's.")
@click.option("--consumer", "consumer_id", default=None, help="Only this consumer's.")
@click.option(
    "--status", type=click.Choice([s.value for s in CredentialStatus]), default=None, help="Only these."
)
@click.option("--limit", default=100, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def credentials_list(
    app_id: str | None, consumer_id: str | None, status: str | None, limit: int, as_json: bool
) -> None:
    """Credentials with their status, plan, limits and expiry; never a secret, and nothing is revealed."""
    with open_services() as services, services.uow() as uow:
        found = uow.credentials.listing(
            app_id=app_id,
            consumer_id=consumer_id,
            status=CredentialStatus(status) if status else None,
            limit=limit,
        )
    rows = [
        {
            "id": c.id,
            "status": c.status.value,
            "kind": c.kind.value,
            "public_id": c.public_id,
            "app_id": c.app_id,
            "consumer_id": c.consumer_id,
            "plan_id": c.plan_id,
            "rate_limit_per_minute": c.rate_limit_per_minute,
            "monthly_quota": c.monthly_quota,
            "expires_at": c.expires_at.isoformat() if c.expires_at else None,
            "revision": c.revision,
        }
        for c in found
    ]
    if as_json:
        echo_json(rows)
        return
    columns = [
        "id",
        "status",
        "kind",
        "public_id",
        "app_id",
        "plan_id",
        "rate_limit_per_minute",
        "expires_at",
    ]
    print_table(columns, [[r[name] for name in columns] for r in rows], empty="no credentials")


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


def _publish_operation(
    admin: AdminSigner,
    operation: str,
    target: tuple[str, str],
    reason: str,
    as_json: bool,
    **extra: Any,
) -> None:
    """Sign the operation as ``admin`` and publish it; the workers apply it (``credentials history`` shows it)."""
    key_id, private_key = admin.key()
    with publishing() as (wire, settings):
        message = producer.operate(
            wire,
            producer.signed_operation(
                operation=operation,
                target=target[0],
                target_id=target[1],
                admin_id=admin.admin_id,
                reason=reason,
                audience=settings.queue_prefix,
                key_id=key_id,
                private_key=private_key,
                **extra,
            ),
        )
    if as_json:
        echo_json(message.model_dump(mode="json", exclude_none=True))
    else:
        click.echo(f"operation {message.operation_id} published: {operation} {target[0]} {target[1]}")


def _one_target(credential_id: str | None, app_id: str | None, consumer_id: str | None) -> tuple[str, str]:
    given = [
        (kind, value)
        for kind, value in (("credential", credential_id), ("app", app_id), ("consumer", consumer_id))
        if value
    ]
    if len(given) != 1:
        raise click.UsageError("name exactly one of --credential, --app and --consumer")
    return given[0]


_REASON = click.option("--reason", required=True, help="Why; kept in the audit trail and told to the portal.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the published operation as JSON.")


def _targets(command: Any) -> Any:
    for option in reversed(
        (
            click.option("--credential", "credential_id", default=None, help="One credential, by its id."),
            click.option("--app", "app_id", default=None, help="Every credential of this app."),
            click.option(
                "--consumer", "consumer_id", default=None, help="Every credential of this consumer."
            ),
        )
    ):
        command = option(command)
    return command


def _status_command(operation: str, summary: str) -> None:
    @credentials.command(operation, help=summary)
    @_targets
    @_REASON
    @signed_by_admin
    @_JSON
    def change_status(
        credential_id: str | None,
        app_id: str | None,
        consumer_id: str | None,
        reason: str,
        admin: AdminSigner,
        as_json: bool,
    ) -> None:
        _publish_operation(admin, operation, _one_target(credential_id, app_id, consumer_id), reason, as_json)


_status_command(
    "revoke", "Revoke credentials for good, by credential, app or consumer: they stop verifying at once."
)
_status_command(
    "suspend", "Suspend credentials, by credential, app or consumer: they stop verifying until resumed."
)
_status_command("resume", "Resume suspended credentials, by credential, app or consumer.")


@credentials.command("rotate")
@click.argument("credential_id")
@click.option(
    "--grace",
    "grace_seconds",
    type=click.IntRange(0, MAX_GRACE_SECONDS),
    default=0,
    show_default=True,
    help="Seconds the previous secret still verifies.",
)
@_REASON
@signed_by_admin
@_JSON
def credentials_rotate(
    credential_id: str, grace_seconds: int, reason: str, admin: AdminSigner, as_json: bool
) -> None:
    """Give CREDENTIAL_ID a new secret, delivered as its first one was (sealed to its portal)."""
    _publish_operation(
        admin, "rotate", ("credential", credential_id), reason, as_json, grace_seconds=grace_seconds
    )


@credentials.command("set-expiry")
@click.argument("credential_id")
@click.option(
    "--at",
    "expires_at",
    type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="When it stops verifying, ISO 8601 (UTC unless an offset is given).",
)
@click.option("--never", is_flag=True, help="Take its expiry away.")
@_REASON
@signed_by_admin
@_JSON
def credentials_set_expiry(
    credential_id: str,
    expires_at: datetime | None,
    never: bool,
    reason: str,
    admin: AdminSigner,
    as_json: bool,
) -> None:
    """Give CREDENTIAL_ID a new end of life (--at), or none (--never); its notices start again."""
    if (expires_at is None) == (not never):
        raise click.UsageError("give --at or --never")
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    _publish_operation(
        admin, "set_expiry", ("credential", credential_id), reason, as_json, expires_at=expires_at
    )


@credentials.command("change-plan")
@click.argument("credential_id")
@click.argument("plan_id")
@_REASON
@signed_by_admin
@_JSON
def credentials_change_plan(
    credential_id: str, plan_id: str, reason: str, admin: AdminSigner, as_json: bool
) -> None:
    """Ask to move CREDENTIAL_ID to PLAN_ID, keeping its key.

    The request is routed as an access request is: applied at once under an auto-approve
    plan, else parked for review (``accessflow requests list --status pending_review``).
    """
    _publish_operation(admin, "change_plan", ("credential", credential_id), reason, as_json, plan_id=plan_id)


@credentials.command("history")
@click.argument("credential_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def credentials_history(credential_id: str, as_json: bool) -> None:
    """The audit trail of CREDENTIAL_ID: every change, who made it, and why."""
    with open_services() as services, services.uow() as uow:
        trail = uow.credentials.trail(credential_id)
    if as_json:
        echo_json(trail)
        return
    if not trail:
        raise click.ClickException(f"no credential {credential_id}, or it has no recorded history")
    rows = [
        [
            str(e["at"]),
            str(e["change"]),
            f"{e['from_status']} -> {e['to_status']}",
            str(e["revision"]),
            f"{e['actor_kind']}:{e['actor_id']}",
            str(e["reason"]),
        ]
        for e in trail
    ]
    print_table(["at", "change", "status", "rev", "by", "reason"], rows, empty="")
