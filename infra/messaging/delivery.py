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

The guard fails closed. dramatiq logs and ignores any exception a ``before_process_message``
hook raises, other than a :class:`~dramatiq.middleware.MiddlewareError`, and then runs the
message: a plain ``Retry``, or a statement the database refused, would let the message run
unguarded. So every way the guard can fail is a ``MiddlewareError``: :class:`GuardRetry`
for a passing failure, :class:`GuardFailed` for any other. dramatiq then does not run the
message, and Retries sends it again with backoff, and dead-letters it once its retries
are spent. A message whose id accessflow would never give (:func:`infra.messaging.envelope.is_message_id`)
is refused before anything is written under that id: it is recorded in ``malformed_messages``
with the reason and acknowledged, or, if that cannot be recorded, dead-lettered.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import dramatiq
import psycopg
import sqlalchemy as sa
import structlog
from dramatiq.errors import Retry
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import PermanentDeliveryError, TransientError
from domain.model import utcnow
from infra.db import orm
from infra.messaging.envelope import EXCERPT_CHARS, MESSAGE_ID_RULE, body_id, is_message_id, safe_text

log = structlog.get_logger()

#: The count a redelivered message starts at: its first run, which nobody counted, and this one.
FIRST_REDELIVERY_COUNT = 2
#: Seconds a suspect waits for its turn before it is retried with backoff, its worker thread
#: freed for other messages. Well above a usual run, and below the default time limit (120 s),
#: so a waiter gives up cleanly before TimeLimit interrupts it.
SUSPECT_WAIT_SECONDS = 60.0
#: Seconds of one wait for the turn: an exception raised into the waiting thread from outside
#: (TimeLimit's) is delivered only between two waits, and a holder's death is noticed after one.
WAIT_SLICE_SECONDS = 1.0


class GuardRetry(MiddlewareError, Retry):
    """The guard cannot let a message run yet; dramatiq does not run it, and Retries sends it again.

    A ``MiddlewareError``, so that dramatiq's ``emit_before`` lets it through instead of
    logging it and running the message; a ``Retry``, so that it is logged as one line.
    """


class GuardFailed(MiddlewareError):
    """The guard failed unexpectedly; dramatiq does not run the message, and Retries sends it again."""


def first_delivery(message: dramatiq.MessageProxy) -> bool:
    """Whether RabbitMQ says no run of ``message`` can have started before this delivery.

    Both of its marks must say so: the ``redelivered`` flag is unset, and a quorum queue's
    ``x-delivery-count`` header (``delivery_count``, as :class:`infra.messaging.broker.EnvelopeConsumer`
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


class SuspectTurn:
    """The right to run as a suspect, which one thread of a process holds at a time.

    Why not a lock: a thread that took a lock and then met an exception raised into it from
    outside (TimeLimit's), or died, could leave it held forever, and every later suspect of
    the process would wait for it. Here taking the turn and recording its holder are one
    assignment, made under a short internal lock, so such an exception lands before the turn
    is taken or after it is recorded, never between. The internal lock is a C lock entered
    with ``with``, never held across I/O: CPython delivers such an exception only at a call,
    a function's start or a loop's jump, never between a C lock's ``__enter__`` and the
    block that ``__exit__`` guards. The holder gives the turn back from any of the message's
    end hooks, and again when it starts its next message (a thread runs one message at a
    time, so its earlier run is over). A thread that holds the turn and takes it again holds
    it once, not twice; a holder that has died holds nothing. Every wait is bounded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._holder: threading.Thread | None = None

    def take(self, timeout: float) -> bool:
        """Take the turn for the calling thread, waiting at most ``timeout`` seconds; whether it did."""
        me = threading.current_thread()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._held_by_other(me):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # In slices: a holder that dies without giving the turn back notifies nobody.
                self._changed.wait(min(remaining, WAIT_SLICE_SECONDS))
            self._holder = me
        return True

    def give_back(self) -> None:
        """Give the turn back, if the calling thread holds it; otherwise do nothing."""
        me = threading.current_thread()
        with self._lock:
            if self._holder is me:
                self._holder = None
                self._changed.notify()

    def _held_by_other(self, me: threading.Thread) -> bool:
        holder = self._holder
        return holder is not None and holder is not me and holder.is_alive()


def record_refused_id(session_factory: sessionmaker[Session], message: dramatiq.MessageProxy) -> str:
    """Record ``message``, whose id is refused, in ``malformed_messages``; return the id it is kept under.

    The id it is kept under is the SHA-256 of its own id, which is shown in the body
    excerpt, as much of it as fits; a redelivery of it is recorded once.
    """
    shown_id = str(message.message_id)
    kept_id = body_id(shown_id.encode("utf-8", errors="backslashreplace"))
    try:
        body = json.dumps(
            {"message_id": shown_id[:EXCERPT_CHARS], "args": message.args, "kwargs": message.kwargs},
            default=lambda value: f"<{type(value).__name__}>",
            ensure_ascii=False,
        )
    except (ValueError, TypeError, RecursionError):  # a cycle, or an int too long to print
        body = json.dumps({"message_id": shown_id[:EXCERPT_CHARS]}, ensure_ascii=False)
    values = {
        "message_id": kept_id,
        "queue_name": safe_text(str(message.queue_name))[:200],
        "actor_name": safe_text(str(message.actor_name))[:200],
        "reason": MESSAGE_ID_RULE,
        "body_excerpt": safe_text(body[: EXCERPT_CHARS * 2])[:EXCERPT_CHARS],
        "received_at": utcnow(),
        "sender": None,
        "kind": "malformed",
    }
    with session_factory() as session, session.begin():
        dialect = session.get_bind().dialect.name
        insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(orm.malformed_messages)
        session.execute(
            insert.values(**values).on_conflict_do_nothing(
                index_elements=[orm.malformed_messages.c.message_id]
            )
        )
    return kept_id


def error_name(error: BaseException) -> str:
    """The error's class, and its SQLSTATE if it has one; never its text, which may hold values."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig is not None else error
    sqlstate = getattr(cause, "sqlstate", None)
    return f"{type(cause).__name__} {sqlstate}" if isinstance(sqlstate, str) else type(cause).__name__


class DeliveryGuard(Middleware):
    """Dead-letters a message that keeps dying mid-run, and writes down why every dead letter is one.

    Must sit before Retries in the middleware list: its ``after_process_message`` then
    runs after Retries', when ``message.failed`` says whether the retries are spent.

    Parameters:
      session_factory: sessions on the database that holds the counters and dead letters.
      max_deliveries: starts without a finish after which a message is dead-lettered.
      suspect_wait_seconds: how long a suspect waits for its turn before it is retried.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        max_deliveries: int,
        *,
        suspect_wait_seconds: float = SUSPECT_WAIT_SECONDS,
    ) -> None:
        self.session_factory = session_factory
        self.max_deliveries = max_deliveries
        self.suspect_wait_seconds = suspect_wait_seconds
        # Redelivered messages are suspects, and run one at a time: after a crash the poison and
        # its innocent neighbours come back together, and if they kept running side by side the
        # innocents would reach the limit with it. Each is counted only once its turn has come,
        # so waiting behind the poison costs an innocent nothing.
        self.turn = SuspectTurn()
        self.local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self.local.counted = False
        try:
            self._admit(message)
        except MiddlewareError:
            raise  # dramatiq acts on these: a skip, or no run and a retry
        except Exception as error:
            # Anything else, dramatiq would log and then run the message unguarded.
            transient = transient_database_error(error)
            if transient is not None:
                raise GuardRetry(str(transient)) from None
            log.error("delivery_guard.failed", queue=message.queue_name, error=error_name(error))
            raise GuardFailed(f"the delivery guard failed: {error_name(error)}") from None

    def _admit(self, message: dramatiq.MessageProxy) -> None:
        # This thread's earlier message is over, whether or not its end hooks ran to the end.
        self.turn.give_back()
        if not is_message_id(message.message_id):
            self._refuse_id(message)
        if first_delivery(message):
            return  # nothing can have started before: no row, no turn
        if not self.turn.take(self.suspect_wait_seconds):
            raise GuardRetry(
                f"another redelivered message has run for over {self.suspect_wait_seconds:g} s; "
                "redelivered messages run one at a time"
            )
        self._count(message)

    def _count(self, message: dramatiq.MessageProxy) -> None:
        attempts = count_start(
            self.session_factory,
            message.message_id,
            message.actor_name,
            first_count=FIRST_REDELIVERY_COUNT,
        )
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

    def _refuse_id(self, message: dramatiq.MessageProxy) -> None:
        # The edge (infra.messaging.envelope) refuses such ids; this catches any other way in, before a
        # counter or dead letter is written under an id that does not fit, or fits only cut short.
        try:
            kept_id = record_refused_id(self.session_factory, message)
        except Exception as error:
            log.warning("message.refusal_unrecorded", queue=message.queue_name, error=error_name(error))
            message.fail()  # the consumer nacks it, and RabbitMQ moves it to <queue>.XQ
        else:
            log.warning(
                "message.malformed", queue=message.queue_name, message_id=kept_id, reason=MESSAGE_ID_RULE
            )
        raise SkipMessage(MESSAGE_ID_RULE)

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self.turn.give_back()

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
                if isinstance(exception, PermanentDeliveryError):  # Retries' throws: never retried
                    reason = f"refused for good, not retried: {describe(exception)}"
                else:
                    reason = f"failed after {retries} retries: {describe(exception)}"
                self._dead_letter(message, reason)
            if getattr(self.local, "counted", False):
                self.local.counted = False
                forget(self.session_factory, message.message_id)
        finally:
            self.turn.give_back()

    def _dead_letter(self, message: dramatiq.MessageProxy, reason: str) -> None:
        log.error("message.dead_lettered", queue=message.queue_name, actor=message.actor_name, reason=reason)
        record_dead_letter(
            self.session_factory,
            message_id=message.message_id,
            queue_name=message.queue_name,
            actor_name=message.actor_name,
            reason=reason,
        )
