"""How the outbox relay uses PostgreSQL: no lock or transaction across broker I/O, one statement per mark.

The broker side is replaced by a publisher that confirms what it is told to and looks at
the database while it "publishes", from a connection of its own. The database is this
module's own, so that no worker pool running in the session sweeps these rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
import structlog.testing
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from domain import commands
from domain.events import PortalEvent
from domain.model import NotificationKind, utcnow
from infra.db import migrate, orm
from infra.db.engine import create_engine
from infra.db.unit_of_work import SqlUnitOfWork
from infra.messaging.publisher import Outgoing, PublishOutcome
from infra.messaging.relay import BATCH_SIZE, OutboxRelay, UnconfirmedPublish
from infra.settings import Settings
from tests import services as svc

pytestmark = pytest.mark.integration

PREFIX = "relaytest"


@pytest.fixture(scope="module")
def own_database(postgres_server: str) -> Iterator[str]:
    with svc.fresh_database(postgres_server) as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def engine(own_database: str) -> Iterator[Engine]:
    orm.start_mappers()
    built = create_engine(Settings(database_url=own_database, broker_url="stub://"))
    yield built
    built.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def observer(own_database: str) -> Iterator[Engine]:
    """Another session's view of the database, apart from the relay's engine and its statements."""
    built = sa.create_engine(own_database, poolclass=sa.pool.NullPool)
    yield built
    built.dispose()


@dataclass
class Look:
    """What another session saw of the database while a batch was being published."""

    idle_in_transaction: int
    rows_locked: bool


@dataclass
class FakeBroker:
    """The publisher side: confirms the messages ``confirms`` accepts, and looks at the database meanwhile."""

    observer: Engine
    confirms: Callable[[Outgoing], bool] = lambda _: True
    during: Callable[[], None] = lambda: None
    batches: list[list[Outgoing]] = field(default_factory=list)
    looks: list[Look] = field(default_factory=list)

    def publish(self, *, queue_name: str, actor_name: str, payload: object, message_id: str) -> None:
        raise NotImplementedError

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        self.batches.append(list(messages))
        self.looks.append(look(self.observer, [m.message_id for m in messages]))
        self.during()
        return {m.message_id for m in messages if self.confirms(m)}

    def close(self) -> None:
        pass


def look(engine: Engine, ids: list[str]) -> Look:
    with engine.connect() as connection:
        idle = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
        try:
            connection.execute(
                sa.select(orm.outbox.c.id).where(orm.outbox.c.id.in_(ids)).with_for_update(nowait=True)
            ).all()
            locked = False
        except sa.exc.OperationalError:  # lock_not_available: someone holds the rows
            locked = True
        connection.rollback()
    return Look(int(idle), locked)


def commit_rows(factory: sessionmaker[Session], count: int) -> list[Outgoing]:
    """Commit ``count`` outbox rows as a handler does, without the publish after the commit."""
    uow = SqlUnitOfWork(factory, queue_prefix=PREFIX, relay=None)
    with uow:
        for _ in range(count):
            uow.outbox.put(commands.SendNotification(str(uuid.uuid4()), NotificationKind.APPROVE))
        written = list(uow.outbox.added)
        uow.commit()
    return written


def rows(engine: Engine, ids: Sequence[str]) -> dict[str, sa.Row[tuple[int, bool, bool]]]:
    c = orm.outbox.c
    with engine.connect() as connection:
        found = connection.execute(
            sa.select(
                c.id,
                c.attempts,
                c.sent_at.is_not(None).label("sent"),
                c.claimed_until.is_not(None).label("claimed"),
            ).where(c.id.in_(ids))
        ).all()
    return {row.id: row for row in found}


class Statements:
    """The SQL statements an engine runs, while recording."""

    def __init__(self, engine: Engine) -> None:
        self.seen: list[str] = []
        self.recording = False
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn: object, _cursor: object, statement: str, *_: object) -> None:
        if self.recording:
            self.seen.append(" ".join(statement.split()[:2]))

    def __enter__(self) -> list[str]:
        self.recording = True
        return self.seen

    def __exit__(self, *_: object) -> None:
        self.recording = False


class TestAfterTheHandlersCommit:
    def test_publishes_without_a_lock_or_an_open_transaction_and_marks_with_one_statement(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given three rows a handler has just committed
        written = commit_rows(factory, 3)
        broker = FakeBroker(observer)
        relay = OutboxRelay(factory, broker)
        statements = Statements(engine)

        # When the relay publishes them, as the unit of work does after its commit
        with statements as seen:
            relay.publish_quietly(written)

        # Then the broker got them as they were written, while nothing held their rows or a transaction
        assert broker.batches == [written]
        assert broker.looks == [Look(idle_in_transaction=0, rows_locked=False)]
        # and one statement, after the confirms, marked them sent and counted the attempt
        assert seen == ["UPDATE outbox"]
        ids = [m.message_id for m in written]
        assert {(r.attempts, r.sent, r.claimed) for r in rows(engine, ids).values()} == {(1, True, False)}

    def test_leaves_what_the_broker_did_not_confirm_for_the_sweep(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given three committed rows, and a broker that confirms only the first
        written = commit_rows(factory, 3)
        first = written[0].message_id
        relay = OutboxRelay(factory, FakeBroker(observer, confirms=lambda m: m.message_id == first))

        # When the relay publishes them after the commit
        relay.publish_quietly(written)  # logs, and raises nothing: the handler's work stands

        # Then only the confirmed one is marked sent; every one counts its attempt
        found = rows(engine, [m.message_id for m in written])
        assert {row_id for row_id, r in found.items() if r.sent} == {first}
        assert {r.attempts for r in found.values()} == {1}

        # And a sweep, with a broker that confirms, sends the other two, and only them
        sweeper = FakeBroker(observer)
        assert OutboxRelay(factory, sweeper).publish([m.message_id for m in written]) == 2
        assert sorted(m.message_id for m in sweeper.batches[0]) == sorted(m.message_id for m in written[1:])
        assert all(r.sent for r in rows(engine, [m.message_id for m in written]).values())

    def test_a_worker_pool_marks_many_commits_rows_with_one_statement_later(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a relay that defers its marks, as a worker pool's does
        relay = OutboxRelay(factory, FakeBroker(observer))
        relay.defer_marks()
        first, second = commit_rows(factory, 2), commit_rows(factory, 3)
        ids = [m.message_id for m in (*first, *second)]
        statements = Statements(engine)

        # When it publishes two handlers' rows after their commits
        with statements as seen:
            relay.publish_quietly(first)
            relay.publish_quietly(second)

        # Then no statement ran for them: they are published, and owed their marks
        assert seen == []
        assert not any(r.sent for r in rows(engine, ids).values())

        # And the next marking pass marks all five with one statement, counting each attempt
        with statements as seen:
            assert relay.mark_deferred() == 5
            assert relay.mark_deferred() == 0  # nothing is owed twice
        assert seen == ["UPDATE outbox"]
        assert {(r.attempts, r.sent, r.claimed) for r in rows(engine, ids).values()} == {(1, True, False)}

    def test_deferred_marks_outlast_a_database_that_refuses_them(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given rows published by a relay that defers its marks
        relay = OutboxRelay(factory, FakeBroker(observer))
        relay.defer_marks()
        written = commit_rows(factory, 2)
        relay.publish_quietly(written)
        ids = [m.message_id for m in written]

        # When the marking pass cannot reach the database
        reachable = relay.engine
        relay.engine = sa.create_engine(
            "postgresql+psycopg://nobody@127.0.0.1:1/none",
            poolclass=sa.pool.NullPool,
            connect_args={"connect_timeout": 2},
        )
        with pytest.raises(sa.exc.OperationalError):
            relay.mark_deferred()

        # Then the rows stay owed, and the next pass that reaches it marks them
        relay.engine = reachable
        assert relay.mark_deferred() == 2
        assert all(r.sent for r in rows(engine, ids).values())

    def test_a_batch_the_broker_did_not_confirm_whole_is_marked_at_once_even_when_deferring(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a relay that defers its marks, and a broker that confirms only the first row
        written = commit_rows(factory, 2)
        first = written[0].message_id
        relay = OutboxRelay(factory, FakeBroker(observer, confirms=lambda m: m.message_id == first))
        relay.defer_marks()

        # When it publishes them
        relay.publish_quietly(written)

        # Then the confirmed row is marked now, and the other counted for the sweep; nothing is owed
        found = rows(engine, [m.message_id for m in written])
        assert {row_id for row_id, r in found.items() if r.sent} == {first}
        assert {r.attempts for r in found.values()} == {1}
        assert relay.mark_deferred() == 0

    def test_sends_events_to_portals_exactly_as_the_sweep_would(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a handler's transaction with a command and an event for a portal
        broker = FakeBroker(observer)
        relay = OutboxRelay(factory, broker)
        uow = SqlUnitOfWork(factory, queue_prefix=PREFIX, relay=relay)
        request_id = str(uuid.uuid4())
        with uow:
            uow.outbox.put(commands.IssueCredentials(request_id))
            uow.outbox.announce(
                PortalEvent("acme-portal", request_id, 1, "access_request.approved", "approved", "", utcnow())
            )
            # When it commits, and the relay publishes from what the handler wrote
            uow.commit()
        [after_commit] = broker.batches
        assert [m.exchange for m in after_commit] == ["", f"{PREFIX}.out.events"]
        assert after_commit[1].routing_key == "acme-portal.access_request.approved"

        # Then a sweep of the same rows, read back from the table, publishes the same messages
        ids = [m.message_id for m in after_commit]
        with engine.begin() as connection:
            connection.execute(orm.outbox.update().where(orm.outbox.c.id.in_(ids)).values(sent_at=None))
        assert relay.publish(ids) == 2
        assert broker.batches[1] == after_commit


class TestTheSweep:
    def test_claims_publishes_outside_any_transaction_and_marks_with_one_statement(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given rows a crashed worker left unsent
        ids = [m.message_id for m in commit_rows(factory, 5)]
        broker = FakeBroker(observer)
        statements = Statements(engine)

        # When a sweep publishes them
        with statements as seen:
            assert OutboxRelay(factory, broker).publish(ids) == 5

        # Then the broker got them while nothing held their rows or a transaction
        assert sorted(m.message_id for m in broker.batches[0]) == sorted(ids)
        assert broker.looks == [Look(idle_in_transaction=0, rows_locked=False)]
        # one statement claimed them (counting the attempt), one marked them sent, and let them go
        assert seen == ["UPDATE outbox", "UPDATE outbox"]
        assert {(r.attempts, r.sent, r.claimed) for r in rows(engine, ids).values()} == {(1, True, False)}

    def test_skips_rows_another_worker_claimed_until_the_claim_runs_out(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given rows, and a worker that claims them and dies while publishing
        ids = [m.message_id for m in commit_rows(factory, 2)]
        other = FakeBroker(observer)

        def dies() -> None:
            # While it holds the claim, another worker's sweep finds nothing to take
            assert OutboxRelay(factory, other).publish(ids) == 0
            raise RuntimeError("the worker died here")

        with pytest.raises(RuntimeError):
            OutboxRelay(factory, FakeBroker(observer, during=dies)).publish(ids)
        assert other.batches == []
        assert {(r.sent, r.claimed) for r in rows(engine, ids).values()} == {(False, True)}
        assert OutboxRelay(factory, other).publish(ids) == 0  # still claimed

        # When the claim runs out (as CLAIM_SECONDS after a death)
        with engine.begin() as connection:
            connection.execute(
                orm.outbox.update()
                .where(orm.outbox.c.id.in_(ids))
                .values(claimed_until=utcnow() - timedelta(seconds=1))
            )

        # Then the other worker's sweep publishes them, and both attempts count
        assert OutboxRelay(factory, other).publish(ids) == 2
        assert {(r.attempts, r.sent, r.claimed) for r in rows(engine, ids).values()} == {(2, True, False)}

    def test_lets_unconfirmed_rows_go_at_once_for_the_next_sweep(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given rows, and a broker that confirms none of them (it went down)
        ids = [m.message_id for m in commit_rows(factory, 2)]

        # When a sweep tries
        with pytest.raises(UnconfirmedPublish):
            OutboxRelay(factory, FakeBroker(observer, confirms=lambda _: False)).publish(ids)

        # Then they stay unsent and unclaimed, the try uncounted (a broker that says nothing says
        # nothing about the rows), and the next sweep sends them
        assert {(r.attempts, r.sent, r.claimed) for r in rows(engine, ids).values()} == {(0, False, False)}
        assert OutboxRelay(factory, FakeBroker(observer)).publish(ids) == 2
        assert {(r.attempts, r.sent) for r in rows(engine, ids).values()} == {(1, True)}

    def test_leaves_rows_younger_than_its_interval_to_the_publish_after_the_commit(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given rows just committed, whose handler's thread is publishing them
        ids = [m.message_id for m in commit_rows(factory, 2)]
        broker = FakeBroker(observer)

        # When a periodic sweep runs, for rows older than an hour
        OutboxRelay(factory, broker).publish(older_than=timedelta(hours=1))

        # Then it leaves them alone
        assert all(m.message_id not in ids for batch in broker.batches for m in batch)
        assert {(r.attempts, r.sent, r.claimed) for r in rows(engine, ids).values()} == {(0, False, False)}


@dataclass
class RefusingBroker(FakeBroker):
    """A broker that says why: it returns ``unroutable`` messages, and closes the channel over ``fatal`` ones."""

    unroutable: set[str] = field(default_factory=set)
    fatal: set[str] = field(default_factory=set)
    nacks: set[str] = field(default_factory=set)

    def publish_explained(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        self.batches.append(list(messages))
        ids = {m.message_id for m in messages}
        if ids & self.fatal:  # the whole batch goes unanswered, as when RabbitMQ closes the channel
            return PublishOutcome(
                set(),
                unanswered="the broker closed the channel: 404 NOT_FOUND - no exchange 'gone'",
                closed_by_broker=True,
            )
        refused = dict.fromkeys(ids & self.unroutable, "unroutable: 312 NO_ROUTE")
        nacked = ids & self.nacks
        return PublishOutcome(ids - refused.keys() - nacked, refused, nacked)


def published_ids(broker: FakeBroker) -> list[str]:
    return [m.message_id for batch in broker.batches for m in batch]


def outbox_rows(engine: Engine, ids: Sequence[str]) -> dict[str, sa.Row[Any]]:
    c = orm.outbox.c
    with engine.connect() as connection:
        found = connection.execute(
            sa.select(c.id, c.attempts, c.sent_at, c.claimed_until, c.last_error, c.parked_at).where(
                c.id.in_(ids)
            )
        ).all()
    return {row.id: row for row in found}


class TestARowTheBrokerRefuses:
    def test_does_not_end_the_sweep_every_other_row_is_published_in_one_pass(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a backlog of more than two batches, whose oldest row the broker never confirms
        ids = [m.message_id for m in commit_rows(factory, 2 * BATCH_SIZE + 50)]
        poison = ids[0]
        broker = FakeBroker(observer, confirms=lambda m: m.message_id != poison)

        # When one sweep runs
        with pytest.raises(UnconfirmedPublish) as raised:
            OutboxRelay(factory, broker).publish(ids)

        # Then it published every other row, and tried the refused one once only
        found = outbox_rows(engine, ids)
        assert [row_id for row_id, r in found.items() if r.sent_at is None] == [poison]
        assert raised.value.published == len(ids) - 1
        assert published_ids(broker).count(poison) == 1
        # and let it go at the end, with its try counted and the reason recorded
        assert (found[poison].attempts, found[poison].claimed_until) == (1, None)
        assert found[poison].last_error == "not confirmed by the broker"

    def test_is_parked_after_max_attempts_with_its_reason_and_no_sweep_takes_it(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a row the broker returns as unroutable, among others, and a relay that parks after 3 tries
        ids = [m.message_id for m in commit_rows(factory, 5)]
        poison = ids[2]
        broker = RefusingBroker(observer, unroutable={poison})
        relay = OutboxRelay(factory, broker, max_attempts=3)

        # When three sweeps run, each counts its try, and the third parks it
        with structlog.testing.capture_logs() as logged:
            for attempt in (1, 2, 3):
                with pytest.raises(UnconfirmedPublish):
                    relay.publish(ids)
                row = outbox_rows(engine, ids)[poison]
                assert (row.attempts, row.last_error) == (attempt, "unroutable: 312 NO_ROUTE")
                assert (row.parked_at is not None) == (attempt == 3)
                assert row.claimed_until is None
        # and each refusal, and the parking, left a log record with the row and the reason
        records = [(e["event"], e["row_id"], e["attempts"], e["reason"]) for e in logged if "row_id" in e]
        assert records == [
            ("outbox.row_refused", poison, 1, "unroutable: 312 NO_ROUTE"),
            ("outbox.row_refused", poison, 2, "unroutable: 312 NO_ROUTE"),
            ("outbox.row_parked", poison, 3, "unroutable: 312 NO_ROUTE"),
        ]
        assert all(
            r.sent_at is not None for row_id, r in outbox_rows(engine, ids).items() if row_id != poison
        )

        # Then no later sweep tries it
        broker.batches.clear()
        assert relay.publish(ids) == 0
        assert broker.batches == []

    def test_a_row_over_which_the_broker_closes_the_channel_is_found_by_halves(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a batch with one row that makes the broker close the channel (a deleted exchange)
        ids = [m.message_id for m in commit_rows(factory, BATCH_SIZE)]
        poison = ids[137]
        broker = RefusingBroker(observer, fatal={poison})

        # When a sweep runs
        with pytest.raises(UnconfirmedPublish) as raised:
            OutboxRelay(factory, broker).publish(ids)

        # Then every other row is published in that sweep, in a few smaller batches
        assert raised.value.published == BATCH_SIZE - 1
        assert len(broker.batches) <= 2 * BATCH_SIZE.bit_length() + 1
        row = outbox_rows(engine, ids)[poison]
        assert (row.sent_at, row.attempts) == (None, 1)
        assert row.last_error == "the broker closed the channel: 404 NOT_FOUND - no exchange 'gone'"

    def test_a_nacked_row_is_skipped_for_the_sweep_but_not_counted(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a row the broker nacks (it could not take it just now: a full queue)
        ids = [m.message_id for m in commit_rows(factory, 3)]
        broker = RefusingBroker(observer, nacks={ids[0]})

        # When sweeps run, more often than the relay's limit of tries
        relay = OutboxRelay(factory, broker, max_attempts=2)
        for _ in range(3):
            with pytest.raises(UnconfirmedPublish):
                relay.publish(ids)

        # Then the others are sent, and it is neither counted nor parked, only waiting
        row = outbox_rows(engine, ids)[ids[0]]
        assert (row.attempts, row.parked_at, row.last_error) == (0, None, "nacked by the broker")
        assert published_ids(broker).count(ids[0]) == 3


ACCESSFLOW = str(Path(sys.executable).with_name("accessflow"))


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCESSFLOW_")}
    env |= {"ACCESSFLOW_DATABASE_URL": database_url, "ACCESSFLOW_BROKER_URL": "stub://"}
    return subprocess.run(
        [ACCESSFLOW, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


class TestAParkedRow:
    def test_is_listed_with_its_reason_and_retried_by_an_operator(
        self, own_database: str, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given a row parked after the broker returned it as unroutable
        ids = [m.message_id for m in commit_rows(factory, 2)]
        poison = ids[0]
        relay = OutboxRelay(factory, RefusingBroker(observer, unroutable={poison}), max_attempts=1)
        with pytest.raises(UnconfirmedPublish):
            relay.publish(ids)

        # When an operator lists parked rows
        listed = cli(own_database, "outbox", "list", "--parked", "--json")

        # Then it is there, with its tries and reason, and the sent one is not
        assert listed.returncode == 0, listed.stderr
        [row] = [r for r in json.loads(listed.stdout) if r["id"] in ids]
        assert (row["id"], row["status"], row["attempts"]) == (poison, "parked", 1)
        assert row["last_error"] == "unroutable: 312 NO_ROUTE"
        assert row["destination"] == f"{PREFIX}.notifications"
        text = cli(own_database, "outbox", "list", "--parked")
        assert poison in text.stdout and "unroutable: 312 NO_ROUTE" in text.stdout

        # And when, the cause fixed, they put it back
        retried = cli(own_database, "outbox", "retry", poison)
        assert retried.returncode == 0, retried.stderr
        assert cli(own_database, "outbox", "retry", poison).returncode != 0  # not parked any more
        found = outbox_rows(engine, [poison])[poison]
        assert (found.parked_at, found.attempts) == (None, 0)

        # Then the next sweep sends it
        assert OutboxRelay(factory, FakeBroker(observer)).publish([poison]) == 1
        assert outbox_rows(engine, [poison])[poison].sent_at is not None


class TestPruning:
    def test_removes_only_rows_sent_longer_ago_than_the_age_in_bounded_batches(
        self, engine: Engine, factory: sessionmaker[Session], observer: Engine
    ) -> None:
        # Given rows sent two days ago, one sent an hour ago, an unsent one and a parked one, both old
        old_sent = [m.message_id for m in commit_rows(factory, 5)]
        recent, unsent, parked = (m.message_id for m in commit_rows(factory, 3))
        now = utcnow()
        c = orm.outbox.c
        with engine.begin() as connection:
            connection.execute(
                orm.outbox.update()
                .where(c.id.in_(old_sent))
                .values(sent_at=now - timedelta(days=2), created_at=now - timedelta(days=2))
            )
            connection.execute(
                orm.outbox.update().where(c.id == recent).values(sent_at=now - timedelta(hours=1))
            )
            connection.execute(
                orm.outbox.update()
                .where(c.id.in_([unsent, parked]))
                .values(created_at=now - timedelta(days=2))
            )
            connection.execute(
                orm.outbox.update().where(c.id == parked).values(parked_at=now - timedelta(days=2))
            )
        statements = Statements(engine)

        # When the relay prunes rows sent more than a day ago, two per statement
        with statements as seen:
            deleted = OutboxRelay(factory, FakeBroker(observer)).prune(timedelta(days=1), batch_size=2)

        # Then only the old sent ones are gone, each statement bounded
        assert deleted == 5
        assert set(outbox_rows(engine, [*old_sent, recent, unsent, parked])) == {recent, unsent, parked}
        assert seen == ["DELETE FROM"] * 3
