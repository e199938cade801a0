"""Alembic environment: the URL comes from the caller (``accessflow db upgrade``) or from settings."""

from __future__ import annotations

from alembic import context

from infra.db import orm
from infra.db.engine import create_engine
from infra.db.migrate import migration_lock
from infra.db.roles import become_migrator
from infra.settings import Settings

config = context.config
url = config.get_main_option("sqlalchemy.url")
settings = Settings(database_url=url) if url else Settings()


def run_migrations_offline() -> None:
    context.configure(url=settings.database_url, target_metadata=orm.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(settings)
    # The lock is taken before Alembic reads the current revision: two runs at once must
    # not both start from the same one (infra.db.migrate's docstring).
    with engine.connect() as connection, migration_lock(connection):
        if connection.dialect.name == "postgresql":
            # What the migrations create belongs to the migrator, whoever connected (infra/db/roles.py).
            become_migrator(connection)
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=orm.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            on_version_apply=config.attributes.get("on_version_apply"),
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
