"""The database roles, connected as each on a database that ``db upgrade`` migrated (infra/db/roles.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner

from infra.cli.main import main
from infra.db import migrate, orm, roles
from infra.db.engine import create_engine
from infra.settings import Settings
from tests import rows
from tests import services as svc

pytestmark = pytest.mark.integration

HEAD = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()


@pytest.fixture(scope="module")
def database(postgres_server: str) -> Iterator[str]:
    """A database migrated the way ``accessflow db upgrade`` does, as the server's administrator."""
    with svc.fresh_database(postgres_server) as url:
        report = migrate.upgrade(url)
        assert report.managed, report.reason
        yield url


@pytest.fixture(scope="module")
def request_id(database: str) -> str:
    """A request with one audit row, written by the administrator."""
    engine = create_engine(Settings(database_url=database))
    try:
        with engine.begin() as connection:
            found = rows.insert_request(connection)
            rows.insert_audit_row(connection, found)
    finally:
        engine.dispose()
    return found


def connect_as(database: str, role: str) -> sa.Engine:
    """An engine that logs in as ``role`` (the local server trusts it; a role has no password by default)."""
    url = sa.make_url(database).set(username=role, password=None)
    engine = create_engine(Settings(database_url=url.render_as_string(hide_password=False)))
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT current_user")).scalar() == role
    except sa.exc.OperationalError as error:
        engine.dispose()
        svc.unavailable(f"cannot log in as {role} on this server without a password: {error.orig}")
    return engine


@pytest.fixture
def runtime(database: str) -> Iterator[sa.Engine]:
    engine = connect_as(database, roles.RUNTIME)
    yield engine
    engine.dispose()


@pytest.fixture
def readonly(database: str) -> Iterator[sa.Engine]:
    engine = connect_as(database, roles.READONLY)
    yield engine
    engine.dispose()


def refused(engine: sa.Engine, statement: str | sa.Executable, match: str) -> None:
    with engine.connect() as connection, pytest.raises(sa.exc.DBAPIError, match=match):
        connection.execute(sa.text(statement) if isinstance(statement, str) else statement)


class TestTheRuntimeRole:
    def test_appends_to_the_audit_log(self, runtime: sa.Engine, request_id: str) -> None:
        with runtime.begin() as connection:
            rows.insert_audit_row(connection, request_id, reason="appended by the runtime role")
            assert (
                connection.execute(
                    sa.select(sa.func.count()).where(orm.audit_log.c.request_id == request_id)
                ).scalar_one()
                >= 2
            )

    def test_cannot_update_delete_or_truncate_audit_rows(self, runtime: sa.Engine, request_id: str) -> None:
        edit = orm.audit_log.update().where(orm.audit_log.c.request_id == request_id).values(reason="edited")
        refused(runtime, edit, "permission denied for table audit_log")
        refused(runtime, orm.audit_log.delete(), "permission denied for table audit_log")
        refused(runtime, "TRUNCATE audit_log", "permission denied for table audit_log")

    def test_cannot_drop_the_append_only_triggers_or_alter_the_table(self, runtime: sa.Engine) -> None:
        refused(runtime, "DROP TRIGGER audit_log_append_only ON audit_log", "must be owner of")
        refused(runtime, "ALTER TABLE audit_log DISABLE TRIGGER ALL", "must be owner of")

    def test_reads_and_writes_the_other_tables(self, runtime: sa.Engine) -> None:
        with runtime.begin() as connection:
            request_id = rows.insert_request(connection)
            connection.execute(
                orm.access_requests.update()
                .where(orm.access_requests.c.id == request_id)
                .values(status_reason="changed")
            )
            rows.insert_credential(connection, request_id, sealed_secret=None)
            connection.execute(orm.credentials.delete().where(orm.credentials.c.request_id == request_id))

    def test_cannot_change_the_schema_or_its_revision(self, runtime: sa.Engine) -> None:
        refused(runtime, "CREATE TABLE intruder (id int)", "permission denied for schema public")
        refused(runtime, "UPDATE alembic_version SET version_num = '0001'", "permission denied")


class TestTheReadOnlyRole:
    def test_reads(self, readonly: sa.Engine, request_id: str) -> None:
        with readonly.connect() as connection:
            assert connection.execute(sa.select(orm.audit_log.c.reason)).first() is not None

    def test_cannot_write(self, readonly: sa.Engine, request_id: str) -> None:
        with readonly.connect() as connection, pytest.raises(sa.exc.DBAPIError, match="permission denied"):
            rows.insert_audit_row(connection, request_id)
        refused(readonly, orm.access_requests.update().values(status_reason="x"), "permission denied")
        refused(readonly, orm.outbox.delete(), "permission denied")


class TestTheAuditLogForItsOwner:
    def test_truncate_is_refused_even_to_the_owner(self, database: str) -> None:
        administrator = create_engine(Settings(database_url=database))
        try:
            refused(administrator, "TRUNCATE audit_log", "audit_log is append-only")
            refused(administrator, "TRUNCATE audit_log CASCADE", "audit_log is append-only")
        finally:
            administrator.dispose()


class TestALaterMigration:
    """What the lifecycle's migrations will do: a new table, and a new append-only one."""

    def test_its_tables_are_granted_to_the_runtime_role_and_append_only_ones_stay_so(
        self, database: str, runtime: sa.Engine
    ) -> None:
        # Given a migration run as db upgrade runs it, creating two tables
        administrator = create_engine(Settings(database_url=database))
        try:
            with administrator.begin() as connection:
                assert roles.become_migrator(connection)
                connection.execute(sa.text("CREATE TABLE later_things (id serial PRIMARY KEY, note text)"))
                connection.execute(sa.text("CREATE TABLE later_audit (id serial PRIMARY KEY, note text)"))
                with Operations.context(MigrationContext.configure(connection)):
                    roles.make_append_only("later_audit")
                connection.execute(sa.text("RESET ROLE"))
        finally:
            administrator.dispose()

        # Then the runtime role writes both, and can only append to the append-only one
        with runtime.begin() as connection:
            connection.execute(sa.text("INSERT INTO later_things (note) VALUES ('a')"))
            connection.execute(sa.text("UPDATE later_things SET note = 'b'"))
            connection.execute(sa.text("DELETE FROM later_things"))
            connection.execute(sa.text("INSERT INTO later_audit (note) VALUES ('kept')"))
        refused(runtime, "UPDATE later_audit SET note = 'x'", "permission denied for table later_audit")
        refused(runtime, "DELETE FROM later_audit", "permission denied for table later_audit")
        refused(runtime, "TRUNCATE later_audit", "permission denied for table later_audit")


class TestUpgradingAgain:
    def test_changes_nothing_and_keeps_the_roles(self, database: str) -> None:
        report = migrate.upgrade(database)

        assert report.managed and migrate.current(database) == HEAD


class TestUpgradingAsTheMigrator:
    def test_after_an_administrator_made_the_roles_it_migrates_and_says_it_left_them_alone(
        self, postgres_server: str
    ) -> None:
        with svc.fresh_database(postgres_server) as url:
            # Given an administrator who ran the SQL db upgrade prints when it may not create roles
            administrator = create_engine(Settings(database_url=url))
            try:
                with administrator.begin() as connection:
                    for statement in roles.role_statements():
                        connection.execute(sa.text(statement))
            finally:
                administrator.dispose()
            as_migrator = sa.make_url(url).set(username=roles.MIGRATOR).render_as_string(hide_password=False)
            connect_as(url, roles.MIGRATOR).dispose()

            # When db upgrade runs as the migrator itself
            result = CliRunner().invoke(
                main,
                ["db", "upgrade"],
                env={"ACCESSFLOW_MIGRATION_DATABASE_URL": as_migrator, "ACCESSFLOW_LOG_FORMAT": "json"},
            )

            # Then it migrates, owning every table, and says the roles were left as they are
            assert result.exit_code == 0, result.output
            assert "not created or changed by this run" in result.output
            assert f"database at revision {HEAD}" in result.output
            with administrator.connect() as connection:
                owners = connection.execute(
                    sa.text(
                        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
                        "WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"
                    )
                ).scalars()
                assert set(owners) == {roles.MIGRATOR}
            administrator.dispose()
