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

import click
import dramatiq
import yaml
from dramatiq.brokers.stub import StubBroker
from pydantic import SecretStr

from domain.model import AdminKey, Portal, utcnow
from infra.bootstrap import Services, build, wire
from infra.cli import producer
from infra.credentials import issuing, sealing, signing
from infra.db import catalogue_file, migrate, views
from infra.logs import configure as configure_logging
from infra.messaging.publisher import DramatiqPublisher
from infra.settings import Settings
from messages import routes
from messages.routes import ROUTES

ADMIN = "admin@accessflow.example"
ADMIN_ID = "dana"
ADMIN_KEY_ID = "dana-demo"
PORTAL_ID = "demo-portal"
#: The AMQP users the demo's portal and admin tool would publish as on RabbitMQ.
PORTAL_USER = "demo-portal"
ADMIN_TOOL_USER = "demo-admin-tool"


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
        seal_key=SecretStr(sealing.generate_seal_key()),
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
        _play(services, broker, worker, examples, workdir, echo)
    finally:
        worker.stop()
        services.close()


def _play(
    services: Services,
    broker: StubBroker,
    worker: dramatiq.Worker,
    examples: Path,
    workdir: Path,
    echo: Callable[[str], Any],
) -> None:

    prefix = services.settings.queue_prefix
    portal_wire = producer.StubWire(broker, prefix, sender=PORTAL_USER)
    admin_wire = producer.StubWire(broker, prefix, sender=ADMIN_TOOL_USER)

    counts = catalogue_file.load(catalogue_file.read(examples / "catalog.yaml"), services.uow())
    echo("1. catalogue loaded: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n))

    # The portal makes its own X25519 keypair and registers only the public half; the admin
    # likewise keeps the Ed25519 private key and registers the public one.
    portal_private, portal_public = sealing.generate_portal_keypair()
    admin_public = signing.generate_keypair(workdir / "admin-key.pem")
    admin_key = signing.load_private_key(workdir / "admin-key.pem")
    with services.uow() as uow:
        uow.portals.upsert(
            Portal(
                id=PORTAL_ID,
                name="Demo Portal",
                broker_user=PORTAL_USER,
                public_key=portal_public,
                consumer_ids=frozenset({"acme", "globex"}),
                url="https://portal.example",
            )
        )
        uow.admin_keys.upsert_admin(ADMIN_ID, ADMIN)
        uow.admin_keys.add_key(AdminKey(ADMIN_KEY_ID, ADMIN_ID, admin_public, utcnow()))
        uow.commit()
    echo(
        f"2. registered portal {PORTAL_ID} (X25519 key {portal_public[:12]}...) for consumers acme and globex,"
    )
    echo(f"   and admin {ADMIN_ID} with signing key {ADMIN_KEY_ID} ({admin_public[:20]}...)")

    echo(f"3. the portal submits four requests (contract v2, as AMQP user {PORTAL_USER}):")
    submitted: dict[str, str] = {}
    for path in sorted((examples / "requests").glob("*.json")):
        message = producer.submit(portal_wire, producer.read_request_file(path), portal_id=PORTAL_ID)
        submitted[path.name] = message.request_id
        echo(f"   {path.name:<28} -> request {message.request_id}")
    drain(broker, worker, prefix)

    echo("4. after routing:")
    for name, request_id in submitted.items():
        details = views.request_details(services.uow(), request_id)
        assert details is not None
        echo(f"   {name:<28} {details['status']:<15} {details['reason']}")

    echo(f"5. the admin ({ADMIN_ID}) signs decisions with key {ADMIN_KEY_ID}; a forged one is refused:")
    for entry in yaml.safe_load((examples / "decisions.yaml").read_text()):
        decision = producer.signed_decision(
            request_id=submitted[entry["request"]],
            approve=entry["decision"] == "approve",
            admin_id=ADMIN_ID,
            reason=entry["reason"],
            audience=prefix,
            key_id=ADMIN_KEY_ID,
            private_key=admin_key,
        )
        producer.decide(admin_wire, decision)
        echo(f"   {entry['decision']:<7} {entry['request']:<28} signature {decision.signature.value[:16]}...")
    drain(broker, worker, prefix)
    # Someone turns the rejection into an approval and keeps the admin's signature.
    rejected_id = submitted["03-manual-reject.json"]
    forged = producer.signed_decision(
        request_id=rejected_id,
        approve=False,
        admin_id=ADMIN_ID,
        reason="tampered",
        audience=prefix,
        key_id=ADMIN_KEY_ID,
        private_key=admin_key,
    )
    forged_payload = {**forged.model_dump(mode="json"), "decision": "approve"}
    admin_wire.send(routes.DECIDE, routing_key=ADMIN_ID, payload=forged_payload)
    drain(broker, worker, prefix)
    refused = views.request_details(services.uow(), rejected_id)
    assert refused is not None
    for d in refused["decisions"]:
        echo(f"   decision {d['decision']:<7} on 03: {d['outcome']:<8} {d['outcome_reason']}")

    echo("6. timeline of every request (the audit trail):")
    for name, request_id in submitted.items():
        details = views.request_details(services.uow(), request_id)
        assert details is not None
        echo(f"   {name}  [{details['status']}]")
        for e in details["audit"]:
            echo(
                f"     {e['at'][11:23]}  {e['from'] or '-':>14} -> {e['to']:<15} {e['actor']:<26} {e['reason']}"
            )
        for n in details["notifications"]:
            echo(f"     email {n['kind']:<8} {n['status']}")

    publisher = services.relay.publisher
    assert isinstance(publisher, DramatiqPublisher)
    echo(f"7. what the portal heard ({len(publisher.events)} events, routing key <portal>.<event>):")
    for name, request_id in submitted.items():
        echo(f"   {name}")
        for event in sorted(
            (e.payload for e in publisher.events if e.payload["request_id"] == request_id),
            key=lambda p: int(p["sequence"]),
        ):
            echo(f"     #{event['sequence']} {event['event']:<30} {event['reason']}")
            sealed = event.get("sealed_secret")
            if isinstance(sealed, dict):
                secret = sealing.open_sealed_secret(portal_private, str(sealed["value"]))
                with services.uow() as uow:
                    credential = uow.credentials.for_request(request_id)
                    public_id = credential.public_id if credential is not None else ""
                    valid = issuing.verify(secret, public_id, credential, utcnow())
                echo(
                    f"        sealed secret opened with the portal's key: {secret[:12]}... "
                    f"({len(secret)} chars), {'matches' if valid else 'DOES NOT MATCH'} the stored hash"
                )

    mail_dir = Path(services.settings.mail_dir)
    emails = sorted(mail_dir.glob("*.eml"))
    echo(f"8. {len(emails)} emails written to {mail_dir}/ - open them in any mail client:")
    for path in emails:
        echo(f"   {path}")


@click.command()
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
    run(workdir=workdir, examples=examples, echo=click.echo)
