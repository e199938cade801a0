"""Bounding deliveries, recording why a message was dead-lettered, and telling a passing database failure.

dramatiq's Retries bounds a message that *raises*. A message that *kills* its worker
(a segfault, the OOM killer, ``kill -9``) is redelivered by RabbitMQ without any
retry being counted, and on a classic queue would loop forever. So the guard counts,
in the database, the runs of a message that started and never finished, and a message
that has started ``max_deliveries`` times without finishing is dead-lettered instead of
run again. Counting starts rather than deliveries spares the innocent messages that were
merely prefetched alongside the poison one when their worker died.

Only a redelivery is counted. A run cut short (its process died, its connection
dropped) leaves the message unacknowledged, and RabbitMQ hands it out again with the
``redelivered`` flag set and, on a quorum queue, an ``x-delivery-count`` above 0. A
first delivery (flag unset, count absent or 0) cannot have started before, so it runs
with no counter row at all: the usual message costs the guard no transaction. The
first run of a redelivered message was not counted, so its count starts at 2: a
poison message is dead-lettered after exactly as many runs as if every run had been
counted. A run that wrote a row deletes it when it ends, whatever its outcome; a run
that wrote none deletes nothing. The quorum queues' ``x-delivery-limit`` is a backstop
above this limit, for when the database itself is unreachable.

A statement that fails because the database connection died, or the database is
down or busy (a psycopg ``OperationalError``: refused connections, timeouts,
deadlocks), is a :class:`~domain.errors.TransientError` (:func:`transient_database_error`):
the message is retried with backoff, never dead-lettered at once. SQLAlchemy has
already dropped the dead connection from the pool by then.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import dramatiq
import psycopg
import sqlalchemy as sa
import structlog
from dramatiq.errors import Retry
from dramatiq.middleware import Middleware, SkipMessage
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import TransientError
from domain.model import utcnow
from infra import orm

log = structlog.get_logger()

#: The count a redelivered message starts at: its first run, which nobody counted, and this one.
FIRST_REDELIVERY_COUNT = 2


def first_delivery(message: dramatiq.MessageProxy) -> bool:
    """Whether RabbitMQ says no run of ``message`` can have started before this delivery.

    Both of its marks must say so: the ``redelivered`` flag is unset, and a quorum queue's
    ``x-delivery-count`` header (``delivery_count``, as :class:`infra.broker.EnvelopeConsumer`
    exposes it) is absent or 0. A message without the flag (the in-memory broker) or with a
    count that is not a plain integer counts as a redelivery: counting is the safe side.
    """
    redelivered = getattr(message, "redelivered", None)
    count = getattr(message, "delivery_count", None)
    return redelivered is False and (count is None or (type(count) is int and count == 0))


def transient_database_error(error: BaseException) -> TransientError | None:
    """The :class:`TransientError` that ``error`` is, if a later delivery may not meet it; else None.

    That is a statement or a connect that failed because the connection died (SQLAlchemy
    then says ``connection_invalidated`` and has dropped it from the pool), or any psycopg
    ``OperationalError``: the server is down or restarting, a statement or lock timeout,
    a deadlock, a serialization failure. The message names the error's class and SQLSTATE
    only: SQLAlchemy's text of it carries the statement's parameters, which may hold values.
    """
    cause: BaseException = error
    if isinstance(error, sa.exc.DBAPIError):
        cause = error.orig if isinstance(error.orig, BaseException) else error
        if not (error.connection_invalidated or isinstance(cause, psycopg.OperationalError)):
            return None
    elif not isinstance(error, psycopg.OperationalError):
        return None
    sqlstate = getattr(cause, "sqlstate", None)
    code = f" {sqlstate}" if isinstance(sqlstate, str) else ""
    return TransientError(f"database unavailable: {type(cause).__name__}{code}")


def count_start(
    session_factory: sessionmaker[Session], message_id: str, actor_name: str, *, first_count: int = 1
) -> int:
    """Record one more start of ``message_id``, ``first_count`` if none was recorded; return the count."""
    now = utcnow()
    with session_factory() as session, session.begin():
        dialect = session.get_bind().dialect.name
        insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(orm.deliveries)
        statement = (
            insert.values(
                message_id=message_id,
                actor_name=actor_name,
                attempts=first_count,
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
        # Redelivered messages are suspects, and run one at a time: after a crash the poison and
        # its innocent neighbours come back together, and if they kept running side by side the
        # innocents would reach the limit with it. Each is counted only once its turn has come,
        # so waiting behind the poison costs an innocent nothing. An RLock knows its owner, so a
        # thread gives back only a lock it holds, even when an exception raised into it from
        # outside (TimeLimit's) lands between acquire() and the next line.
        self.suspects = threading.RLock()
        self.local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self.local.counted = False
        if first_delivery(message):
            return  # nothing can have started before: no row, no lock
        self.suspects.acquire()
        try:
            attempts = count_start(
                self.session_factory,
                message.message_id,
                message.actor_name,
                first_count=FIRST_REDELIVERY_COUNT,
            )
        except Exception as error:
            transient = transient_database_error(error)
            if transient is None:
                raise
            raise Retry(str(transient)) from None
        self.local.counted = True  # the run's end deletes the row
        if attempts > self.max_deliveries:
            reason = (
                f"started {attempts - 1} times without finishing: it kills its worker "
                f"or outlives the time limit (limit {self.max_deliveries})"
            )
            self._dead_letter(message, reason)
            forget(self.session_factory, message.message_id)
            self.local.counted = False
            message.fail()  # the consumer nacks it, and RabbitMQ moves it to <queue>.XQ
            raise SkipMessage(reason)

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
            if getattr(self.local, "counted", False):
                self.local.counted = False
                forget(self.session_factory, message.message_id)
        finally:
            self._release()

    def _release(self) -> None:
        # Only the thread that holds the lock can give it back; any other has nothing to release.
        with contextlib.suppress(RuntimeError):
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
