"""Bounding deliveries, and recording why a message was dead-lettered.

dramatiq's Retries bounds a message that *raises*. A message that *kills* its worker
(a segfault, the OOM killer, ``kill -9``) is redelivered by RabbitMQ without any
retry being counted, and on a classic queue would loop forever. So before each run
the message's start is counted in the database, in a transaction of its own; the
run's end removes the count. A message that has started ``max_deliveries`` times
without ever finishing is dead-lettered instead of run again. Counting starts rather
than deliveries spares the innocent messages that were merely prefetched alongside
the poison one when their worker died. The quorum queues' ``x-delivery-limit`` is a
backstop above this limit, for when the database itself is unreachable.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware, SkipMessage
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from domain.model import utcnow
from infra import orm

log = structlog.get_logger()


def count_start(session_factory: sessionmaker[Session], message_id: str, actor_name: str) -> int:
    """Record one more start of ``message_id``; return how many there have been."""
    now = utcnow()
    with session_factory() as session, session.begin():
        dialect = session.get_bind().dialect.name
        insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(orm.deliveries)
        statement = (
            insert.values(
                message_id=message_id,
                actor_name=actor_name,
                attempts=1,
                first_started_at=now,
                last_started_at=now,
            )
            .on_conflict_do_update(
                index_elements=[orm.deliveries.c.message_id],
                set_={"attempts": orm.deliveries.c.attempts + 1, "last_started_at": now},
            )
            .returning(orm.deliveries.c.attempts)
        )
        return int(session.execute(statement).scalar_one())


def forget(session_factory: sessionmaker[Session], message_id: str) -> None:
    with session_factory() as session, session.begin():
        session.execute(orm.deliveries.delete().where(orm.deliveries.c.message_id == message_id))


def record_dead_letter(
    session_factory: sessionmaker[Session], *, message_id: str, queue_name: str, actor_name: str, reason: str
) -> None:
    with session_factory() as session, session.begin():
        session.execute(
            orm.dead_letters.insert().values(
                message_id=message_id,
                queue_name=queue_name,
                actor_name=actor_name,
                reason=reason[:2000],
                dead_lettered_at=utcnow(),
            )
        )


def describe(exception: BaseException) -> str:
    """The exception's type and message, on one line; never a traceback (it may hold values)."""
    text = " ".join(str(exception).split())
    return f"{type(exception).__name__}: {text}"[:500] if text else type(exception).__name__


class DeliveryGuard(Middleware):
    """Dead-letters a message that keeps dying mid-run, and writes down why every dead letter is one.

    Must sit before Retries in the middleware list: its ``after_process_message`` then
    runs after Retries', when ``message.failed`` says whether the retries are spent.
    """

    def __init__(self, session_factory: sessionmaker[Session], max_deliveries: int) -> None:
        self.session_factory = session_factory
        self.max_deliveries = max_deliveries
        # Messages that were running when their process died are suspects, and run one at a
        # time: after a crash the poison and its innocent neighbours come back together, and
        # if they kept running side by side the innocents would reach the limit with it.
        self.suspects = threading.Lock()
        self.local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        attempts = count_start(self.session_factory, message.message_id, message.actor_name)
        if attempts > self.max_deliveries:
            reason = (
                f"started {attempts - 1} times without finishing: it kills its worker "
                f"or outlives the time limit (limit {self.max_deliveries})"
            )
            self._dead_letter(message, reason)
            forget(self.session_factory, message.message_id)
            message.fail()  # the consumer nacks it, and RabbitMQ moves it to <queue>.XQ
            raise SkipMessage(reason)
        if attempts > 1:
            self.suspects.acquire()
            self.local.holds_suspect_lock = True

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self._release()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        try:
            if exception is not None and message.failed:
                retries = message.options.get("retries", 0)
                self._dead_letter(message, f"failed after {retries} retries: {describe(exception)}")
            forget(self.session_factory, message.message_id)
        finally:
            self._release()

    def _release(self) -> None:
        if getattr(self.local, "holds_suspect_lock", False):
            self.local.holds_suspect_lock = False
            self.suspects.release()

    def _dead_letter(self, message: dramatiq.MessageProxy, reason: str) -> None:
        log.error("message.dead_lettered", queue=message.queue_name, actor=message.actor_name, reason=reason)
        record_dead_letter(
            self.session_factory,
            message_id=message.message_id,
            queue_name=message.queue_name,
            actor_name=message.actor_name,
            reason=reason,
        )
