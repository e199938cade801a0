"""``accessflow``: the one command line for operators, admins, and the demo."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from domain import handlers
from domain.commands import RetryProvisioning
from domain.errors import AccessflowError
from domain.model import AdminKey, DeliveryStatus, Status, utcnow
from infra.bootstrap import Services, build
from infra.cli import broker as cli_broker
from infra.cli import producer
from infra.credentials import signing
from infra.db import catalogue_file
from infra.logs import configure as configure_logging
from infra.messaging.outbox import run_relay
from infra.messaging.topology import Topology
from infra.settings import Settings
from messages.routes import ROUTES
from workers.registry import explain

QUEUE_CHOICES = [route.queue for route in ROUTES]


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise click.ClickException(f"invalid ACCESSFLOW_* settings:\n{error}") from None


@contextmanager
def _services() -> Iterator[Services]:
    settings = _settings()
    services = build(settings)
    try:
        yield services
    except AccessflowError as error:
        raise click.ClickException(str(error)) from None
    finally:
        services.close()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """accessflow: API access requests in, provisioned credentials and emails out.

    Settings come from ACCESSFLOW_* environment variables (see the README).
    """
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)


# --- db ---------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
def db_upgrade(revision: str) -> None:
    """Apply the migrations to ACCESSFLOW_DATABASE_URL."""
    from infra.db import migrate

    settings = _settings()
    try:
        migrate.upgrade(settings.database_url, revision)
    except Exception as error:
        raise click.ClickException(f"migration failed: {type(error).__name__}: {error}") from None
    click.echo(f"database at revision {migrate.current(settings.database_url)}")


# --- catalogue ----------------------------------------------------------------------------------


@main.group()
def catalog() -> None:
    """The catalogue of products, plans, consumers and apps."""


@catalog.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def catalog_load(file: Path, as_json: bool) -> None:
    """Insert or update everything in FILE (YAML or JSON)."""
    try:
        parsed = catalogue_file.read(file)
    except catalogue_file.CatalogueFileError as error:
        raise click.ClickException(str(error)) from None
    with _services() as services:
        counts = catalogue_file.load(parsed, services.uow())
    if as_json:
        _echo_json(counts)
    else:
        click.echo("loaded " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))


# --- producing ------------------------------------------------------------------------------------


@contextmanager
def _wire() -> Iterator[tuple[producer.AmqpWire, Settings]]:
    settings = _settings()
    try:
        yield producer.AmqpWire(settings.broker_url, Topology(settings.queue_prefix)), settings
    except producer.InvalidMessage as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # the broker is unreachable or refused the message
        raise click.ClickException(f"could not publish: {type(error).__name__}: {error}") from None


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--portal", "portal_id", default=None, help="The sending portal's id, if FILE has no portal_id."
)
@click.option("--json", "as_json", is_flag=True, help="Print the published message as JSON.")
def submit(file: Path, portal_id: str | None, as_json: bool) -> None:
    """Publish the access request in FILE as a portal does, and print its id.

    FILE holds an access_request.submitted message (messages/schemas); it is sent as
    contract v2, with request_id and submitted_at filled in when missing. Publish as
    the portal's own AMQP user: ACCESSFLOW_BROKER_URL names it.
    """
    with _wire() as (wire, _):
        message = producer.submit(wire, producer.read_request_file(file), portal_id=portal_id)
    if as_json:
        _echo_json(message.model_dump(mode="json"))
    else:
        click.echo(message.request_id)


@main.command()
@click.argument("request_id")
@click.argument("decision", type=click.Choice(["approve", "reject"]))
@click.option("--reason", default=None, help="Why; required to reject, and sent to the consumer.")
@click.option("--admin", "admin_id", required=True, help="The deciding admin's id (accessflow admins list).")
@click.option(
    "--key-file",
    envvar="ACCESSFLOW_ADMIN_KEY_FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The admin's Ed25519 private key (accessflow keys admin-generate); env ACCESSFLOW_ADMIN_KEY_FILE.",
)
@click.option(
    "--key-id",
    envvar="ACCESSFLOW_ADMIN_KEY_ID",
    help="The id the key's public half is registered under; env ACCESSFLOW_ADMIN_KEY_ID.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the published decision as JSON.")
def decide(
    request_id: str,
    decision: str,
    reason: str | None,
    admin_id: str,
    key_file: Path | None,
    key_id: str | None,
    as_json: bool,
) -> None:
    """Sign an admin's decision on a pending request with the admin's key, and publish it."""
    if decision == "reject" and not reason:
        raise click.UsageError("a rejection needs --reason: the consumer reads it")
    if key_file is None or not key_id:
        raise click.UsageError("a decision is signed: give --key-file and --key-id (or their variables)")
    try:
        private_key = signing.load_private_key(key_file)
    except (ValueError, AccessflowError) as error:
        raise click.ClickException(str(error)) from None
    with _wire() as (wire, settings):
        message = producer.decide(
            wire,
            producer.signed_decision(
                request_id=request_id,
                approve=decision == "approve",
                admin_id=admin_id,
                reason=reason or "approved",
                audience=settings.queue_prefix,
                key_id=key_id,
                private_key=private_key,
            ),
        )
    if as_json:
        _echo_json(message.model_dump(mode="json"))
    else:
        click.echo(f"decision {message.decision_id} published: {decision} {request_id}")


# --- parties: admins and portals ---------------------------------------------------------------------


@main.group()
def admins() -> None:
    """Admins, and the public keys their signed decisions are checked with."""


@admins.command("add")
@click.argument("admin_id")
@click.option("--email", required=True, help="The admin's address, shown with their decisions.")
def admins_add(admin_id: str, email: str) -> None:
    """Register an admin, or change their address."""
    entry = _validated_entry(catalogue_file.AdminEntry, {"id": admin_id, "email": email})
    with _services() as services, services.uow() as uow:
        uow.admin_keys.upsert_admin(entry.id, str(entry.email))
        uow.commit()
    click.echo(f"admin {entry.id} registered")


@admins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def admins_list(as_json: bool) -> None:
    """Every admin and their keys, revoked ones marked."""
    with _services() as services, services.uow() as uow:
        rows: list[dict[str, Any]] = [
            {
                "id": admin_id,
                "email": email,
                "keys": [
                    {
                        "key_id": k.key_id,
                        "public_key": k.public_key,
                        "created_at": k.created_at.isoformat(),
                        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                    }
                    for k in keys
                ],
            }
            for admin_id, email, keys in uow.admin_keys.admins()
        ]
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['id']}  {row['email']}")
        for k in row["keys"]:
            state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "active"
            click.echo(f"    key {k['key_id']}  {state}")
    if not rows:
        click.echo("no admins")


@admins.group("keys")
def admin_keys() -> None:
    """An admin's signing keys: several may be active at once, so keys can rotate."""


@admin_keys.command("add")
@click.argument("admin_id")
@click.option("--key-id", required=True, help="A name for the key, unique across admins.")
@click.option(
    "--public-key",
    required=True,
    help="'ed25519:<base64>' as keys admin-generate prints it, a PEM public key, or @FILE to read one.",
)
def admin_keys_add(admin_id: str, key_id: str, public_key: str) -> None:
    """Register a public key of ADMIN_ID; decisions signed with its private half then count."""
    text = Path(public_key[1:]).read_text() if public_key.startswith("@") else public_key
    try:
        normalised = signing.public_key_text(signing.parse_public_key(text))
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    entry = _validated_entry(catalogue_file.AdminKeyEntry, {"key_id": key_id, "public_key": normalised})
    with _services() as services, services.uow() as uow:
        if uow.admin_keys.admin_email(admin_id) is None:
            raise click.ClickException(f"no admin {admin_id}: add them first with `accessflow admins add`")
        try:
            uow.admin_keys.add_key(AdminKey(entry.key_id, admin_id, entry.public_key, utcnow()))
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        uow.commit()
    click.echo(f"key {entry.key_id} of {admin_id} registered")


@admin_keys.command("revoke")
@click.argument("key_id")
def admin_keys_revoke(key_id: str) -> None:
    """Revoke a key for good: decisions signed with it are refused from now on."""
    with _services() as services, services.uow() as uow:
        if not uow.admin_keys.revoke(key_id):
            raise click.ClickException(f"no key {key_id}")
        uow.commit()
    click.echo(f"key {key_id} revoked")


@main.group()
def portals() -> None:
    """Developer portals: who may submit for which consumers, and where their events go."""


@portals.command("add")
@click.argument("portal_id")
@click.option("--name", required=True, help="The portal's name, as the approve email shows it.")
@click.option("--broker-user", required=True, help="The AMQP user the portal publishes as.")
@click.option(
    "--public-key", required=True, help="The portal's X25519 public key, base64 (keys portal-generate)."
)
@click.option("--url", default="", help="Where consumers sign in to the portal; shown in the approve email.")
@click.option("--consumer", "consumers", multiple=True, help="A consumer the portal speaks for (repeatable).")
def portals_add(
    portal_id: str, name: str, broker_user: str, public_key: str, url: str, consumers: tuple[str, ...]
) -> None:
    """Register a portal, or replace its registration (its consumers included)."""
    entry = _validated_entry(
        catalogue_file.PortalEntry,
        {
            "id": portal_id,
            "name": name,
            "broker_user": broker_user,
            "public_key": public_key,
            "url": url,
            "consumers": list(consumers),
        },
    )
    with _services() as services, services.uow() as uow:
        unknown = [c for c in entry.consumers if uow.catalogue.consumer(c) is None]
        if unknown:
            raise click.ClickException(f"unknown consumer(s): {', '.join(unknown)}")
        uow.portals.upsert(entry.to_portal())
        uow.commit()
    click.echo(f"portal {entry.id} registered for {len(entry.consumers)} consumer(s)")


@portals.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def portals_list(as_json: bool) -> None:
    """Every registered portal."""
    with _services() as services, services.uow() as uow:
        rows = [
            {
                "id": p.id,
                "name": p.name,
                "broker_user": p.broker_user,
                "public_key": p.public_key,
                "url": p.url,
                "consumers": sorted(p.consumer_ids),
            }
            for p in uow.portals.list()
        ]
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        click.echo(
            f"{row['id']}  {row['name']}  as {row['broker_user']}  consumers {','.join(row['consumers'])}"
        )
    if not rows:
        click.echo("no portals")


def _validated_entry(entry: type[catalogue_file.Entry], values: dict[str, Any]) -> Any:
    try:
        return entry.model_validate(values)
    except ValidationError as error:
        raise click.ClickException(explain(error)) from None


# --- reading --------------------------------------------------------------------------------------


@main.group()
def requests() -> None:
    """Inspect access requests."""


def request_summary(request: Any) -> dict[str, Any]:
    return {
        "id": request.id,
        "status": request.status.value,
        "reason": request.status_reason,
        "consumer_id": request.consumer_id,
        "app_id": request.app_id,
        "plan_id": request.plan_id,
        "product_ids": list(request.product_ids),
        "auth_method": request.auth_method.value if request.auth_method else None,
        "submitted_at": request.submitted_at.isoformat(),
        "updated_at": request.updated_at.isoformat(),
    }


@requests.command("list")
@click.option(
    "--status", type=click.Choice([s.value for s in Status]), default=None, help="Only this status."
)
@click.option("--limit", default=100, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def requests_list(status: str | None, limit: int, as_json: bool) -> None:
    """List requests, newest first."""
    with _services() as services, services.uow() as uow:
        rows = [
            request_summary(r)
            for r in uow.requests.list(status=Status(status) if status else None, limit=limit)
        ]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(
            f"{r['id']}  {r['status']:<15} {r['plan_id']:<12} {','.join(r['product_ids']):<30} {r['reason']}"
        )
    if not rows:
        click.echo("no requests")


def request_details(services: Services, request_id: str) -> dict[str, Any] | None:
    with services.uow() as uow:
        request = uow.requests.get(request_id)
        if request is None:
            return None
        credential = uow.credentials.for_request(request_id)
        return {
            **request_summary(request),
            "justification": request.justification,
            "audit": [
                {
                    "at": e.at.isoformat(),
                    "from": e.from_status.value if e.from_status else None,
                    "to": e.to_status.value,
                    "actor": f"{e.actor_kind.value}:{e.actor_id}",
                    "reason": e.reason,
                }
                for e in request.history
            ],
            "decisions": [
                {
                    "id": d.id,
                    "decision": "approve" if d.approve else "reject",
                    "admin": d.admin_email,
                    "reason": d.reason,
                    "outcome": d.outcome.value,
                    "outcome_reason": d.outcome_reason,
                }
                for d in uow.decisions.for_request(request_id)
            ],
            "notifications": [
                {
                    "kind": n.kind.value,
                    "status": n.status.value,
                    "attempts": n.attempts,
                    "message_id": n.message_id,
                }
                for n in uow.notifications.for_request(request_id)
            ],
            "credential": None
            if credential is None
            else {"id": credential.id, "kind": credential.kind.value, "public_id": credential.public_id},
        }


@requests.command("show")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def requests_show(request_id: str, as_json: bool) -> None:
    """Show one request with its audit trail."""
    with _services() as services:
        details = request_details(services, request_id)
    if details is None:
        raise click.ClickException(f"no request {request_id}")
    if as_json:
        _echo_json(details)
        return
    click.echo(f"request {details['id']}: {details['status']}  {details['reason']}")
    click.echo(
        f"  consumer {details['consumer_id']}, app {details['app_id']}, plan {details['plan_id']}, "
        f"products {', '.join(details['product_ids'])}"
    )
    click.echo("  audit trail:")
    for entry in details["audit"]:
        click.echo(
            f"    {entry['at']}  {entry['from'] or '-':>14} -> {entry['to']:<15} {entry['actor']:<22} "
            f"{entry['reason']}"
        )
    for d in details["decisions"]:
        click.echo(
            f"  decision {d['decision']} by {d['admin']}: {d['outcome']} {d['outcome_reason']}".rstrip()
        )
    for n in details["notifications"]:
        click.echo(f"  email {n['kind']}: {n['status']} after {n['attempts']} attempt(s)")
    if details["credential"]:
        c = details["credential"]
        click.echo(f"  credential {c['kind']} {c['public_id']}")


@requests.command("retry")
@click.argument("request_id")
@click.option(
    "--reason",
    default="provisioning retried",
    show_default=True,
    help="Why, for the audit trail: what was fixed.",
)
def requests_retry(request_id: str, reason: str) -> None:
    """Approve again a request whose provisioning failed, so that its credential is issued anew.

    Fix the cause first (restore the plan, unblock the issuer): the request goes back to
    approved, its portal is told, and the credentials worker issues the credential.
    """
    command = RetryProvisioning(request_id=request_id, operator=_operator(), reason=reason)
    with _services() as services:
        status = handlers.retry_provisioning(command, uow=services.uow())
    click.echo(f"request {request_id}: {status.value}, its credential will be issued")


def _operator() -> str:
    """Who runs this command, for the audit trail: the login of the machine's user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        return f"uid:{os.getuid()}"


# --- credentials ------------------------------------------------------------------------------------


@main.group()
def credentials() -> None:
    """Credentials issued to apps."""


def reveal_credentials(services: Services, app_id: str) -> list[dict[str, Any]]:
    """The app's credentials; each secret is returned on its first reveal only, then forgotten."""
    sealer = services.sealer()
    with services.uow() as uow:
        shown = []
        for credential in uow.credentials.for_app(app_id, for_update=True):
            secret = credential.reveal(sealer.unseal)
            request = uow.requests.get(credential.request_id)
            shown.append(
                {
                    "id": credential.id,
                    "request_id": credential.request_id,
                    "kind": credential.kind.value,
                    "public_id": credential.public_id,
                    "secret": secret,
                    "products": list(credential.product_ids),
                    "rate_limit_per_minute": credential.rate_limit_per_minute,
                    "monthly_quota": credential.monthly_quota,
                    "revealed_at": credential.revealed_at.isoformat() if credential.revealed_at else None,
                    # A portal's request kept no copy: its secret went, sealed, to the portal only.
                    "delivered_to_portal": request.portal_id if request else None,
                }
            )
        uow.commit()
    return shown


@credentials.command("show")
@click.argument("app_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def credentials_show(app_id: str, as_json: bool) -> None:
    """Show APP_ID's credentials. A secret is printed once, on its first reveal, and never again."""
    with _services() as services:
        shown = reveal_credentials(services, app_id)
    if as_json:
        _echo_json(shown)
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
    from infra.credentials.issuing import api_key_public_id, verify

    secret = sys.stdin.readline().strip()
    public_id = client_id or api_key_public_id(secret)
    with _services() as services, services.uow() as uow:
        credential = uow.credentials.by_public_id(public_id) if public_id else None
        valid = verify(secret, credential)
    click.echo("valid" if valid else "invalid")
    sys.exit(0 if valid else 1)


@main.group()
def notifications() -> None:
    """Emails owed, sent, partly sent and failed."""


@notifications.command("list")
@click.option(
    "--status", type=click.Choice([s.value for s in DeliveryStatus]), default=None, help="Only this status."
)
@click.option("--limit", default=100, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def notifications_list(status: str | None, limit: int, as_json: bool) -> None:
    """List emails; `--status failed` shows those refused for good or given up on, `--status partial`
    those the SMTP server took for some recipients and refused for others."""
    with _services() as services, services.uow() as uow:
        rows = [
            {
                "request_id": n.request_id,
                "kind": n.kind.value,
                "status": n.status.value,
                "attempts": n.attempts,
                "last_error": n.last_error,
                "message_id": n.message_id,
                "created_at": n.created_at.isoformat(),
            }
            for n in uow.notifications.recent(status=DeliveryStatus(status) if status else None, limit=limit)
        ]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(
            f"{r['request_id']}  {r['kind']:<8} {r['status']:<8} {r['attempts']} attempt(s)  {r['last_error']}"
        )
    if not rows:
        click.echo("no emails")


# --- dead letters -----------------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """Dead-letter queues: what failed for good, why, and replaying it."""


def _xq_names(settings: Settings, queue: str | None) -> list[str]:
    return [f"{r.queue_name(settings.queue_prefix)}.XQ" for r in ROUTES if queue in (None, r.queue)]


@dlq.command("list")
@click.option("--queue", "-Q", type=click.Choice(QUEUE_CHOICES), default=None, help="Only this queue's DLQ.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_list(queue: str | None, as_json: bool) -> None:
    """Show every dead-lettered message with its reason; each stays in its queue, in order, uncounted."""
    from infra.messaging import dead_letters

    with _services() as services:
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
        _echo_json([dataclasses.asdict(letter) for letter in letters])
        return
    ttl = _settings().dead_letter_ttl_days
    click.echo(
        f"{len(letters)} dead letter(s); kept {'until replayed or purged' if not ttl else f'{ttl} days'}"
    )
    for letter in letters:
        click.echo(
            f"{letter.queue_name}  {letter.message_id or '(not a message)'}  {letter.actor_name or ''}"
        )
        click.echo(f"    {letter.reason}")


@dlq.command("replay")
@click.option("--queue", "-Q", type=click.Choice(QUEUE_CHOICES), default=None, help="Only this queue's DLQ.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Replay at most this many per queue.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; move nothing.")
def dlq_replay(queue: str | None, limit: int | None, dry_run: bool) -> None:
    """Put dead-lettered messages back on their queues, with fresh retries."""
    from infra.messaging import dead_letters

    with _services() as services:
        url = services.settings.broker_url
        for xq in _xq_names(services.settings, queue):
            total = min(dead_letters.depth(url, xq), limit or 10**9)
            if total == 0:
                continue
            with click.progressbar(length=total, label=xq, file=sys.stderr) as bar:
                result = dead_letters.replay(
                    url,
                    services.session_factory,
                    xq,
                    limit=limit,
                    dry_run=dry_run,
                    on_each=lambda: bar.update(1),
                    internal_senders=services.settings.internal_users(),
                    external_queues=[
                        r.queue_name(services.settings.queue_prefix) for r in ROUTES if r.external
                    ],
                )
            verb = "would replay" if dry_run else "replayed"
            kept = f", kept {result.kept} that are not messages" if result.kept else ""
            click.echo(f"{xq}: {verb} {result.replayed}{kept}")


# --- outbox and its relay ------------------------------------------------------------------------


@main.group()
def outbox() -> None:
    """Messages committed but not yet published: pending, and parked after the broker kept refusing them."""


@outbox.command("list")
@click.option("--parked", is_flag=True, help="Only rows the relay gave up on, waiting for an operator.")
@click.option("--limit", default=100, show_default=True, help="At most this many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_list(parked: bool, limit: int, as_json: bool) -> None:
    """List unsent outbox rows with their tries and why the last one failed."""
    with _services() as services:
        rows = services.relay.unsent(parked_only=parked, limit=limit)
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['status']:<7} {r['destination']}  {r['attempts']} attempt(s)")
        if r["last_error"]:
            click.echo(f"    {r['last_error']}")
    if not rows:
        click.echo("no parked rows" if parked else "no unsent rows")


@outbox.command("retry")
@click.argument("row_ids", nargs=-1)
@click.option("--all-parked", is_flag=True, help="Put back every parked row.")
def outbox_retry(row_ids: tuple[str, ...], all_parked: bool) -> None:
    """Put parked rows back for the relay's next sweep, with fresh attempts: fix the cause first."""
    if bool(row_ids) == all_parked:
        raise click.UsageError("give row ids, or --all-parked")
    with _services() as services:
        put_back = services.relay.unpark(None if all_parked else list(row_ids))
    for row_id in put_back:
        click.echo(f"{row_id}: back in the outbox")
    missing = sorted(set(row_ids) - set(put_back))
    if missing:
        raise click.ClickException(f"not parked (or already sent): {', '.join(missing)}")
    if not put_back:
        click.echo("no parked rows")


@main.command()
def relay() -> None:
    """Publish outbox rows no worker published (a crash, pools scaled to zero), and prune sent ones.

    Sweeps every ACCESSFLOW_OUTBOX_SWEEP_SECONDS and prunes rows sent more than
    ACCESSFLOW_OUTBOX_RETAIN_HOURS ago. Safe to run several; the worker pools sweep too.
    SIGTERM or SIGINT stops it once its sweep in progress ends.
    """
    settings = _settings()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    services = build(settings)
    try:
        run_relay(
            services.relay,
            sweep_seconds=settings.outbox_sweep_seconds,
            prune_seconds=settings.outbox_prune_seconds,
            retain=timedelta(hours=settings.outbox_retain_hours),
            stop=stop,
        )
    finally:
        services.close()


@main.group()
def keys() -> None:
    """Keys accessflow needs."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new seal key for ACCESSFLOW_SEAL_KEY."""
    from infra.credentials.issuing import generate_seal_key

    click.echo(generate_seal_key())


@keys.command("admin-generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keys_admin_generate(path: Path) -> None:
    """Write an admin's Ed25519 signing keypair: PATH (private, mode 0600) and PATH.pub.

    Existing files are never overwritten. The private key stays with the admin portal;
    accessflow's workers get only the public key, once it is registered.
    """
    from infra.credentials.signing import generate_keypair

    try:
        public_key = generate_keypair(path)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"private key: {path} (mode 0600; keep it on the admin portal, never on a worker)")
    click.echo(f"public key:  {path}.pub")
    click.echo(public_key)
    click.echo("")
    click.echo("Next: register the public key under a key id of your choosing (e.g. dana-2026-11):")
    click.echo(f"  accessflow admins keys add ADMIN_ID --key-id KEY_ID --public-key '{public_key}'")
    click.echo("then sign decisions with the private key and that key id (messages/asyncapi.yaml:")
    click.echo('"Signing admin decisions"). Rotate by registering a new key before revoking the old one.')


@keys.command("portal-generate")
def keys_portal_generate() -> None:
    """Print a new X25519 keypair for a portal: the portal keeps the private key and opens its secrets with it.

    A real portal makes its own keypair and registers only the public half; this is for
    trying accessflow out, and for tests.
    """
    from infra.credentials.issuing import generate_portal_keypair

    private, public = generate_portal_keypair()
    click.echo(f"private: {private}")
    click.echo(f"public:  {public}")


def _registered_portals(settings: Settings) -> list[tuple[str, str]]:
    """Every registered portal's id and AMQP user, for ``broker setup``."""
    services = build(settings)
    try:
        with services.uow() as uow:
            return [(p.id, p.broker_user) for p in uow.portals.list()]
    finally:
        services.close()


main.add_command(cli_broker.make_group(portal_source=_registered_portals))


# --- workers ----------------------------------------------------------------------------------------


@main.command()
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
    from infra.messaging.supervisor import supervise as run_supervised

    settings = _settings()
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


@main.command()
@click.option(
    "--workdir",
    default="var/demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the demo keeps its SQLite database and .eml files.",
)
@click.option(
    "--examples",
    default="examples",
    show_default=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The example files to play.",
)
def demo(workdir: Path, examples: Path) -> None:
    """Run the whole flow in one process: SQLite, in-memory broker, emails as .eml files."""
    from infra.cli.demo import run

    run(workdir=workdir, examples=examples, echo=click.echo)


if __name__ == "__main__":
    main()
