"""``accessflow demo``: the production code paths, on embedded parts, in one process.

SQLite instead of PostgreSQL, dramatiq's in-memory StubBroker instead of RabbitMQ,
and .eml files instead of SMTP. The domain, handlers, actors, outbox, templates and
CLI functions are the ones production runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import yaml
from dramatiq.brokers.stub import StubBroker
from pydantic import SecretStr

from infra import catalogue_file, migrate, producer
from infra.bootstrap import Services, build, wire
from infra.broker import DramatiqPublisher
from infra.credentials import generate_seal_key
from infra.logging import configure as configure_logging
from infra.settings import Settings
from messages.routes import ROUTES

ADMIN = "admin@accessflow.example"


def drain(broker: StubBroker, worker: dramatiq.Worker, prefix: str) -> None:
    """Wait until every queue is empty and no message is in flight, follow-ups included."""
    for _ in range(len(ROUTES) + 1):  # each pass lets one more hop of follow-ups through
        for route in ROUTES:
            broker.join(route.queue_name(prefix), fail_fast=True)
        worker.join()


def run(*, workdir: Path, examples: Path, echo: Callable[[str], Any]) -> None:
    # The timeline is the demo's output; routine log lines would bury it.
    configure_logging("WARNING", "console")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    settings = Settings(
        database_url=f"sqlite:///{workdir / 'accessflow.db'}",
        broker_url="stub://",
        queue_prefix="demo",
        mail_transport="file",
        mail_dir=str(workdir / "mail"),
        seal_key=SecretStr(generate_seal_key()),
        admin_emails=[ADMIN],
        max_retries=0,
    )
    echo(f"== accessflow demo in {workdir}/ (SQLite, in-memory broker, emails as .eml files)")
    migrate.upgrade(settings.database_url)
    services = build(settings)
    broker = wire(services)
    assert isinstance(broker, StubBroker)
    # One thread: SQLite takes one writer at a time, and the timeline reads better in order.
    worker = dramatiq.Worker(broker, worker_threads=1)
    worker.start()
    try:
        _play(services, broker, worker, examples, echo)
    finally:
        worker.stop()
        services.close()


def _play(
    services: Services,
    broker: StubBroker,
    worker: dramatiq.Worker,
    examples: Path,
    echo: Callable[[str], Any],
) -> None:
    from infra.cli import request_details, reveal_credentials

    prefix = services.settings.queue_prefix
    publisher = DramatiqPublisher(broker)

    counts = catalogue_file.load(catalogue_file.read(examples / "catalog.yaml"), services.uow())
    echo("1. catalogue loaded: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))

    echo("2. a portal submits four requests:")
    submitted: dict[str, str] = {}
    for path in sorted((examples / "requests").glob("*.json")):
        message = producer.submit(publisher, prefix, producer.read_request_file(path))
        submitted[path.name] = message.request_id
        echo(f"   {path.name:<28} -> request {message.request_id}")
    drain(broker, worker, prefix)

    echo("3. after routing:")
    for name, request_id in submitted.items():
        details = request_details(services, request_id)
        assert details is not None
        echo(f"   {name:<28} {details['status']:<15} {details['reason']}")

    echo(f"4. the admin ({ADMIN}) decides:")
    for entry in yaml.safe_load((examples / "decisions.yaml").read_text()):
        request_id = submitted[entry["request"]]
        producer.decide(
            publisher,
            prefix,
            request_id=request_id,
            approve=entry["decision"] == "approve",
            admin_email=ADMIN,
            admin_id="demo-admin",
            reason=entry["reason"],
        )
        echo(f"   {entry['decision']:<7} {entry['request']:<28} reason: {entry['reason']}")
    drain(broker, worker, prefix)

    echo("5. timeline of every request (the audit trail):")
    for name, request_id in submitted.items():
        details = request_details(services, request_id)
        assert details is not None
        echo(f"   {name}  [{details['status']}]")
        for e in details["audit"]:
            echo(
                f"     {e['at'][11:23]}  {e['from'] or '-':>14} -> {e['to']:<15} {e['actor']:<26} {e['reason']}"
            )
        for n in details["notifications"]:
            echo(f"     email {n['kind']:<8} {n['status']}")

    first_app = request_details(services, submitted[min(submitted)])
    assert first_app is not None and first_app["app_id"]
    echo(f"6. the consumer reveals the credentials of app {first_app['app_id']} (shown once):")
    for c in reveal_credentials(services, first_app["app_id"]):
        secret = c["secret"] or ""
        echo(f"   {c['kind']} {c['public_id']}  secret {secret[:12]}... ({len(secret)} chars)")
    again = reveal_credentials(services, first_app["app_id"])
    echo(
        f"   asked again: secret is {'gone' if all(c['secret'] is None for c in again) else 'STILL THERE'}"
        " - only its hash remains"
    )

    mail_dir = Path(services.settings.mail_dir)
    emails = sorted(mail_dir.glob("*.eml"))
    echo(f"7. {len(emails)} emails written to {mail_dir}/ - open them in any mail client:")
    for path in emails:
        echo(f"   {path}")
