"""Dead database connections, against real PostgreSQL: no ping per checkout, a retry on error instead.

A backend is killed with ``pg_terminate_backend``, as a restart or an administrator would
end it; the server then says why and closes the socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from dramatiq.errors import Retry

from domain.errors import TransientError
from infra.bootstrap import Services, build
from infra.db import engine as db_engine
from infra.db.engine import create_engine
from infra.messaging.actors import register
from infra.messaging.delivery import transient_database_error
from infra.settings import Settings
from messages.routes import SUBMIT
from tests.e2e.conftest import request_payload
from workers.registry import Actor

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(settings: Settings) -> Iterator[sa.Engine]:
    built = create_engine(settings)
    yield built
    built.dispose()


@pytest.fixture
def admin(settings: Settings) -> Iterator[sa.Connection]:
    """A connection of its own, outside any pool, that may end other backends."""
    outside = sa.create_engine(settings.database_url, poolclass=sa.pool.NullPool)
    with outside.connect() as connection:
        yield connection
    outside.dispose()


def backend_pid(connection: sa.Connection) -> int:
    return int(connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def terminate(admin: sa.Connection, pid: int) -> None:
    """End the backend ``pid``, and return once it has exited (and its socket is closed)."""
    ended = admin.execute(sa.text("SELECT pg_terminate_backend(:pid, 30000)"), {"pid": pid}).scalar_one()
    admin.commit()
    assert ended, f"backend {pid} did not end"


def dead_connection_error(engine: sa.Engine, admin: sa.Connection) -> sa.exc.DBAPIError:
    """The error a statement raises on a connection whose backend died while it was checked out."""
    with engine.connect() as connection:
        terminate(admin, backend_pid(connection))
        with pytest.raises(sa.exc.DBAPIError) as raised:
            connection.execute(sa.text("SELECT 1"))
    return raised.value


class TestCheckingOutAPooledConnection:
    def test_costs_no_round_trip(self, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given the engine the workers use, and a count of pings
        pings: list[Any] = []
        monkeypatch.setattr(engine.dialect, "do_ping", lambda connection: pings.append(connection) or True)

        # When connections are checked out and used, one after another
        for _ in range(5):
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))

        # Then none was pinged first
        assert pings == []

    def test_replaces_a_connection_the_server_closed_while_it_was_idle(
        self, engine: sa.Engine, admin: sa.Connection
    ) -> None:
        # Given a pooled connection whose backend was ended while it sat in the pool
        with engine.connect() as connection:
            before = backend_pid(connection)
        terminate(admin, before)

        # When it is checked out again
        with engine.connect() as connection:
            after = backend_pid(connection)

        # Then the statement ran, on a new backend: the dead one was dropped, with no error
        assert after != before

    def test_replaces_a_connection_older_than_the_recycle_time(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given an engine whose connections are recycled at once
        monkeypatch.setattr(db_engine, "POOL_RECYCLE_SECONDS", 0)
        recycling = create_engine(settings)
        try:
            # When one connection is checked out twice
            with recycling.connect() as connection:
                before = backend_pid(connection)
            with recycling.connect() as connection:
                after = backend_pid(connection)
        finally:
            recycling.dispose()

        # Then the second checkout had a new connection
        assert after != before


class TestAConnectionThatDiesInUse:
    def test_fails_its_statement_as_transient_and_leaves_the_pool(
        self, engine: sa.Engine, admin: sa.Connection
    ) -> None:
        # Given a connection whose backend dies while it is checked out
        error = dead_connection_error(engine, admin)

        # Then its statement failed as a lost connection, which is a transient error
        assert error.connection_invalidated
        transient = transient_database_error(error)
        assert isinstance(transient, TransientError)
        assert str(transient) == "database unavailable: AdminShutdown 57P01"
        # And the pool hands out a working connection next
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1


class TestWhichDatabaseErrorsAreTransient:
    def test_a_statement_timeout_is(self, settings: Settings) -> None:
        # Given a statement cancelled by the statement timeout
        impatient = create_engine(settings.model_copy(update={"db_statement_timeout_ms": 100}))
        try:
            with impatient.connect() as connection, pytest.raises(sa.exc.OperationalError) as raised:
                connection.execute(sa.text("SELECT pg_sleep(5)"))
        finally:
            impatient.dispose()

        # Then it is transient, named by class and SQLSTATE, without the statement
        assert str(transient_database_error(raised.value)) == "database unavailable: QueryCanceled 57014"

    def test_a_broken_constraint_is_not(self, engine: sa.Engine) -> None:
        # Given a statement that breaks a constraint: no retry can fix it
        with engine.connect() as connection, pytest.raises(sa.exc.IntegrityError) as raised:
            connection.execute(sa.text("CREATE TEMP TABLE t (id int PRIMARY KEY)"))
            connection.execute(sa.text("INSERT INTO t VALUES (1), (1)"))

        # Then it is not transient
        assert transient_database_error(raised.value) is None


class TestAnActorWhoseConnectionDies:
    @pytest.fixture
    def stub_services(self, settings: Settings) -> Iterator[Services]:
        built = build(settings.model_copy(update={"broker_url": "stub://"}))
        yield built
        built.close()

    def test_asks_for_a_retry_instead_of_failing(
        self, stub_services: Services, admin: sa.Connection, engine: sa.Engine
    ) -> None:
        # Given an actor whose handler meets a connection that died under it
        error = dead_connection_error(engine, admin)

        def handler(message: Any, services: Services, sender: str | None) -> None:
            raise error

        register(Actor(SUBMIT, handler), stub_services)
        actor = stub_services.broker.get_actor(SUBMIT.actor_name)

        # When it runs, Then it raises dramatiq's Retry: retried with backoff, never dead-lettered at once
        with pytest.raises(Retry, match="database unavailable"):
            actor.fn(request_payload())

    def test_lets_any_other_error_through_as_it_is(self, stub_services: Services) -> None:
        # Given an actor whose handler fails for a reason of its own
        def handler(message: Any, services: Services, sender: str | None) -> None:
            raise LookupError("a bug")

        register(Actor(SUBMIT, handler), stub_services)
        actor = stub_services.broker.get_actor(SUBMIT.actor_name)

        # When it runs, Then the error is not disguised as a retry
        with pytest.raises(LookupError, match="a bug"):
            actor.fn(request_payload())
