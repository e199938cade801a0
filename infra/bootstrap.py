"""The composition root: the one place that builds the engine, broker, mailer and issuer.

Nothing is built at import time. A process calls :func:`build` once it boots
(the CLI per command, each dramatiq worker process through :func:`boot_workers`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import structlog
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware, Retries
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain import handlers
from domain.model import utcnow
from domain.ports import Mailer
from infra import faults
from infra import logs as accessflow_logging
from infra.credentials import signing
from infra.credentials.issuing import LocalCredentialIssuer
from infra.credentials.sealing import FernetSealer, PortalSealedBox
from infra.db import orm
from infra.db.engine import create_engine
from infra.db.unit_of_work import SqlUnitOfWork
from infra.mail.render import EmailRenderer
from infra.mail.transports import FileMailer, SmtpMailer
from infra.messaging import topology
from infra.messaging.actors import register
from infra.messaging.broker import (
    BatchConfirmPublisher,
    DramatiqPublisher,
    Publisher,
    QuorumRabbitmqBroker,
    make_broker,
    queue_declarer,
    record_refusals_with,
)
from infra.messaging.delivery import DeliveryGuard
from infra.messaging.envelope import safe_text
from infra.messaging.heartbeats import Heartbeats
from infra.messaging.message_metrics import MessageMetrics
from infra.messaging.periodic import PeriodicTask
from infra.messaging.relay import OutboxRelay
from infra.settings import Settings
from messages import routes
from workers.actors import ACTORS

log = structlog.get_logger()

#: How much of an unreadable body is kept for the operator to look at.
BODY_EXCERPT_CHARS = 2000


@dataclass
class Services:
    """Everything a handler may need, built once per process."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    broker: dramatiq.Broker
    relay: OutboxRelay
    mailer: Mailer
    issuer: LocalCredentialIssuer = field(default_factory=LocalCredentialIssuer)
    #: SqlUnitOfWork; under the fault suite, one that crashes after a commit (infra.faults).
    unit_of_work: type[SqlUnitOfWork] = SqlUnitOfWork
    portal_sealer: PortalSealedBox = field(default_factory=PortalSealedBox)

    @staticmethod
    def verify_signature(public_key: str, signature: str, data: bytes) -> bool:
        return signing.verify(public_key, signature, data)

    def uow(self) -> SqlUnitOfWork:
        return self.unit_of_work(
            self.session_factory, queue_prefix=self.settings.queue_prefix, relay=self.relay
        )

    def sealer(self) -> FernetSealer:
        keys = self.settings.seal_key.get_secret_value().split(",") if self.settings.seal_key else []
        return FernetSealer([k.strip() for k in keys if k.strip()])

    def record_malformed(
        self,
        *,
        message_id: str,
        queue_name: str,
        actor_name: str,
        reason: str,
        body: Any,
        sender: str | None = None,
        kind: str = "malformed",
    ) -> None:
        """Keep a message that cannot be processed, with its reason; a redelivery of it is recorded once.

        Any body can be recorded: what JSON cannot show is named by its type, and text
        PostgreSQL refuses (lone surrogates, NUL) is written as escapes. ``sender`` is the
        AMQP user that published it; ``kind`` is ``malformed`` or ``forged``.
        """
        if isinstance(body, str):
            text = body
        else:
            try:
                text = json.dumps(body, default=lambda value: f"<{type(value).__name__}>", ensure_ascii=False)
            except (ValueError, TypeError, RecursionError):  # a cycle, or an int too long to print
                text = f"<{type(body).__name__} that JSON cannot show>"
        values = {
            "message_id": safe_text(message_id)[:200],
            "queue_name": safe_text(queue_name)[:200],
            "actor_name": safe_text(actor_name)[:200],
            "reason": safe_text(reason)[:4000],
            "body_excerpt": safe_text(text[: BODY_EXCERPT_CHARS * 2])[:BODY_EXCERPT_CHARS],
            "received_at": utcnow(),
            "sender": safe_text(sender)[:200] if sender is not None else None,
            "kind": kind,
        }
        with self.session_factory() as session, session.begin():
            dialect = session.get_bind().dialect.name
            insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(orm.malformed_messages)
            # One statement, so two workers handed the same redelivery cannot both insert it.
            session.execute(
                insert.values(**values).on_conflict_do_nothing(
                    index_elements=[orm.malformed_messages.c.message_id]
                )
            )

    def close(self) -> None:
        if isinstance(self.mailer, SmtpMailer):  # its SMTP connections, kept open between sends
            self.mailer.close()
        self.relay.publisher.close()
        self.engine.dispose()


def build(
    settings: Settings, *, broker: dramatiq.Broker | None = None, mailer: Mailer | None = None
) -> Services:
    orm.start_mappers()
    engine = create_engine(settings)
    session_factory = sessionmaker(engine, expire_on_commit=False)
    broker = broker or make_broker(settings)
    if mailer is None:
        renderer = EmailRenderer(settings)
        mailer = (
            FileMailer(
                Path(settings.mail_dir), renderer, lease=timedelta(seconds=settings.email_lease_seconds)
            )
            if settings.mail_transport == "file"
            else SmtpMailer(settings, renderer)
        )
    publisher: Publisher = (
        BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        if isinstance(broker, RabbitmqBroker)
        else DramatiqPublisher(broker)
    )
    under_faults = faults.configured()
    if under_faults:
        publisher = faults.crashing_publisher(publisher)
    relay = OutboxRelay(session_factory, publisher, max_attempts=settings.outbox_max_attempts)
    services = Services(settings, engine, session_factory, broker, relay, mailer)
    if under_faults:
        services.unit_of_work = faults.CrashingUnitOfWork
    return services


class WorkerLifecycle(Middleware):
    """Binds ids to the log context per message; runs the outbox sweep; disposes the engine on shutdown.

    A pool that consumes the notifications queue also sweeps for emails stuck in ``sending``
    (:func:`sweep_stuck_notifications`): where the emails are sent, and so wherever they are.
    A pool that consumes the credentials queue sweeps for requests stuck in ``approved``
    (:func:`sweep_stuck_provisioning`), for the same reason.
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.tasks: list[PeriodicTask] = []

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        settings, relay = self.services.settings, self.services.relay
        sweep = timedelta(seconds=settings.outbox_sweep_seconds)
        relay.defer_marks()
        self.tasks = [
            PeriodicTask(
                "outbox-sweep", settings.outbox_sweep_seconds, lambda: relay.publish(older_than=sweep)
            ),
            PeriodicTask("outbox-marks", settings.outbox_mark_seconds, relay.mark_deferred),
            PeriodicTask(
                "outbox-prune",
                settings.outbox_prune_seconds,
                lambda: relay.prune(timedelta(hours=settings.outbox_retain_hours)),
            ),
        ]
        if consumes(worker, routes.NOTIFY.queue_name(settings.queue_prefix)):
            self.tasks.append(
                PeriodicTask(
                    "notification-sweep",
                    settings.notification_sweep_seconds,
                    lambda: sweep_stuck_notifications(self.services),
                )
            )
        if consumes(worker, routes.ISSUE.queue_name(settings.queue_prefix)):
            self.tasks.append(
                PeriodicTask(
                    "provisioning-sweep",
                    settings.provisioning_sweep_seconds,
                    lambda: sweep_stuck_provisioning(self.services),
                )
            )
        for task in self.tasks:
            task.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        for task in self.tasks:
            task.stop()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # The last messages' marks: owed ones left unmarked would be published again by a sweep.
        try:
            self.services.relay.mark_deferred()
        except Exception as error:  # the sweep of another process republishes them
            log.warning("outbox.marks_lost", error=type(error).__name__)
        self.services.close()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(message_id=message.message_id, actor=message.actor_name)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        structlog.contextvars.clear_contextvars()


def consumes(worker: dramatiq.Worker, queue_name: str) -> bool:
    """Whether ``worker`` consumes ``queue_name``: it names it, or it names no queue and takes them all."""
    whitelist = worker.consumer_whitelist
    return not whitelist or queue_name in whitelist


def sweep_stuck_notifications(services: Services) -> tuple[int, int]:
    """Re-drive the emails stuck in ``sending``, or give up on them (:func:`handlers.redrive_stuck_notifications`).

    Safe in any number of processes at once: each takes the rows no other sweep holds.

    Returns:
      How many were re-driven, and how many were marked failed.
    """
    settings = services.settings
    return handlers.redrive_stuck_notifications(
        uow=services.uow(),
        stale_after=timedelta(seconds=settings.notification_stale_seconds),
        max_attempts=settings.notification_max_attempts,
    )


def sweep_stuck_provisioning(services: Services) -> tuple[int, int]:
    """Issue again the credentials of requests stuck in ``approved``, or give up on them
    (:func:`handlers.redrive_stuck_provisioning`).

    Safe in any number of processes at once: each takes the rows no other sweep holds.

    Returns:
      How many were re-driven, and how many ended ``provisioning_failed``.
    """
    settings = services.settings
    return handlers.redrive_stuck_provisioning(
        uow=services.uow(),
        stale_after=timedelta(seconds=settings.provisioning_stale_seconds),
        max_attempts=settings.provisioning_max_attempts,
    )


def wire(services: Services) -> dramatiq.Broker:
    """Register every actor on the services' broker, on the configured queues."""
    services.broker.add_middleware(WorkerLifecycle(services))
    services.broker.add_middleware(
        DeliveryGuard(services.session_factory, services.settings.max_deliveries), before=Retries
    )
    for declared in ACTORS:
        if faults.configured():
            declared = replace(declared, fn=faults.poisoning(declared.fn))
        register(declared, services)
    record_refusals_with(services.broker, services.record_malformed)
    dramatiq.set_broker(services.broker)
    return services.broker


def boot_workers() -> None:
    """Entry point for the ``dramatiq`` command line: runs in every worker process after it starts."""
    settings = Settings()
    accessflow_logging.configure(settings.log_level, settings.log_format)
    # A thread that a reply has woken waits for the GIL until the running thread's turn ends:
    # up to 5 ms by default, at each of a message's dozen waits on PostgreSQL, RabbitMQ and
    # SMTP. Shorter turns cut the latency of a message that shares its process with busy ones,
    # and cost CPU: on the bench machine 1 ms gave about 10% less burst throughput, and half
    # the p50 latency at 80% of it (bench/README.md).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    services = build(settings)
    # Fail at boot, not on the first approved request: without the key no credential can be sealed.
    services.sealer()
    wire(services)
    observe(services)
    declare_topology(services)


def observe(services: Services) -> None:
    """With ACCESSFLOW_METRICS_PORT set, count messages and report heartbeats; the pool serves them.

    ``accessflow workers`` gives the pool its directory (ACCESSFLOW_METRICS_DIR, also
    PROMETHEUS_MULTIPROC_DIR); the HTTP endpoint is a process dramatiq forks for Heartbeats.
    """
    settings = services.settings
    if settings.metrics_port and settings.metrics_dir:
        services.broker.add_middleware(MessageMetrics())
        services.broker.add_middleware(Heartbeats(services.engine, Path(settings.metrics_dir)))


def declare_topology(services: Services) -> None:
    """Declare the exchanges, and each registered portal's events queue, with their bindings; idempotent.

    In production ``accessflow broker setup`` has made them already; declaring again lets
    a development broker (one user, no setup) work as it is, and gives a portal registered
    since the setup its queue when the workers next start.
    """
    broker = services.broker
    if isinstance(broker, QuorumRabbitmqBroker):
        with services.uow() as uow:
            portal_ids = [portal.id for portal in uow.portals.list()]
        topology.declare(
            broker.channel,
            topology.Topology(services.settings.queue_prefix),
            queue_arguments=topology.QueueArguments.from_broker(broker),
            portal_ids=portal_ids,
        )
