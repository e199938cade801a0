"""The fault suite's moving parts: a world per case, a batch of requests, and the invariants.

A case builds a :class:`World` (its own database on the private PostgreSQL, its own
queues on the private RabbitMQ, its own SMTP sink, supervised worker pools), runs a
:class:`Batch` through it while it injects a fault, and then checks the invariants
every case shares with :func:`check_invariants`.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr
from sqlalchemy.orm import sessionmaker

from domain.model import FINAL_STATUSES, AdminKey, Status, utcnow
from infra.cli import producer
from infra.credentials import signing
from infra.credentials.sealing import generate_seal_key
from infra.db import catalogue_file, migrate, orm
from infra.db.engine import create_engine
from infra.db.unit_of_work import SqlUnitOfWork
from infra.settings import Settings
from messages.routes import DECIDE, QUEUE_ROUTES, SUBMIT
from tests import services as svc
from tests.conftest import ADMIN, ADMIN_ID, ADMIN_KEY_ID, TEST_CATALOGUE
from tests.e2e.conftest import settings_env
from tests.services import amqp_parameters, consumers_on, envelope, queue_depth

ACCESSFLOW = str(Path(sys.executable).with_name("accessflow"))

#: Request mix: (plan, products, share). Starter auto-approves, Partner waits for an admin,
#: and a mixed-auth request is invalid whatever the plan.
MIX: list[tuple[str, list[str], float]] = [
    ("starter", ["payments", "ledger"], 0.45),
    ("starter", ["identity"], 0.20),
    ("partner", ["payments"], 0.20),
    ("partner", ["identity"], 0.10),
    ("starter", ["payments", "identity"], 0.05),
]


# --- processes -----------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Pool:
    """One supervised ``accessflow workers`` pool."""

    queues: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    threads: int = 4
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [ACCESSFLOW, "workers", "--processes", "1", "--threads", str(self.threads)]
        for queue in self.queues:
            argv += ["--queues", queue]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def worker_pids(self) -> list[int]:
        """The dramatiq worker processes (the supervisor's grandchildren), not the supervisor."""
        assert self.process is not None
        children = descendants(self.process.pid)
        dramatiq_main = [p for p in children if p in _children_of(self.process.pid)]
        return [p for p in children if p not in dramatiq_main]

    def kill_workers(self) -> int:
        """``kill -9`` the worker processes; the supervisor restarts the pool. Returns how many died."""
        pids = self.worker_pids()
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop(self, timeout: float = 90) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in descendants(self.process.pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            return self.process.wait()


def _children_of(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.add(int(entry.name))
            except OSError:
                continue
    return children


# --- the SMTP side -----------------------------------------------------------------------------------


@dataclass
class FlakySmtp(svc.SmtpSink):
    """An SMTP sink that answers 4xx or drops the connection, at the given rates.

    A drop *after* DATA means the server has the message but the client never hears
    so: the one case where at-least-once must send a duplicate. Those are counted.
    """

    temporary_failure_rate: float = 0.0
    drop_before_data_rate: float = 0.0
    drop_after_data_rate: float = 0.0
    drops_after_data: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.rng.random() < self.drop_before_data_rate:
            server.transport.close()
            return "421 4.4.2 dropped on purpose"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        roll = self.rng.random()
        if roll < self.temporary_failure_rate:
            return "451 4.3.0 try again later"
        reply = await super().handle_DATA(server, session, envelope)
        if roll < self.temporary_failure_rate + self.drop_after_data_rate:
            with self.lock:
                self.drops_after_data += 1
            server.transport.close()
        return reply


@contextmanager
def flaky_smtp(**rates: float) -> Iterator[FlakySmtp]:
    from aiosmtpd.controller import Controller

    sink = FlakySmtp(port=svc.free_port(), **rates)
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


def email_kind(message: Any) -> str:
    return str(message["Message-ID"]).strip("<").split(".", 1)[0]


# --- one case's world ------------------------------------------------------------------------------------


@dataclass
class World:
    settings: Settings
    env: dict[str, str]
    smtp: FlakySmtp
    pools: list[Pool]
    logs: Path
    #: The private half of the key registered for admin :data:`ADMIN_ID`: the decider signs with it.
    admin_key: Ed25519PrivateKey = field(repr=False)

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url

    def engine(self) -> sa.Engine:
        return create_engine(self.settings)

    def start_pools(self) -> None:
        for pool in self.pools:
            pool.start()
        for route in QUEUE_ROUTES:
            name = route.queue_name(self.settings.queue_prefix)
            svc.wait_until(
                lambda n=name: consumers_on(self.broker_url, n) > 0, timeout=90, what=f"a consumer on {name}"
            )

    def stop_pools(self) -> None:
        for pool in self.pools:
            pool.stop()

    def dlq(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ACCESSFLOW, "dlq", *args], env=self.env, capture_output=True, text=True, timeout=300, check=True
        )


@contextmanager
def world(
    postgres_url: str,
    broker_url: str,
    tmp: Path,
    *,
    faults: str = "",
    smtp_rates: dict[str, float] | None = None,
    **overrides: Any,
) -> Iterator[World]:
    """A fresh database and queue prefix, an SMTP sink, a signing admin and two supervised pools."""
    with svc.fresh_database(postgres_url) as database_url, flaky_smtp(**(smtp_rates or {})) as smtp:
        migrate.upgrade(database_url)
        settings = Settings(
            database_url=database_url,
            broker_url=broker_url,
            queue_prefix=f"faults-{uuid.uuid4().hex[:8]}",
            # The documented migration mode: the batch submits contract v1, published as guest with
            # no portal. The fault suite tests crash safety; the portal boundary (v2 submissions,
            # sender checks) has its own tests (tests/e2e, tests/faults/test_broker_boundary.py).
            accept_v1_submissions=True,
            smtp_host=smtp.host,
            smtp_port=smtp.port,
            smtp_timeout_seconds=3,
            # The lease these cases were built around (it was 2 x 3 s + 5 s): now a send's deadline
            # and a lease longer than it, as settings.
            smtp_send_deadline_seconds=6,
            email_lease_seconds=11,
            seal_key=SecretStr(generate_seal_key()),
            admin_emails=[ADMIN],
            # About 15 s of retries: longer than an email's lease (11 s) after a crash.
            max_retries=10,
            min_backoff_ms=200,
            max_backoff_ms=2_000,
            outbox_sweep_seconds=1.0,
            shutdown_timeout_seconds=20,
            db_connect_timeout_seconds=2,
            restart_pause_max_seconds=2.0,
        ).model_copy(update=overrides)
        engine = create_engine(settings)
        orm.start_mappers()
        sessions = sessionmaker(engine)
        catalogue_file.load(
            catalogue_file.read(TEST_CATALOGUE),
            SqlUnitOfWork(sessions, queue_prefix=settings.queue_prefix, relay=None),
        )
        admin_key = register_admin(
            SqlUnitOfWork(sessions, queue_prefix=settings.queue_prefix, relay=None), tmp / "keys"
        )
        engine.dispose()
        env = {**settings_env(settings), "ACCESSFLOW_FAULTS": faults}
        logs = tmp / "logs"
        logs.mkdir(exist_ok=True)
        pools = [
            Pool(("requests", "decisions"), env, logs / "pool-requests.log"),
            Pool(("credentials", "notifications", "gateway"), env, logs / "pool-credentials.log"),
        ]
        w = World(settings, env, smtp, pools, logs, admin_key)
        w.start_pools()
        try:
            yield w
        finally:
            w.stop_pools()


def register_admin(uow: SqlUnitOfWork, keys: Path) -> Ed25519PrivateKey:
    """Give the world its admin: a new keypair in ``keys``, its public half registered as the main suite's is.

    Returns the private key, which signs every decision the batch publishes.
    """
    keys.mkdir(exist_ok=True)
    key_file = keys / "admin.pem"
    public_key = signing.generate_keypair(key_file)
    with uow:
        uow.admin_keys.upsert_admin(ADMIN_ID, ADMIN)
        uow.admin_keys.add_key(AdminKey(ADMIN_KEY_ID, ADMIN_ID, public_key, utcnow()))
        uow.commit()
    return signing.load_private_key(key_file)


# --- the batch ------------------------------------------------------------------------------------------


def make_payloads(size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` access requests in the proportions of :data:`MIX`, from two consumers."""
    rng = random.Random(seed)
    consumers = [
        ("acme", "dev@acme.example", "acme-checkout"),
        ("globex", "api@globex.example", "globex-backoffice"),
    ]
    payloads = []
    for i in range(size):
        plan, products, _ = rng.choices(MIX, weights=[m[2] for m in MIX])[0]
        consumer_id, email, app_id = consumers[i % 2]
        payloads.append(
            {
                "request_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "consumer": {"id": consumer_id, "email": email, "name": consumer_id.title()},
                "app_id": app_id,
                "product_ids": products,
                "plan_id": plan,
                "submitted_at": datetime.now(UTC).isoformat(),
            }
        )
    return payloads


class ResilientPublisher:
    """Publishes like a careful portal: persistent, confirmed, and retried through broker outages."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.connection: pika.BlockingConnection | None = None
        self.channel: Any = None

    def publish(self, queue_name: str, actor_name: str, payload: dict[str, Any], deadline: float) -> None:
        """Publish ``payload`` to ``queue_name`` in an envelope that names that same queue.

        The envelope is built once: a retry after a lost confirm re-publishes the very same
        message (same message id), as a portal's retry would, so the duplicate path is exercised.
        """
        body = envelope(queue_name, actor_name, payload)
        while True:
            try:
                if self.channel is None:
                    self.connection = pika.BlockingConnection(amqp_parameters(self.broker_url))
                    self.channel = self.connection.channel()
                    self.channel.confirm_delivery()
                self.channel.basic_publish(
                    "", queue_name, body, pika.BasicProperties(delivery_mode=2), mandatory=True
                )
                return
            except (pika.exceptions.AMQPError, OSError):
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # the broker is down: retry, as a portal would, until the deadline

    def close(self) -> None:
        try:
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        except Exception:  # noqa: S110 - closing a connection the broker already dropped
            pass
        self.connection, self.channel = None, None


@dataclass
class Batch:
    """``size`` requests, submitted by one thread while another decides the manual ones."""

    world: World
    size: int = 1000
    copies: int = 1
    racing_decisions: int = 0
    poison: dict[str, str] = field(default_factory=dict)  # request id -> "kill" | "raise"
    seed: int = 1
    payloads: list[dict[str, Any]] = field(default_factory=list)
    decided: dict[str, str] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    started: float = 0.0
    submitted: threading.Event = field(default_factory=threading.Event)
    stop_deciding: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not self.payloads:
            self.payloads = make_payloads(self.size, self.seed)
        self.size = len(self.payloads)

    @property
    def request_ids(self) -> list[str]:
        return [p["request_id"] for p in self.payloads]

    @property
    def healthy_ids(self) -> list[str]:
        return [r for r in self.request_ids if r not in self.poison]

    def start(self) -> None:
        self.started = time.monotonic()
        threading.Thread(target=self._guard(self._submit), name="submitter", daemon=True).start()
        threading.Thread(target=self._guard(self._decide), name="decider", daemon=True).start()

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as error:
                self.errors.append(error)

        return run

    def _submit(self) -> None:
        queue = SUBMIT.queue_name(self.world.settings.queue_prefix)
        publisher = ResilientPublisher(self.world.broker_url)
        deadline = time.monotonic() + 600
        try:
            for _ in range(self.copies):  # every copy is a new delivery of the same request
                for payload in self.payloads:
                    publisher.publish(queue, SUBMIT.actor_name, payload, deadline)
        finally:
            publisher.close()
            self.submitted.set()

    def _decide(self) -> None:
        """Decide every request that reaches review, as admins would, while the batch runs.

        Each decision is a v2 decision signed with the world's admin key for this deployment
        (its queue prefix); a racing pair is two decisions, each with its own decision id.
        """
        prefix = self.world.settings.queue_prefix
        queue = DECIDE.queue_name(prefix)
        publisher = ResilientPublisher(self.world.broker_url)
        rng = random.Random(self.seed + 1)
        engine = self.world.engine()
        racing_left = self.racing_decisions
        ids = set(self.request_ids)
        try:
            while not self.stop_deciding.is_set():
                try:
                    with engine.connect() as connection:
                        pending = (
                            connection.execute(
                                sa.select(orm.access_requests.c.id).where(
                                    orm.access_requests.c.status == Status.PENDING_REVIEW
                                )
                            )
                            .scalars()
                            .all()
                        )
                except sa.exc.OperationalError:
                    pending = []  # the database is down: the admins wait
                for request_id in pending:
                    if request_id in self.decided or request_id not in ids:
                        continue
                    choices = (
                        ["approve", "reject"]
                        if racing_left > 0
                        else [rng.choice(["approve"] * 3 + ["reject"])]
                    )
                    racing_left -= racing_left > 0
                    rng.shuffle(choices)
                    for decision in choices:
                        signed = producer.signed_decision(
                            request_id=request_id,
                            approve=decision == "approve",
                            admin_id=ADMIN_ID,
                            reason=f"{decision}d by the fault suite",
                            audience=prefix,
                            key_id=ADMIN_KEY_ID,
                            private_key=self.world.admin_key,
                        )
                        publisher.publish(
                            queue, DECIDE.actor_name, signed.model_dump(mode="json"), time.monotonic() + 600
                        )
                    self.decided[request_id] = "+".join(choices)
                self.stop_deciding.wait(0.2)
        finally:
            publisher.close()
            engine.dispose()

    def final_count(self) -> int:
        engine = self.world.engine()
        try:
            with engine.connect() as connection:
                return int(
                    connection.execute(
                        sa.select(sa.func.count())
                        .select_from(orm.access_requests)
                        .where(orm.access_requests.c.status.in_([s.value for s in FINAL_STATUSES]))
                    ).scalar_one()
                )
        except sa.exc.OperationalError:
            return -1
        finally:
            engine.dispose()

    def wait_until_final(self, timeout: float = 600) -> float:
        """Wait until every healthy request is final; return the seconds since the batch started."""
        expected = len(self.healthy_ids)
        svc.wait_until(
            lambda: self.errors or (self.submitted.is_set() and self.final_count() >= expected),
            timeout=timeout,
            interval=0.5,
            what=f"{expected} requests to reach a final state",
        )
        if self.errors:
            raise self.errors[0]
        self.stop_deciding.set()
        return time.monotonic() - self.started


# --- the invariants -----------------------------------------------------------------------------------------


@dataclass
class Figures:
    case: str
    requests: int
    lost: int
    duplicated: int
    seconds: float
    recovery_seconds: float | None = None
    notes: str = ""

    def line(self) -> str:
        recovery = f"{self.recovery_seconds:.1f}s" if self.recovery_seconds is not None else "-"
        return (
            f"FAULT CASE {self.case}: requests={self.requests} lost={self.lost} duplicated={self.duplicated} "
            f"time={self.seconds:.1f}s recovery={recovery} {self.notes}"
        )


def check_invariants(
    batch: Batch, *, allowed_duplicate_emails: int = 0, expected_dead_letters: int = 0
) -> tuple[int, int]:
    """Assert every invariant of the fault suite; return (lost, duplicated) for the figures."""
    w = batch.world
    prefix = w.settings.queue_prefix
    healthy = set(batch.healthy_ids)
    engine = w.engine()
    try:
        # Queues drain: nothing waits in a queue or its delay queue.
        for route in QUEUE_ROUTES:
            for name in (route.queue_name(prefix), route.queue_name(prefix) + ".DQ"):
                svc.wait_until(
                    lambda n=name: queue_depth(w.broker_url, n) == 0, timeout=120, what=f"{name} to drain"
                )
        with engine.connect() as connection:
            svc.wait_until(
                lambda: (
                    connection.execute(
                        sa.select(sa.func.count())
                        .select_from(orm.outbox)
                        .where(orm.outbox.c.sent_at.is_(None))
                    ).scalar_one()
                    == 0
                ),
                timeout=60,
                what="the outbox to drain",
            )
            statuses = dict(
                connection.execute(sa.select(orm.access_requests.c.id, orm.access_requests.c.status)).all()
            )
            credential_counts = Counter(
                connection.execute(sa.select(orm.credentials.c.request_id)).scalars().all()
            )
            audits: dict[str, list[tuple[str | None, str]]] = {}
            for request_id, from_status, to_status in connection.execute(
                sa.select(
                    orm.audit_log.c.request_id, orm.audit_log.c.from_status, orm.audit_log.c.to_status
                ).order_by(orm.audit_log.c.id)
            ):
                audits.setdefault(request_id, []).append((from_status, to_status))
            applied = Counter(
                connection.execute(
                    sa.select(orm.decisions.c.request_id).where(orm.decisions.c.outcome == "applied")
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()

    lost = [r for r in healthy if Status(statuses.get(r, "submitted")) not in FINAL_STATUSES]
    assert not lost, f"{len(lost)} requests not final, e.g. {lost[:3]}"
    for request_id in healthy:
        status = Status(statuses[request_id])
        want = 1 if status is Status.PROVISIONED else 0
        assert credential_counts[request_id] == want, (
            f"{request_id} is {status} with {credential_counts[request_id]} credentials"
        )
        chain = audits[request_id]
        assert chain[0] == (None, "submitted") and chain[-1][1] == status.value, f"{request_id}: {chain}"
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chain)), f"{request_id}: broken chain {chain}"
        assert applied[request_id] <= 1

    # A decision email may still be on its way (a retry waiting out its backoff): wait for it, with a
    # deadline, before counting. One that never comes fails the wait, and so the case.
    def decision_kind(request_id: str) -> str | None:
        return {Status.PROVISIONED: "approve", Status.REJECTED: "reject"}.get(Status(statuses[request_id]))

    def missing_emails() -> list[str]:
        sent = {(m["X-Accessflow-Request-Id"], email_kind(m)) for m in w.smtp.received()}
        return [r for r in healthy if decision_kind(r) and (r, decision_kind(r)) not in sent]

    svc.wait_until(lambda: not missing_emails(), timeout=180, interval=0.5, what="every decision email")
    emails = Counter((m["X-Accessflow-Request-Id"], email_kind(m)) for m in w.smtp.received())
    engine = w.engine()
    try:
        with engine.connect() as connection:
            attempts = {
                (request_id, kind): n
                for request_id, kind, n in connection.execute(
                    sa.select(
                        orm.notifications.c.request_id, orm.notifications.c.kind, orm.notifications.c.attempts
                    )
                )
            }
    finally:
        engine.dispose()
    duplicates = sum(n - 1 for n in emails.values() if n > 1)
    for request_id in healthy:
        status = Status(statuses[request_id])
        for kind in ("approve", "reject"):
            got = emails[(request_id, kind)]
            if kind == decision_kind(request_id):
                assert got >= 1, f"{request_id} ({status}) got no {kind} email"
            else:
                assert got == 0, f"{request_id} ({status}) got {got} {kind} emails"
    duplicated = {key: (n, attempts.get(key)) for key, n in emails.items() if n > 1}
    # Every connection the sink dropped after taking DATA is a send the client could not know succeeded.
    allowed_duplicate_emails += w.smtp.drops_after_data
    assert duplicates <= allowed_duplicate_emails, (
        f"{duplicates} duplicate emails, {allowed_duplicate_emails} allowed; (copies, attempts): {duplicated}"
    )
    # A duplicate is only ever the resend of an attempt that was interrupted after the server had
    # the email: more copies than recorded attempts would mean a send we did not record.
    for (request_id, kind), copies in emails.items():
        recorded = attempts.get((request_id, kind), 0)
        assert copies <= recorded, f"{copies} {kind} emails for {request_id}, {recorded} recorded attempts"

    def dead_letters() -> int:
        return sum(queue_depth(w.broker_url, route.queue_name(prefix) + ".XQ") for route in QUEUE_ROUTES)

    # A poison message may still be serving its retries: give it until its last one.
    svc.wait_until(
        lambda: dead_letters() >= expected_dead_letters, timeout=120, interval=0.5, what="dead letters"
    )
    dead = dead_letters()
    assert dead == expected_dead_letters, (
        f"{dead} dead letters, expected {expected_dead_letters}:\n{w.dlq('list').stdout}"
    )
    extra_credentials = sum(max(0, n - 1) for n in credential_counts.values())
    return len(lost), duplicates + extra_credentials
