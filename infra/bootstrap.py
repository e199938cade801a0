"""The composition root: the one place that builds the engine, broker, mailer and issuer.

Nothing is built at import time. A process calls :func:`build` once it boots
(the CLI per command, each dramatiq worker process through :func:`boot_workers`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import sqlalchemy as sa
import structlog
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware, Retries
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain.model import utcnow
from domain.ports import Mailer
from infra import logging as accessflow_logging
from infra import orm
from infra.broker import BatchConfirmPublisher, DramatiqPublisher, PeriodicTask, Publisher, make_broker
from infra.credentials import FernetSealer, LocalCredentialIssuer
from infra.delivery import DeliveryGuard
from infra.email import EmailRenderer, FileMailer, SmtpMailer
from infra.outbox import OutboxRelay
from infra.settings import Settings
from infra.unit_of_work import SqlUnitOfWork

log = structlog.get_logger()

#: How much of an unreadable body is kept for the operator to look at.
BODY_EXCERPT_CHARS = 2000


def create_engine(settings: Settings) -> Engine:
    url = sa.make_url(settings.database_url)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": settings.db_connect_timeout_seconds,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}"
            f" -c lock_timeout={settings.db_statement_timeout_ms}",
        }
        return sa.create_engine(
            url, connect_args=connect_args, pool_pre_ping=True, pool_size=5, max_overflow=5
        )
    return sa.create_engine(url, connect_args={"check_same_thread": False})


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

    def uow(self) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.session_factory, queue_prefix=self.settings.queue_prefix, relay=self.relay)

    def sealer(self) -> FernetSealer:
        keys = self.settings.seal_key.get_secret_value().split(",") if self.settings.seal_key else []
        return FernetSealer([k.strip() for k in keys if k.strip()])

    def record_malformed(
        self, *, message_id: str, queue_name: str, actor_name: str, reason: str, body: Any
    ) -> None:
        """Keep an unreadable message with its reason; a redelivery of it is recorded once."""
        excerpt = body if isinstance(body, str) else json.dumps(body, default=str, ensure_ascii=False)
        with self.session_factory() as session, session.begin():
            exists = session.execute(
                sa.select(orm.malformed_messages.c.id).where(
                    orm.malformed_messages.c.message_id == message_id
                )
            ).first()
            if exists is None:
                session.execute(
                    orm.malformed_messages.insert().values(
                        message_id=message_id,
                        queue_name=queue_name,
                        actor_name=actor_name,
                        reason=reason[:4000],
                        body_excerpt=excerpt[:BODY_EXCERPT_CHARS],
                        received_at=utcnow(),
                    )
                )

    def close(self) -> None:
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
            FileMailer(Path(settings.mail_dir), renderer)
            if settings.mail_transport == "file"
            else SmtpMailer(settings, renderer)
        )
    publisher: Publisher = (
        BatchConfirmPublisher(
            settings.broker_url, declare=lambda queue: broker.declare_queue(queue, ensure=True)
        )
        if isinstance(broker, RabbitmqBroker)
        else DramatiqPublisher(broker)
    )
    relay = OutboxRelay(session_factory, publisher)
    return Services(settings, engine, session_factory, broker, relay, mailer)


class WorkerLifecycle(Middleware):
    """Binds ids to the log context per message; runs the outbox sweep; disposes the engine on shutdown."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.sweeper: PeriodicTask | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        interval = self.services.settings.outbox_sweep_seconds
        self.sweeper = PeriodicTask(
            "outbox-sweep",
            interval,
            lambda: self.services.relay.publish(older_than=timedelta(seconds=interval)),
        )
        self.sweeper.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
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


def wire(services: Services) -> dramatiq.Broker:
    """Register every actor on the services' broker, on the configured queues."""
    from workers.registry import register_all

    services.broker.add_middleware(WorkerLifecycle(services))
    services.broker.add_middleware(
        DeliveryGuard(services.session_factory, services.settings.max_deliveries), before=Retries
    )
    register_all(services)
    dramatiq.set_broker(services.broker)
    return services.broker


def boot_workers() -> None:
    """Entry point for the ``dramatiq`` command line: runs in every worker process after it starts."""
    settings = Settings()
    accessflow_logging.configure(settings.log_level, settings.log_format)
    services = build(settings)
    # Fail at boot, not on the first approved request: without the key no credential can be sealed.
    services.sealer()
    wire(services)
