"""Runs the Alembic migrations that ship inside the package.

Two ``accessflow db upgrade`` at once (two deploy jobs, an init container per replica)
would both read the same current revision and run the same DDL, and the slower one
fails halfway, or records a revision twice. On PostgreSQL every run therefore holds a
session-level advisory lock for as long as it migrates (:func:`migration_lock`): the
second run waits, then finds the schema at head and does nothing. SQLite, the demo's
one-process database, needs none.

Before the migrations, on PostgreSQL, the database roles are created and granted the schema
where the connected role may (:func:`infra.db.roles.ensure_roles`); the migrations then run
as the migrator role, which owns what they create.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from infra.db import roles
from infra.db.engine import create_engine
from infra.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
#: The advisory lock key every migration run holds on PostgreSQL: fixed, so that all runs agree,
#: and unusual ("accessmi" in ASCII), so that no other application sharing the database picks it.
MIGRATION_LOCK_KEY = 0x61636365_73736D69


@contextmanager
def migration_lock(connection: sa.Connection) -> Iterator[None]:
    """Hold PostgreSQL's advisory lock :data:`MIGRATION_LOCK_KEY` on ``connection`` while in the block.

    A session-level lock, not a transaction-level one: it outlives the transactions the
    migrations commit, and it is released when the block ends, or when the connection
    drops if the process dies. Waits as long as another run holds it (a migration may
    take long, and a deploy that gave up would leave the schema behind its code). The
    transaction that taking the lock began is committed before the block, so that
    Alembic begins (and commits) its own. On any other database, nothing.
    """
    if connection.dialect.name != "postgresql":
        yield
        return
    connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()  # a failed migration; unlocking needs a usable transaction
        connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would read a % in a password as a placeholder.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(
    database_url: str,
    revision: str = "head",
    *,
    on_version_apply: Callable[..., None] | None = None,
    role_urls: Mapping[str, str | None] | None = None,
) -> roles.RolesReport:
    """Create the database roles where allowed, then migrate ``database_url`` to ``revision``, under :func:`migration_lock`.

    Parameters:
      on_version_apply: called by Alembic after each revision is applied (its keyword
        arguments: ``ctx``, ``step``, ``heads``, ``run_args``), while the lock is held;
        tests use it to look at the database mid-migration.
      role_urls: the deployment's database URLs; one that logs in as one of the roles with a
        password sets that role's password (:func:`infra.db.roles.encrypted_passwords`).

    Returns:
      Whether the roles were created and granted, and why not.
    """
    engine = create_engine(Settings(database_url=database_url))
    try:
        with engine.connect() as connection:
            report = roles.ensure_roles(connection, role_urls or {})
    finally:
        engine.dispose()
    config = alembic_config(database_url)
    if on_version_apply is not None:
        config.attributes["on_version_apply"] = on_version_apply
    command.upgrade(config, revision)
    return report


def current(database_url: str) -> str | None:
    engine = create_engine(Settings(database_url=database_url))
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
