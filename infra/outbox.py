"""The transactional outbox and its relay.

A handler's follow-up commands are inserted into ``outbox`` in the handler's own
transaction. After the commit the relay publishes them (with publisher confirms on
RabbitMQ) and marks them sent; a row is marked only after the broker confirmed it.
A crash between the confirm and the mark republishes the row later, and the
consumers, being idempotent, absorb the duplicate. Workers also sweep for rows a
crashed process left behind.

The relay never holds a transaction, nor a row lock, while it speaks to the broker:
every statement of its own commits by itself (autocommit), so a slow or dead broker
leaves no backend "idle in transaction" and no row locked. Two paths lead to the broker:

- Right after a handler's commit, :meth:`OutboxRelay.publish_quietly` publishes the rows
  that handler just wrote, from memory: no other process takes a row that young (the
  sweep waits for rows older than its interval), so they need no lock and no read.
  One statement then marks the confirmed ones sent.
- The sweep (:meth:`OutboxRelay.publish`) claims a batch with one statement, setting
  ``claimed_until`` on rows nobody holds (``FOR UPDATE SKIP LOCKED`` only for the length
  of that statement), publishes it, and marks it with one statement. Another worker's
  sweep skips claimed rows; a claim whose holder died runs out, and the rows are swept again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain.commands import Command
from domain.events import PortalEvent
from domain.model import utcnow
from infra import orm
from infra.broker import Outgoing, Publisher
from infra.faults import crash_point
from infra.repositories import insert_rows, rows_parameters, run
from infra.topology import Topology
from messages.events import RequestEvent
from messages.routes import route_for_command

log = structlog.get_logger()

#: Rows published per batch, and so per marking statement.
BATCH_SIZE = 200
#: Rows marked sent per statement by :meth:`OutboxRelay.mark_deferred`.
MARK_BATCH_SIZE = 1000
#: Deferred marks a process keeps owing while the database refuses them; older ones are
#: left to the sweep, so that an outage does not grow a worker's memory without bound.
MAX_DEFERRED_MARKS = 100_000
#: How long a sweep's claim on its rows lasts. Longer than one publish can take
#: (``BatchConfirmPublisher.CONFIRM_TIMEOUT``, connecting included), so no other sweep takes them meanwhile;
#: if the claimer dies, its rows wait this long before another worker sweeps them.
CLAIM_SECONDS = 60.0


class UnconfirmedPublish(Exception):
    """The broker did not confirm every message of a batch; the rest stay in the outbox for the sweep."""


class SqlOutbox:
    """The outbox as the handlers see it: ``put`` and ``announce`` add a row to the open transaction.

    ``added`` keeps each row as the message it becomes, so that the relay can publish it
    after the commit without reading it back. The rows are written when the unit of work
    commits (:meth:`flush`), all of them with one statement.
    """

    def __init__(self, session: Session, queue_prefix: str) -> None:
        self.session = session
        self.queue_prefix = queue_prefix
        self.added: list[Outgoing] = []

    def put(self, command: Command) -> None:
        route, payload = route_for_command(command)
        self.added.append(
            Outgoing(route.queue_name(self.queue_prefix), route.actor_name, payload, str(uuid.uuid4()))
        )

    def announce(self, event: PortalEvent) -> None:
        message = RequestEvent.of(event)
        self.added.append(
            Outgoing(
                queue_name="",
                actor_name="",
                payload=message.model_dump(mode="json", exclude_none=True),
                message_id=message.event_id,
                exchange=Topology(self.queue_prefix).events_exchange,
                routing_key=message.routing_key(),
            )
        )

    def flush(self) -> None:
        """Write every row added since the last commit, in one statement of the open transaction."""
        if not self.added:
            return
        now = utcnow()
        # A microsecond apart: the sweep publishes by ``created_at``, so rows keep the
        # order the handler added them in (a portal's events, say) when read back.
        rows = [
            _OutboxRow(
                m.message_id,
                m.queue_name,
                m.actor_name,
                m.payload,
                now + i * _TICK,
                m.exchange,
                m.routing_key,
            )
            for i, m in enumerate(self.added)
        ]
        run(
            self.session,
            insert_rows(orm.outbox, _OutboxRow._fields, len(rows), "o"),
            rows_parameters(rows, _OutboxRow._fields, "o"),
        )


_TICK = timedelta(microseconds=1)


class _OutboxRow(NamedTuple):
    """An outbox row as written: its fields are the columns, in order."""

    id: str
    queue_name: str
    actor_name: str
    payload: Any
    created_at: datetime
    exchange: str
    routing_key: str | None


class OutboxRelay:
    """Publishes committed outbox rows and marks them sent.

    By default each publish marks its rows at once. A worker pool calls :meth:`defer_marks`
    instead: rows published right after their commit are then marked by :meth:`mark_deferred`,
    which a timer runs every fraction of a second, all of a process's rows in one statement.
    That spares each handler a transaction of its own. A mark that never comes (the process
    died) costs a duplicate publish by the sweep, which the consumers absorb, as after a
    crash between a confirm and its mark; the timer's interval is kept far below the
    sweep's, so a row waiting for its mark is never swept.
    """

    def __init__(self, session_factory: sessionmaker[Session], publisher: Publisher) -> None:
        self.session_factory = session_factory
        self.publisher = publisher
        bind = session_factory.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("the outbox relay needs a session factory bound to an engine")
        # Each statement commits by itself: no transaction stays open while the broker answers.
        self.engine = bind.execution_options(isolation_level="AUTOCOMMIT")
        self._deferring = False
        self._deferred: list[str] = []
        self._deferred_lock = threading.Lock()

    def defer_marks(self) -> None:
        """Mark rows published after their commit in batches, by :meth:`mark_deferred`, from now on."""
        self._deferring = True

    def mark_deferred(self) -> int:
        """Mark sent every confirmed row whose mark was deferred: one statement per batch of rows.

        On failure the rows stay owed (up to :data:`MAX_DEFERRED_MARKS`; beyond that the
        oldest are left to the sweep, which republishes them) and the error is raised.

        Returns:
          How many rows were marked.
        """
        with self._deferred_lock:
            owed, self._deferred = self._deferred, []
        for start in range(0, len(owed), MARK_BATCH_SIZE):
            batch = owed[start : start + MARK_BATCH_SIZE]
            try:
                self._mark_published(batch)
            except Exception:
                with self._deferred_lock:
                    self._deferred[:0] = owed[start:]
                    del self._deferred[:-MAX_DEFERRED_MARKS]
                raise
        return len(owed)

    def publish_quietly(self, messages: Sequence[Outgoing]) -> None:
        """Publish rows right after the commit that wrote them; on failure leave them for the sweep."""
        try:
            self.publish_committed(messages)
        except Exception as error:  # the sweep retries; the handler's work is already committed
            log.warning("outbox.publish_deferred", rows=len(messages), error=type(error).__name__)

    def publish_committed(self, messages: Sequence[Outgoing]) -> int:
        """Publish rows this thread has just committed, as they were written, and mark the confirmed ones.

        When marks are deferred (:meth:`defer_marks`), a batch confirmed whole is owed its
        mark instead, for :meth:`mark_deferred`; a batch with a row unconfirmed is marked now.

        No lock and no read: only this thread knows of rows this young, since the sweep
        takes rows older than its interval. Should this publish outlast that interval (a
        stalled broker), a sweep may publish a row too; the consumers absorb the duplicate.

        Returns:
          How many rows were published and marked sent (or owed their marks).

        Raises:
          UnconfirmedPublish: some were not confirmed; they stay unsent, for the sweep.
        """
        published = 0
        for start in range(0, len(messages), BATCH_SIZE):
            batch = messages[start : start + BATCH_SIZE]
            confirmed = self.publisher.publish_batch(batch)
            crash_point("relay_after_publish")  # confirmed but not yet marked: resent later
            ids = [message.message_id for message in batch]
            if len(confirmed) < len(ids):
                self._mark(ids, confirmed, attempts=orm.outbox.c.attempts + 1)
            elif self._deferring:
                with self._deferred_lock:
                    self._deferred.extend(ids)
            else:
                self._mark_published(ids)
            published += _count_or_raise(ids, confirmed)
        return published

    def publish(self, ids: Sequence[str] | None = None, *, older_than: timedelta | None = None) -> int:
        """Publish unsent rows: the given ones, or every one older than ``older_than``.

        Rows another process holds right now (claimed, or locked by its claim) are
        skipped, not waited for. Each batch is claimed with one statement, published
        outside any transaction, and marked with one statement.

        Returns:
          How many rows were published and marked sent.

        Raises:
          UnconfirmedPublish: some were not confirmed; they stay unsent, for the next sweep.
        """
        published = 0
        while True:
            claimed_until, rows = self._claim(ids, older_than)
            if not rows:
                return published
            messages = [
                Outgoing(
                    row.queue_name,
                    row.actor_name,
                    row.payload,
                    row.id,
                    exchange=row.exchange,
                    routing_key=row.routing_key,
                )
                for row in rows
            ]
            confirmed = self.publisher.publish_batch(messages)
            crash_point("relay_after_publish")  # confirmed but not yet marked: resent later
            row_ids = [row.id for row in rows]
            # Unconfirmed rows are let go at once, for the next sweep, unless another worker's
            # claim has replaced ours meanwhile (ours ran out): that one is not ours to end.
            c = orm.outbox.c
            release = sa.case((c.claimed_until == claimed_until, sa.null()), else_=c.claimed_until)
            self._mark(row_ids, confirmed, claimed_until=release)
            published += _count_or_raise(row_ids, confirmed)
            if len(rows) < BATCH_SIZE:
                return published

    def _claim(
        self, ids: Sequence[str] | None, older_than: timedelta | None
    ) -> tuple[datetime, list[sa.Row[Any]]]:
        """Claim up to a batch of unsent rows nobody holds, in one committed statement.

        The attempt is counted here, so a worker that dies while publishing still counts.
        """
        now = utcnow()
        claimed_until = now + timedelta(seconds=CLAIM_SECONDS)
        c = orm.outbox.c
        free = (
            sa.select(c.id)
            .where(c.sent_at.is_(None), sa.or_(c.claimed_until.is_(None), c.claimed_until < now))
            .order_by(c.created_at)
            .limit(BATCH_SIZE)
            .with_for_update(skip_locked=True)
        )
        if ids is not None:
            free = free.where(c.id.in_(ids))
        if older_than is not None:
            free = free.where(c.created_at < now - older_than)
        claim = (
            orm.outbox.update()
            .where(c.id.in_(free.scalar_subquery()))
            .values(claimed_until=claimed_until, attempts=c.attempts + 1)
            .returning(c.id, c.queue_name, c.actor_name, c.payload, c.exchange, c.routing_key, c.created_at)
        )
        with self.engine.connect() as connection:
            rows = list(connection.execute(claim).all())
        rows.sort(key=lambda row: row.created_at)  # RETURNING keeps no order; publish oldest first
        return claimed_until, rows

    def _mark_published(self, ids: list[str]) -> None:
        """Mark rows published after their commit sent, counting the attempt: the usual mark.

        One statement, built once for any number of rows.
        """
        with self.engine.connect() as connection:
            connection.execute(_MARK_PUBLISHED, {"ids": ids, "now": utcnow()})

    def _mark(self, ids: list[str], confirmed: set[str], **values: sa.ColumnElement[Any]) -> None:
        """Mark the confirmed ones of ``ids`` sent, and set ``values`` on all of them: one statement."""
        c = orm.outbox.c
        sent = [row_id for row_id in ids if row_id in confirmed]
        # A row that a duplicate publish marked first keeps its time.
        sent_at = sa.func.coalesce(c.sent_at, utcnow())
        if len(sent) == len(ids):
            values["sent_at"] = sent_at
        elif sent:
            values["sent_at"] = sa.case((c.id.in_(sent), sent_at), else_=c.sent_at)
        with self.engine.connect() as connection:
            connection.execute(orm.outbox.update().where(c.id.in_(ids)).values(**values))


_MARK_PUBLISHED: Final = (
    orm.outbox.update()
    .where(orm.outbox.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(
        sent_at=sa.func.coalesce(orm.outbox.c.sent_at, sa.bindparam("now", type_=orm.Timestamp)),
        attempts=orm.outbox.c.attempts + 1,
    )
)


def _count_or_raise(ids: list[str], confirmed: set[str]) -> int:
    """How many of ``ids`` were confirmed; raises :class:`UnconfirmedPublish` unless all were."""
    sent = sum(1 for row_id in ids if row_id in confirmed)
    if sent < len(ids):
        raise UnconfirmedPublish(f"{len(ids) - sent} of {len(ids)} outbox rows not confirmed")
    return sent
