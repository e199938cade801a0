"""``accessflow demo``: the production code paths, on embedded parts, in one process.

SQLite instead of PostgreSQL, dramatiq's in-memory StubBroker instead of RabbitMQ,
and .eml files instead of SMTP. The domain, handlers, actors, outbox, templates and
CLI functions are the ones production runs.

After the four example requests, it shows one of each review feature: requests routed by
a plan's rules, a throttled one, two approvers, a bulk approve, a review deadline's
reminders, escalation and expiry and a credential's rotation and expiry (the sweeps called
with chosen ``now`` moments, never by waiting), then writes the console's settings for the
demo's database and prints where the console would serve it.
"""

from __future__ import annotations

import email
import email.policy
import json
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import dramatiq
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dramatiq.brokers.stub import StubBroker
from pydantic import SecretStr

from domain.model import AdminKey, Portal, utcnow
from infra.bootstrap import Services, build, wire
from infra.cli import producer
from infra.console import auth
from infra.credentials import issuing, sealing, signing
from infra.db import catalogue_file, migrate, views
from infra.logs import configure as configure_logging
from infra.messaging import lifecycle
from infra.messaging.publisher import DramatiqPublisher
from infra.settings import Settings
from messages import routes
from messages.routes import ROUTES

ADMIN = "admin@accessflow.example"
ADMIN_ID = "dana"
ADMIN_KEY_ID = "dana-demo"
#: A request id nobody submitted: a bulk decision names it to show its ``not_found`` result.
UNKNOWN_REQUEST = "00000000-0000-4000-8000-000000000000"
#: The second admin, for the plan that needs two approvals.
SECOND_ADMIN = "lee@accessflow.example"
SECOND_ADMIN_ID = "lee"
SECOND_ADMIN_KEY_ID = "lee-demo"
#: Who hears of a pending request whose review deadline is near.
ESCALATION = "head-of-api@accessflow.example"
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
        escalation_emails=[ESCALATION],
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
    extra = catalogue_file.load(catalogue_file.read(examples / "review-consumers.yaml"), services.uow())
    echo(f"   and {extra['consumers']} consumers for the review steps (9 to 15), from review-consumers.yaml")

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
                consumer_ids=frozenset({"acme", "globex", "initech", "spamco"}),
                url="https://portal.example",
            )
        )
        uow.admin_keys.upsert_admin(ADMIN_ID, ADMIN)
        uow.admin_keys.add_key(AdminKey(ADMIN_KEY_ID, ADMIN_ID, admin_public, utcnow()))
        uow.commit()
    echo(
        f"2. registered portal {PORTAL_ID} (X25519 key {portal_public[:12]}...) for consumers acme, globex,"
        " initech and spamco,"
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
            (e.payload for e in publisher.events if e.payload.get("request_id") == request_id),
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

    review = _Review(services, broker, worker, portal_wire, admin_wire, admin_key, workdir, echo)
    review.play()


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


def _request(consumer: str, email_address: str, plan: str, app: str, why: str) -> dict[str, Any]:
    """A submission for a new app of ``consumer`` on ``plan``."""
    return {
        "consumer": {"id": consumer, "email": email_address, "name": consumer.capitalize()},
        "new_app": {"name": app, "description": why},
        "product_ids": ["payments"],
        "plan_id": plan,
        "justification": why,
    }


class _Review:
    """Steps 9 to 15: the review features (rules, throttles, approvers, bulk approve, deadlines), credentials, console."""

    def __init__(
        self,
        services: Services,
        broker: StubBroker,
        worker: dramatiq.Worker,
        portal_wire: producer.StubWire,
        admin_wire: producer.StubWire,
        admin_key: Ed25519PrivateKey,
        workdir: Path,
        echo: Callable[[str], Any],
    ) -> None:
        self.services = services
        self.broker = broker
        self.worker = worker
        self.portal_wire = portal_wire
        self.admin_wire = admin_wire
        self.admin_key = admin_key
        self.workdir = workdir
        self.echo = echo
        self.prefix = services.settings.queue_prefix

    def play(self) -> None:
        second_key = self._register_second_admin()
        self._rules()
        self._throttle()
        self._two_approvers(second_key)
        self._bulk()
        self._deadline()
        self._credential_lifecycle()
        self._console()

    def _drain(self) -> None:
        drain(self.broker, self.worker, self.prefix)

    def _details(self, request_id: str) -> dict[str, Any]:
        details = views.request_details(self.services.uow(), request_id)
        assert details is not None
        return details

    def _submit(self, payloads: list[Mapping[str, Any]]) -> list[str]:
        ids = [producer.submit(self.portal_wire, p, portal_id=PORTAL_ID).request_id for p in payloads]
        self._drain()
        return ids

    def _decide(
        self, request_id: str, admin_id: str, key_id: str, key: Ed25519PrivateKey, reason: str
    ) -> None:
        decision = producer.signed_decision(
            request_id=request_id,
            approve=True,
            admin_id=admin_id,
            reason=reason,
            audience=self.prefix,
            key_id=key_id,
            private_key=key,
        )
        producer.decide(self.admin_wire, decision)

    def _register_second_admin(self) -> Ed25519PrivateKey:
        public = signing.generate_keypair(self.workdir / "lee-key.pem")
        with self.services.uow() as uow:
            uow.admin_keys.upsert_admin(SECOND_ADMIN_ID, SECOND_ADMIN)
            uow.admin_keys.add_key(AdminKey(SECOND_ADMIN_KEY_ID, SECOND_ADMIN_ID, public, utcnow()))
            uow.commit()
        return signing.load_private_key(self.workdir / "lee-key.pem")

    def _rules(self) -> None:
        self.echo(
            "9. approval rules: plan 'vetted' routes by its rules (catalog.yaml), the first match decides:"
        )
        cases = {
            "acme (acme.example)": _request(
                "acme", "dev@acme.example", "vetted", "Acme Ledger", "Reconciliation."
            ),
            "spamco (spam.example)": _request(
                "spamco", "sales@spam.example", "vetted", "Resale", "Reselling."
            ),
            "initech (initech.example)": _request(
                "initech", "dev@initech.example", "vetted", "TPS Reports", "Report payments."
            ),
        }
        ids = self._submit(list(cases.values()))
        for (who, _), request_id in zip(cases.items(), ids, strict=True):
            d = self._details(request_id)
            self.echo(f"   {who:<26} {d['status']:<15} routed by: {d['routed_by']}")
        self.acme_vetted = ids[0]
        self.initech_first = ids[2]

    def _two_approvers(self, second_key: Ed25519PrivateKey) -> None:
        request_id = self.initech_first
        self.echo(
            f"11. N of M: initech's request needs two distinct admins ({ADMIN_ID} and {SECOND_ADMIN_ID}):"
        )
        self._decide(request_id, ADMIN_ID, ADMIN_KEY_ID, self.admin_key, "Looks fine.")
        self._drain()
        self.echo(f"   after {ADMIN_ID} approves:       {self._details(request_id)['status']}")
        self._decide(request_id, SECOND_ADMIN_ID, SECOND_ADMIN_KEY_ID, second_key, "Agreed.")
        self._drain()
        self.echo(f"   after {SECOND_ADMIN_ID} approves too:    {self._details(request_id)['status']}")

    def _throttle(self) -> None:
        self.echo(
            "10. throttle: plan 'vetted' allows 3 open requests per consumer; initech, with one open, submits 3 more:"
        )
        ids = self._submit(
            [
                _request("initech", "dev@initech.example", "vetted", f"Tool {n}", "Internal tool.")
                for n in range(1, 4)
            ]
        )
        for n, request_id in enumerate(ids, 1):
            d = self._details(request_id)
            self.echo(f"   request {n + 1}: {d['status']:<15} {d['reason']}")

    def _bulk(self) -> None:
        self.echo(
            "12. bulk approve: globex submits three requests on plan 'partner', the admin approves them at once:"
        )
        ids = self._submit(
            [
                _request("globex", "api@globex.example", "partner", f"Globex Feed {n}", "Partner feed.")
                for n in range(1, 4)
            ]
        )
        self.echo(f"   pending review: {', '.join(self._details(i)['status'] for i in ids)}")
        bulk_id = bulk_approve(
            self.admin_wire,
            [*ids, UNKNOWN_REQUEST],
            self.admin_key,
            audience=self.prefix,
            reason="Partner batch.",
        )
        self._drain()
        recorded = views.bulk_results(self.services.uow(), bulk_id)
        assert recorded is not None, "the bulk is recorded once the demo's broker has drained"
        self.echo(
            f"   one signed bulk decision {bulk_id} for {len(ids)} requests and an unknown id, results per item:"
        )
        for item in recorded["items"]:
            self.echo(f"   {item['request_id']}  {item['result']:<16} {item['status'] or '-'}")
        publisher = self.services.relay.publisher
        assert isinstance(publisher, DramatiqPublisher)
        [told] = [e for e in publisher.events if e.payload.get("bulk_id") == bulk_id]
        counts = Counter(str(item["result"]) for item in told.payload["results"])
        self.echo(
            f"   the admin tools heard it too: {told.payload['event']} on {told.routing_key},"
            f" {', '.join(f'{n} {result}' for result, n in sorted(counts.items()))}"
        )

    def _deadline(self) -> None:
        settings = self.services.settings
        self.echo(
            "13. review deadline: plan 'partner' gives 72 h; reminders at "
            f"{settings.review_reminder_hours.replace(',', ' and ')} h before, escalation to {ESCALATION} at "
            f"{settings.review_escalation_hours:g} h; the sweep runs with a fast clock (now= moments, no waiting):"
        )
        [request_id] = self._submit(
            [_request("acme", "dev@acme.example", "partner", "Acme Archive", "Archive old payments.")]
        )
        # SQLite keeps no offset: the stored moment is UTC.
        deadline = datetime.fromisoformat(str(self._details(request_id)["review_deadline_at"]))
        deadline = deadline if deadline.tzinfo else deadline.replace(tzinfo=UTC)
        self.echo(f"   acme's request {request_id} pending review, deadline {deadline:%Y-%m-%d %H:%M} UTC")
        mail_dir = Path(settings.mail_dir)
        for before in (
            timedelta(hours=23),
            timedelta(hours=3, minutes=59),
            timedelta(hours=1),
            -timedelta(seconds=1),
        ):
            moment = deadline - before
            seen = set(mail_dir.glob("*.eml"))
            expired, reminded, escalated = lifecycle.sweep_review_deadlines(
                self.services, now=_clock_at(moment)
            )
            self._drain()
            label = f"deadline {'-' if before > timedelta(0) else '+'} {_hours(abs(before))}"
            self.echo(
                f"   sweep at {label:<16} expired {expired}, reminded {reminded}, escalated {escalated};"
                f" status {self._details(request_id)['status']}"
            )
            for path in sorted(set(mail_dir.glob("*.eml")) - seen):
                message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                self.echo(f"     email to {message['To']}: {message['Subject']}")

    def _operate(self, operation: str, credential_id: str, reason: str, **extra: Any) -> None:
        producer.operate(
            self.admin_wire,
            producer.signed_operation(
                operation=operation,
                target="credential",
                target_id=credential_id,
                admin_id=ADMIN_ID,
                reason=reason,
                audience=self.prefix,
                key_id=ADMIN_KEY_ID,
                private_key=self.admin_key,
                **extra,
            ),
        )
        self._drain()

    def _credential(self, credential_id: str) -> tuple[str, str, str]:
        """Its status, the start of its client id, and until when its previous secret verifies."""
        with self.services.uow() as uow:
            c = uow.credentials.get(credential_id)
            assert c is not None
            grace = f"{c.previous_valid_until:%H:%M} UTC" if c.previous_valid_until else "-"
            return c.status.value, c.public_id[:16], grace

    def _credential_lifecycle(self) -> None:
        self.echo(
            "14. credential lifecycle: signed credentials.operate messages, then the expiry sweep on a fast clock:"
        )
        credential = self._details(self.acme_vetted)["credential"]
        assert credential is not None
        credential_id = str(credential["id"])
        _, before_id, _ = self._credential(credential_id)
        self._operate("rotate", credential_id, "Quarterly rotation.", grace_seconds=3600)
        status, after_id, grace = self._credential(credential_id)
        self.echo(
            f"   rotate acme's credential {credential_id}: client id {before_id}... -> {after_id}...,"
            f" the old secret verifies until {grace}; {status}"
        )
        expires_at = utcnow().replace(microsecond=0) + timedelta(days=10)
        self._operate("set_expiry", credential_id, "Trial ends.", expires_at=expires_at)
        self.echo(
            f"   set_expiry: it now ends at {expires_at:%Y-%m-%d %H:%M} UTC"
            f" (notices {self.services.settings.expiry_notice_days} days before)"
        )
        mail_dir = Path(self.services.settings.mail_dir)
        for before in (timedelta(days=3), -timedelta(seconds=1)):
            seen = set(mail_dir.glob("*.eml"))
            expired, noticed = lifecycle.sweep_credential_expiry(
                self.services, now=_clock_at(expires_at - before)
            )
            self._drain()
            label = f"expiry {'-' if before > timedelta(0) else '+'} {_hours(abs(before))}"
            status = self._credential(credential_id)[0]
            self.echo(f"   sweep at {label:<16} expired {expired}, noticed {noticed}; credential {status}")
            for path in sorted(set(mail_dir.glob("*.eml")) - seen):
                message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                self.echo(f"     email to {message['To']}: {message['Subject']}")

    def _console(self) -> None:
        settings = self.services.settings
        rows = views.pending_queue(self.services.uow(), now=utcnow())
        console_dir = self.workdir / "console"
        console_dir.mkdir()
        password = secrets.token_urlsafe(12)
        admins_file = console_dir / "admins.json"
        admins_file.write_text(
            json.dumps(
                [
                    {
                        "admin_id": ADMIN_ID,
                        "password_hash": auth.hash_password(password),
                        "key_file": str((self.workdir / "admin-key.pem").resolve()),
                        "key_id": ADMIN_KEY_ID,
                    }
                ],
                indent=2,
            )
        )
        env = {
            "ACCESSFLOW_DATABASE_URL": f"sqlite:///{(self.workdir / 'accessflow.db').resolve()}",
            "ACCESSFLOW_QUEUE_PREFIX": self.prefix,
            "ACCESSFLOW_CONSOLE_ADMINS_FILE": str(admins_file.resolve()),
            "ACCESSFLOW_CONSOLE_SESSION_SECRET": secrets.token_urlsafe(32),
        }
        env_file = console_dir / "console.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.echo(f"15. the review console would list {len(rows)} pending requests from the demo's database:")
        for row in rows:
            self.echo(
                f"   {row['consumer_id']:<8} {row['plan_id']:<8} {row['app_name']:<14} parked by: {row['reason']}"
            )
        self.echo(f"   its settings are in {env_file} (admins file and session secret generated there); run")
        self.echo(f"     env $(cat {env_file}) accessflow console")
        self.echo(
            f"   and open http://{settings.console_host}:{settings.console_port}/ as {ADMIN_ID}, password {password}"
        )
        self.echo(
            "   Login and reads work on the demo's SQLite file. Its approvals are published to"
            " ACCESSFLOW_BROKER_URL: deciding there needs RabbitMQ (`make services`) and `accessflow"
            " workers` on the same database, as the demo's in-memory broker ended with it."
        )


def _clock_at(moment: datetime) -> Callable[[], datetime]:
    """A clock stopped at ``moment``: the demo moves time by choosing it, never by waiting."""
    return lambda: moment


def _hours(delta: timedelta) -> str:
    minutes = round(delta.total_seconds() / 60)
    return f"{minutes // 60}h{minutes % 60:02d}" if minutes else f"{delta.total_seconds():g}s"


def bulk_approve(
    wire: producer.Wire, request_ids: list[str], private_key: Ed25519PrivateKey, *, audience: str, reason: str
) -> str:
    """Approve ``request_ids`` at once with one signed bulk decision (``access_request.bulk_decided``).

    Returns:
      The bulk's id, under which its result per request is recorded.
    """
    bulk = producer.decide_bulk(
        wire,
        producer.signed_bulk_decision(
            approve=True,
            admin_id=ADMIN_ID,
            reason=reason,
            audience=audience,
            key_id=ADMIN_KEY_ID,
            private_key=private_key,
            request_ids=request_ids,
        ),
    )
    return bulk.bulk_id
