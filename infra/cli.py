"""``accessflow``: the one command line for operators, admins, and the demo."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from domain.errors import AccessflowError
from domain.model import DeliveryStatus, Status
from infra import catalogue_file, producer
from infra.bootstrap import Services, build
from infra.broker import DramatiqPublisher, make_broker
from infra.logging import configure as configure_logging
from infra.settings import Settings
from messages.routes import ROUTES

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
    from infra import migrate

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
def _publisher() -> Iterator[tuple[DramatiqPublisher, Settings]]:
    settings = _settings()
    broker = make_broker(settings)
    try:
        yield DramatiqPublisher(broker), settings
    except producer.InvalidMessage as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # the broker is unreachable or refused the message
        raise click.ClickException(f"could not publish: {type(error).__name__}: {error}") from None
    finally:
        broker.close()


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the published message as JSON.")
def submit(file: Path, as_json: bool) -> None:
    """Publish the access request in FILE and print its id.

    FILE holds an access_request.submitted message (messages/schemas); request_id and
    submitted_at are filled in when missing.
    """
    with _publisher() as (publisher, settings):
        message = producer.submit(publisher, settings.queue_prefix, producer.read_request_file(file))
    if as_json:
        _echo_json(message.model_dump(mode="json"))
    else:
        click.echo(message.request_id)


def _admin_id(email: str) -> str:
    return re.sub(r"[^A-Za-z0-9._:-]", "-", email.split("@", 1)[0]) or "admin"


@main.command()
@click.argument("request_id")
@click.argument("decision", type=click.Choice(["approve", "reject"]))
@click.option("--reason", default=None, help="Why; required to reject, and sent to the consumer.")
@click.option("--admin", "admin_email", required=True, help="The deciding admin's email address.")
@click.option("--admin-id", default=None, help="The admin's id; defaults to the address's local part.")
@click.option("--json", "as_json", is_flag=True, help="Print the published decision as JSON.")
def decide(
    request_id: str, decision: str, reason: str | None, admin_email: str, admin_id: str | None, as_json: bool
) -> None:
    """Publish an admin's decision on a pending request, as an admin portal would."""
    if decision == "reject" and not reason:
        raise click.UsageError("a rejection needs --reason: the consumer reads it")
    with _publisher() as (publisher, settings):
        message = producer.decide(
            publisher,
            settings.queue_prefix,
            request_id=request_id,
            approve=decision == "approve",
            admin_email=admin_email,
            admin_id=admin_id or _admin_id(admin_email),
            reason=reason or "approved",
        )
    if as_json:
        _echo_json(message.model_dump(mode="json"))
    else:
        click.echo(f"decision {message.decision_id} published: {decision} {request_id}")


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
        else:
            click.echo(f"  secret already revealed at {c['revealed_at']}")


@credentials.command("verify")
@click.option("--client-id", default=None, help="The OAuth2 client id; omit for an API key.")
def credentials_verify(client_id: str | None) -> None:
    """Check a secret read from standard input, as a gateway would. Exit 0 if valid, 1 if not."""
    from infra.credentials import api_key_public_id, verify

    secret = sys.stdin.readline().strip()
    public_id = client_id or api_key_public_id(secret)
    with _services() as services, services.uow() as uow:
        credential = uow.credentials.by_public_id(public_id) if public_id else None
        valid = verify(secret, credential)
    click.echo("valid" if valid else "invalid")
    sys.exit(0 if valid else 1)


@main.group()
def notifications() -> None:
    """Emails owed, sent and failed."""


@notifications.command("list")
@click.option(
    "--status", type=click.Choice([s.value for s in DeliveryStatus]), default=None, help="Only this status."
)
@click.option("--limit", default=100, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def notifications_list(status: str | None, limit: int, as_json: bool) -> None:
    """List emails; `--status failed` shows those the SMTP server refused for good."""
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
    """Show every dead-lettered message with its reason, leaving the queues untouched."""
    from infra import dead_letters

    with _services() as services:
        letters = [
            letter
            for xq in _xq_names(services.settings, queue)
            for letter in dead_letters.peek(services.settings.broker_url, services.session_factory, xq)
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
    from infra import dead_letters

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
                )
            verb = "would replay" if dry_run else "replayed"
            kept = f", kept {result.kept} that are not messages" if result.kept else ""
            click.echo(f"{xq}: {verb} {result.replayed}{kept}")


@main.group()
def keys() -> None:
    """Keys accessflow needs."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new seal key for ACCESSFLOW_SEAL_KEY."""
    from infra.credentials import generate_seal_key

    click.echo(generate_seal_key())


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
    from infra.supervisor import supervise as run_supervised

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
    from infra.demo import run

    run(workdir=workdir, examples=examples, echo=click.echo)


if __name__ == "__main__":
    main()
