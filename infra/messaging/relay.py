"""The transactional outbox's relay: publishing the rows a handler committed.

A handler's follow-up commands are inserted into ``outbox`` in the handler's own
transaction (:mod:`infra.db.outbox`). After the commit the relay publishes them (with publisher confirms on
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

A row the broker refuses (unroutable, or the one message on which it closed the channel) does
not end the sweep: it stays claimed, skipped, until the sweep has gone through every other
row, and its ``attempts`` and ``last_error`` say how often and why. After
``max_attempts`` tries it is parked (``parked_at``), out of every sweep's way, until an
operator puts it back (``accessflow outbox retry``). A broker that does not answer at all
(connection lost, confirms timed out) says nothing about the rows: that try is not counted,
and the sweep stops until the next tick. Sent rows are pruned by age (:meth:`OutboxRelay.prune`),
in bounded batches that several relays can run at once.

The sweep runs as a thread in every worker pool and, so that rows a crash left behind are
published while no pool runs, as its own process, ``accessflow relay`` (:func:`run_relay`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain.model import utcnow
from infra.db import orm
from infra.messaging.publisher import ExplainingPublisher, Outgoing, Publisher, PublishOutcome

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
#: Tries of a row the broker refuses before the sweep parks it (ACCESSFLOW_OUTBOX_MAX_ATTEMPTS).
MAX_ATTEMPTS = 10
#: Sent rows deleted per statement by :meth:`OutboxRelay.prune`: short statements and short
#: row locks, so pruning never holds up the marks, nor another relay pruning at the same time.
PRUNE_BATCH_SIZE = 1000


class UnconfirmedPublish(Exception):
    """The broker did not confirm every message of a batch; the rest stay in the outbox for the sweep."""

    def __init__(self, message: str, published: int = 0) -> None:
        super().__init__(message)
        #: How many rows the sweep published and marked nonetheless.
        self.published = published


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

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        publisher: Publisher,
        *,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.session_factory = session_factory
        self.publisher = publisher
        self.max_attempts = max_attempts
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
        skipped, not waited for, and so are parked ones. Each batch is claimed with one
        statement, published outside any transaction, and marked with one statement.
        A row the broker refuses is recorded and skipped, and the sweep goes on with the
        rest; it is let go at the end of the sweep, or parked after ``max_attempts`` tries.
        A broker that does not answer ends the sweep.

        Returns:
          How many rows were published and marked sent.

        Raises:
          UnconfirmedPublish: some were not confirmed; they stay unsent, for the next sweep
            (or parked). Its ``published`` says how many were.
        """
        sweep = _Sweep()
        try:
            while True:
                claimed_until, rows = self._claim(ids, older_than, skip=sweep.held)
                if not rows:
                    break
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
                outcome = self._publish_isolating(messages)
                self._settle(rows, outcome, claimed_until, sweep)
                if sweep.unanswered:
                    break  # the broker is not answering: the next tick tries again
                if len(rows) < BATCH_SIZE:
                    break
        finally:
            self._release(sweep)
        unsent = len(sweep.held) + sweep.unanswered
        if unsent:
            raise UnconfirmedPublish(
                f"{unsent} outbox rows not confirmed ({sweep.parked} parked), {sweep.published} published",
                published=sweep.published,
            )
        return sweep.published

    def _publish_isolating(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        """Publish ``messages``; when the broker ends the batch over one of them, find which, by halves.

        A broker that closes the channel (no such exchange, access refused, too large) leaves
        every message of the batch unanswered, the innocent ones too. Publishing each half
        again confirms the innocent ones and narrows the refusal down to the one message that
        caused it: about 2 x log2(batch) small publishes, and only when the broker did that.
        """
        outcome = self._publish_batch(messages)
        answered = outcome.confirmed | outcome.refused.keys() | outcome.nacked
        rest = [m for m in messages if m.message_id not in answered]
        if not rest or not outcome.closed_by_broker:
            return outcome
        why = outcome.unanswered or "the broker closed the channel"
        if len(rest) == 1:
            return replace(outcome, refused={**outcome.refused, rest[0].message_id: why}, unanswered=None)
        merged = replace(outcome, unanswered=None, closed_by_broker=False)
        middle = len(rest) // 2
        for half in (rest[:middle], rest[middle:]):
            if merged.unanswered is not None:  # the broker stopped answering meanwhile: leave the rest
                break
            merged = _merge(merged, self._publish_isolating(half))
        answered = merged.confirmed | merged.refused.keys() | merged.nacked
        if merged.unanswered is None and any(m.message_id not in answered for m in rest):
            merged = replace(merged, unanswered=why)
        return merged

    def _publish_batch(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        if isinstance(self.publisher, ExplainingPublisher):
            return self.publisher.publish_explained(messages)
        # A publisher that says only what it confirmed: when it confirmed some, the broker was
        # there, and the others were refused for themselves; when none, nothing is known.
        confirmed = self.publisher.publish_batch(messages)
        unconfirmed = [m.message_id for m in messages if m.message_id not in confirmed]
        if not unconfirmed:
            return PublishOutcome(confirmed)
        if confirmed:
            return PublishOutcome(
                confirmed, refused=dict.fromkeys(unconfirmed, "not confirmed by the broker")
            )
        return PublishOutcome(confirmed, unanswered="not confirmed by the broker")

    def _settle(
        self, rows: list[sa.Row[Any]], outcome: PublishOutcome, claimed_until: datetime, sweep: _Sweep
    ) -> None:
        """Mark what the broker confirmed sent, and record why each other row was not."""
        c = orm.outbox.c
        ours = c.claimed_until == claimed_until
        # Let go at once, unless another worker's claim has replaced ours meanwhile (ours ran out):
        # that one is not ours to end.
        release = sa.case((ours, sa.null()), else_=c.claimed_until)
        confirmed = [row.id for row in rows if row.id in outcome.confirmed]
        if confirmed:
            self._mark(confirmed, outcome.confirmed, claimed_until=release)
            sweep.published += len(confirmed)
        # One statement per kind of outcome and reason, not per row: a batch nacked whole is one.
        updates: dict[tuple[str, str], list[str]] = {}
        for row in rows:
            if row.id in outcome.confirmed:
                continue
            if row.id in outcome.refused:
                reason = outcome.refused[row.id]
                parked = row.attempts >= self.max_attempts
                kind = "parked" if parked else "refused"
                log.warning(f"outbox.row_{kind}", row_id=row.id, attempts=row.attempts, reason=reason)
                sweep.parked += parked
                sweep.held[row.id] = claimed_until
            elif row.id in outcome.nacked:
                kind, reason = "nacked", "nacked by the broker"
                sweep.held[row.id] = claimed_until
            else:
                kind, reason = "unanswered", outcome.unanswered or "not confirmed"
                sweep.unanswered += 1
            updates.setdefault((kind, reason), []).append(row.id)
        values: dict[str, dict[str, Any]] = {
            # Counted; still claimed, so that the rest of this sweep skips it.
            "refused": {},
            "parked": {"parked_at": utcnow(), "claimed_until": release},
            # The broker could not take it just now: skipped for this sweep, but not counted.
            "nacked": {"attempts": c.attempts - 1},
            # No answer at all says nothing about the row: not counted, let go for the next tick.
            "unanswered": {"attempts": c.attempts - 1, "claimed_until": release},
        }
        with self.engine.connect() as connection:
            for (kind, reason), row_ids in updates.items():
                connection.execute(
                    orm.outbox.update().where(c.id.in_(row_ids)).values(last_error=reason, **values[kind])
                )

    def _release(self, sweep: _Sweep) -> None:
        """Let go, in one statement per claim, the rows this sweep held back; parked ones stay parked."""
        if not sweep.held:
            return
        by_claim: dict[datetime, list[str]] = {}
        for row_id, claimed_until in sweep.held.items():
            by_claim.setdefault(claimed_until, []).append(row_id)
        c = orm.outbox.c
        with self.engine.connect() as connection:
            for claimed_until, row_ids in by_claim.items():
                connection.execute(
                    orm.outbox.update()
                    .where(c.id.in_(row_ids), c.claimed_until == claimed_until)
                    .values(claimed_until=None)
                )

    def prune(self, older_than: timedelta, *, batch_size: int = PRUNE_BATCH_SIZE) -> int:
        """Delete rows sent more than ``older_than`` ago, ``batch_size`` per statement.

        Each statement commits by itself and skips rows another statement holds, so relays
        pruning at once neither wait for nor trip over each other. Unsent and parked rows stay.

        Returns:
          How many rows were deleted.
        """
        c = orm.outbox.c
        cutoff = utcnow() - older_than
        doomed = (
            sa.select(c.id)
            .where(c.sent_at < cutoff)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        statement = orm.outbox.delete().where(c.id.in_(doomed))
        deleted = 0
        while True:
            with self.engine.connect() as connection:
                count = connection.execute(statement).rowcount
            deleted += count
            if count < batch_size:
                if deleted:
                    log.info(
                        "outbox.pruned", rows=deleted, older_than_hours=older_than.total_seconds() / 3600
                    )
                return deleted

    def unsent(self, *, parked_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Unsent rows, oldest first, with their tries and why the last one failed: what an operator sees."""
        c = orm.outbox.c
        query = (
            sa.select(
                c.id,
                c.queue_name,
                c.actor_name,
                c.exchange,
                c.routing_key,
                c.created_at,
                c.attempts,
                c.last_error,
                c.parked_at,
                c.claimed_until,
            )
            .where(c.sent_at.is_(None))
            .order_by(c.created_at)
            .limit(limit)
        )
        if parked_only:
            query = query.where(c.parked_at.is_not(None))
        with self.engine.connect() as connection:
            found = connection.execute(query).all()
        return [
            {
                "id": row.id,
                "status": "parked" if row.parked_at is not None else "pending",
                "destination": f"{row.exchange} {row.routing_key}" if row.exchange else row.queue_name,
                "actor_name": row.actor_name or None,
                "created_at": row.created_at.isoformat(),
                "attempts": row.attempts,
                "last_error": row.last_error,
                "parked_at": row.parked_at.isoformat() if row.parked_at is not None else None,
            }
            for row in found
        ]

    def unpark(self, ids: Sequence[str] | None = None) -> list[str]:
        """Put parked rows back for the next sweep, with their tries counted afresh: the given ones, or all.

        Returns:
          The ids put back; a given id that is not a parked, unsent row is not among them.
        """
        c = orm.outbox.c
        statement = (
            orm.outbox.update()
            .where(c.parked_at.is_not(None), c.sent_at.is_(None))
            .values(parked_at=None, attempts=0, claimed_until=None)
            .returning(c.id)
        )
        if ids is not None:
            statement = statement.where(c.id.in_(ids))
        with self.engine.connect() as connection:
            put_back = list(connection.execute(statement).scalars())
        for row_id in put_back:
            log.info("outbox.row_unparked", row_id=row_id)
        return put_back

    def _claim(
        self, ids: Sequence[str] | None, older_than: timedelta | None, *, skip: Mapping[str, datetime]
    ) -> tuple[datetime, list[sa.Row[Any]]]:
        """Claim up to a batch of unsent rows nobody holds, in one committed statement.

        The attempt is counted here, so a worker that dies while publishing still counts.
        """
        now = utcnow()
        claimed_until = now + timedelta(seconds=CLAIM_SECONDS)
        c = orm.outbox.c
        free = (
            sa.select(c.id)
            .where(
                c.sent_at.is_(None),
                c.parked_at.is_(None),
                sa.or_(c.claimed_until.is_(None), c.claimed_until < now),
            )
            .order_by(c.created_at)
            .limit(BATCH_SIZE)
            .with_for_update(skip_locked=True)
        )
        if ids is not None:
            free = free.where(c.id.in_(ids))
        if older_than is not None:
            free = free.where(c.created_at < now - older_than)
        if skip:  # refused earlier in this sweep; claimed still, unless the claim ran out (a long sweep)
            free = free.where(c.id.not_in(list(skip)))
        claim = (
            orm.outbox.update()
            .where(c.id.in_(free.scalar_subquery()))
            .values(claimed_until=claimed_until, attempts=c.attempts + 1)
            .returning(
                c.id,
                c.queue_name,
                c.actor_name,
                c.payload,
                c.exchange,
                c.routing_key,
                c.created_at,
                c.attempts,
            )
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


@dataclass
class _Sweep:
    """What one sweep has done so far."""

    published: int = 0
    parked: int = 0
    #: Rows not confirmed for lack of any answer, let go at once.
    unanswered: int = 0
    #: Rows refused or nacked, still claimed so that this sweep skips them: id -> our claim.
    held: dict[str, datetime] = field(default_factory=dict)


def _merge(first: PublishOutcome, second: PublishOutcome) -> PublishOutcome:
    return PublishOutcome(
        first.confirmed | second.confirmed,
        {**first.refused, **second.refused},
        first.nacked | second.nacked,
        first.unanswered or second.unanswered,
        first.closed_by_broker or second.closed_by_broker,
    )


def run_relay(
    relay: OutboxRelay,
    *,
    sweep_seconds: float,
    prune_seconds: float,
    retain: timedelta,
    stop: threading.Event,
) -> None:
    """Sweep every ``sweep_seconds`` and prune every ``prune_seconds``, until ``stop`` is set.

    The loop of ``accessflow relay``. Several may run at once: claims keep their sweeps
    apart, and pruning skips what another holds. A sweep in progress when ``stop`` is set
    ends first (at most a batch's confirm timeout later); nothing is left claimed.
    """
    older_than = timedelta(seconds=sweep_seconds)  # younger rows are the publish-after-commit's
    next_prune = time.monotonic()
    log.info("relay.started", sweep_seconds=sweep_seconds, prune_seconds=prune_seconds)
    while not stop.is_set():
        try:
            published = relay.publish(older_than=older_than)
        except UnconfirmedPublish as error:
            published = error.published
            log.warning("relay.sweep_incomplete", published=published, error=str(error))
        except Exception as error:  # the database or broker is away: the next tick tries again
            published = 0
            log.warning("relay.sweep_failed", error=type(error).__name__)
        if published:
            log.info("relay.swept", published=published)
        if time.monotonic() >= next_prune and not stop.is_set():
            try:
                relay.prune(retain)
            except Exception as error:
                log.warning("relay.prune_failed", error=type(error).__name__)
            next_prune = time.monotonic() + prune_seconds
        stop.wait(sweep_seconds)
    log.info("relay.stopped")
