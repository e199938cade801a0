"""The composition root: the one place that builds the engine, broker, mailer, issuer and gateway.

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
from dramatiq.middleware import Retries
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain.model import utcnow
from domain.ports import Gateway, Mailer
from infra import faults
from infra import logs as accessflow_logging
from infra.credentials import signing
from infra.credentials.issuing import LocalCredentialIssuer
from infra.credentials.sealing import FernetSealer, PortalSealedBox
from infra.db import orm
from infra.db.engine import create_engine
from infra.db.unit_of_work import SqlUnitOfWork
from infra.gateway.webhook import StandardWebhookGateway
from infra.mail.render import EmailRenderer
from infra.mail.transports import FileMailer, SmtpMailer
from infra.messaging import topology
from infra.messaging.actors import register
from infra.messaging.broker import QuorumRabbitmqBroker, make_broker, queue_declarer, record_refusals_with
from infra.messaging.delivery import DeliveryGuard
from infra.messaging.envelope import safe_text
from infra.messaging.heartbeats import Heartbeats
from infra.messaging.lifecycle import WorkerLifecycle
from infra.messaging.message_metrics import MessageMetrics
from infra.messaging.publisher import BatchConfirmPublisher, DramatiqPublisher, Publisher
from infra.messaging.relay import OutboxRelay
from infra.settings import Settings
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
    #: Where credential changes are pushed; ``None`` when ACCESSFLOW_GATEWAY_WEBHOOK_URL is unset.
    gateway: Gateway | None = None

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
    settings: Settings,
    *,
    broker: dramatiq.Broker | None = None,
    mailer: Mailer | None = None,
    gateway: Gateway | None = None,
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
    services.gateway = gateway or StandardWebhookGateway.from_settings(settings)
    if under_faults:
        services.unit_of_work = faults.CrashingUnitOfWork
    return services


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
        try:
            topology.declare(
                broker.channel,
                topology.Topology(services.settings.queue_prefix),
                queue_arguments=topology.QueueArguments.from_broker(broker),
                portal_ids=portal_ids,
            )
        finally:
            del broker.connection  # idle from now on, it would be dropped for missed heartbeats
