"""Migrations hold one PostgreSQL advisory lock, so two ``db upgrade`` at once cannot race (real PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from infra.db import migrate
from tests import services as svc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HEAD = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()


@pytest.fixture
def fresh_database(postgres_server: str) -> Iterator[str]:
    with svc.fresh_database(postgres_server) as url:
        yield url


#: ``accessflow db upgrade``, started only once a line arrives on stdin: the imports, which take
#: most of a process's start, are done by then, so two runs told at once migrate at once.
UPGRADE_ON_CUE = """
import sys
from infra.cli.main import main
sys.stdin.readline()
main(["db", "upgrade"])
"""


def db_upgrade(database_url: str) -> subprocess.Popen[str]:
    """``accessflow db upgrade`` in a process of its own, as a deploy job runs it, waiting for its cue."""
    return subprocess.Popen(
        [sys.executable, "-c", UPGRADE_ON_CUE],
        cwd=ROOT,
        env={**os.environ, "ACCESSFLOW_DATABASE_URL": database_url},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def try_lock(database_url: str) -> bool:
    """Whether another session could take the migration lock right now (released again if so)."""
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            taken = bool(
                connection.scalar(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY}
                )
            )
            if taken:
                connection.scalar(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY})
            return taken
    finally:
        engine.dispose()


def waiting_on_an_advisory_lock(database_url: str) -> bool:
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return bool(
                connection.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                    )
                )
            )
    finally:
        engine.dispose()


class TestMigrationLock:
    @pytest.mark.parametrize("attempt", range(3))
    def test_two_upgrades_at_once_both_succeed_and_leave_head(
        self, fresh_database: str, attempt: int
    ) -> None:
        # (Three fresh databases: without the lock, a pair of runs collides about every other time.)
        # Given a database nobody has migrated yet
        # When two deploy jobs upgrade it at the same moment
        runs = [db_upgrade(fresh_database) for _ in range(2)]
        for run in runs:
            assert run.stdin is not None
            run.stdin.write("go\n")
            run.stdin.flush()
        outputs = [run.communicate(timeout=120)[0] for run in runs]

        # Then both succeed, and the schema is at head, recorded once
        assert [run.returncode for run in runs] == [0, 0], outputs
        assert migrate.current(fresh_database) == HEAD
        engine = sa.create_engine(fresh_database, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                assert connection.scalar(sa.text("SELECT count(*) FROM alembic_version")) == 1
        finally:
            engine.dispose()

    def test_the_lock_is_held_while_each_revision_is_applied(self, fresh_database: str) -> None:
        # Given an observer that tries the lock from another session after each revision
        seen: list[bool] = []

        def observe(**_: Any) -> None:
            seen.append(try_lock(fresh_database))

        # When the database is migrated
        migrate.upgrade(fresh_database, on_version_apply=observe)

        # Then no other session could take the lock at any step, and it is free afterwards
        assert seen and not any(seen)
        assert try_lock(fresh_database)

    def test_an_upgrade_waits_while_another_holds_the_lock(self, fresh_database: str) -> None:
        # Given a session holding the migration lock, as a run in progress does
        engine = sa.create_engine(fresh_database, poolclass=sa.pool.NullPool)
        holder = engine.connect()
        holder.scalar(sa.text("SELECT pg_advisory_lock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY})
        failures: list[BaseException] = []

        def upgrade() -> None:
            try:
                migrate.upgrade(fresh_database)
            except BaseException as error:
                failures.append(error)

        second = threading.Thread(target=upgrade)
        try:
            # When another upgrade starts
            second.start()

            # Then it waits on the lock, having changed nothing
            svc.wait_until(
                lambda: waiting_on_an_advisory_lock(fresh_database), what="the upgrade to wait on the lock"
            )
            assert second.is_alive()
            assert migrate.current(fresh_database) is None
        finally:
            holder.scalar(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY})
            holder.close()
            engine.dispose()
            second.join(timeout=120)

        # And once the lock is free it migrates to head
        assert not second.is_alive()
        assert failures == []
        assert migrate.current(fresh_database) == HEAD
