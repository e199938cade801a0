"""The database roles: who owns the schema, who runs, who only reads (README: "The database roles").

Three roles, on PostgreSQL only:

- :data:`MIGRATOR` owns every table, sequence and function of the schema. ``accessflow db
  upgrade`` runs the migrations as this role (``SET ROLE`` when it connects as a superuser,
  or it connects as the migrator itself), so that what a later migration creates is the
  migrator's too.
- :data:`RUNTIME` is what workers, the relay and the CLI connect as: SELECT, INSERT, UPDATE
  and DELETE on the application's tables, but only INSERT and SELECT on an append-only table
  (``audit_log``). It owns nothing, so it can neither drop a table's trigger nor ALTER it.
- :data:`READONLY` only SELECTs: ``accessflow status`` and the read-only views
  (ACCESSFLOW_READONLY_DATABASE_URL).

Roles belong to the whole cluster; privileges belong to one database. Many databases of one
cluster (the test suite's, or two deployments') therefore share the three roles, and each
database's ``db upgrade`` grants them what they need there. Creating them is idempotent and
safe when two upgrades race: a role another run just created is taken as it is.

A table created by a later migration is granted to the runtime and read-only roles without a
word in that migration: migration 0010 sets the migrator's default privileges. A migration
that adds an append-only table (an audit trail) calls :func:`make_append_only` after creating
it::

    from infra.db.roles import make_append_only

    def upgrade() -> None:
        op.create_table("credential_audit", ...)
        make_append_only("credential_audit")

That installs a row trigger that refuses UPDATE and DELETE, a statement trigger that refuses
TRUNCATE, and revokes UPDATE, DELETE and TRUNCATE from the runtime role. A trigger can be
dropped by the table's owner only: that is the migrator, never the runtime role.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from alembic import op

#: Owns the schema; runs the migrations.
MIGRATOR = "accessflow_migrator"
#: What the workers and the CLI connect as: reads and writes rows, owns nothing.
RUNTIME = "accessflow_runtime"
#: Reads only: `accessflow status` and the views.
READONLY = "accessflow_readonly"
ROLES = (MIGRATOR, RUNTIME, READONLY)

#: A table name as make_append_only takes it: a plain identifier, never quoted or qualified.
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")

#: The one trigger function every append-only table uses; the table's name is in its error.
APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION refuse_append_only_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
"""


def make_append_only(table: str) -> None:
    """In a migration: make ``table`` append-only for everyone, and the runtime role in particular.

    A row trigger refuses UPDATE and DELETE and a statement trigger refuses TRUNCATE (which
    fires no row trigger), for any role the table's owner has not dropped them for; and the
    runtime role loses UPDATE, DELETE and TRUNCATE on it, so even without the triggers it
    could only INSERT and SELECT. Idempotent. On SQLite (the demo), nothing.
    """
    if not _IDENTIFIER.match(table):
        raise ValueError(f"not a plain table name: {table!r}")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(APPEND_ONLY_FUNCTION)
    op.execute(
        f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION refuse_append_only_change()"
    )
    op.execute(
        f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION refuse_append_only_change()"
    )
    op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON {table} FROM {RUNTIME}")


def role_statements(passwords: Mapping[str, str] | None = None) -> list[str]:
    """The SQL that creates the roles (if missing) and grants them the schema, in this database.

    Each role may log in. One with a password in ``passwords`` gets it (already encrypted,
    as :func:`encrypted_passwords` makes it: the clear text never reaches the server or its
    log); one without keeps whatever it has, none for a new role, so that it logs in only
    where ``pg_hba.conf`` trusts it or by certificate.
    """
    statements = [
        # Two upgrades at once may both find the role missing: the loser's CREATE fails with
        # duplicate_object (or unique_violation on the catalogue), and takes the winner's role.
        f"DO $$ BEGIN CREATE ROLE {role} LOGIN; "
        "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        for role in ROLES
    ]
    for role, password in (passwords or {}).items():
        statements.append(f"ALTER ROLE {role} PASSWORD {_literal(password)}")
    statements += [
        # The schema's privileges are per database; the migrator creates its tables in public.
        f"GRANT USAGE, CREATE ON SCHEMA public TO {MIGRATOR}",
        f"GRANT USAGE ON SCHEMA public TO {RUNTIME}, {READONLY}",
    ]
    return statements


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def encrypted_passwords(connection: sa.Connection, urls: Mapping[str, str | None]) -> dict[str, str]:
    """The password of each role that one of ``urls`` logs in as, encrypted as the server stores it.

    Parameters:
      urls: the deployment's database URLs by purpose; a URL whose user is one of :data:`ROLES`
        and that carries a password sets that role's password. So an operator writes each
        password once, in the URL that uses it.
    """
    found: dict[str, str] = {}
    for url in urls.values():
        if not url:
            continue
        parsed = sa.make_url(url)
        if parsed.username in ROLES and parsed.password:
            pgconn = connection.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
            # libpq's PQencryptPasswordConn: SCRAM (or what password_encryption says), made here.
            verifier = pgconn.encrypt_password(parsed.password.encode(), parsed.username.encode())
            found[parsed.username] = verifier.decode()
    return found


@dataclass(frozen=True)
class RolesReport:
    """What ``db upgrade`` did about the roles."""

    #: The roles exist in the cluster (made by this run, an earlier one, or an administrator).
    present: bool
    #: This run created the missing ones, set passwords and granted the schema.
    managed: bool
    #: Why it did not manage them, when it did not.
    reason: str = ""


def may_create_roles(connection: sa.Connection) -> bool:
    """Whether the connected role may create roles: a superuser, or one with CREATEROLE."""
    return bool(
        connection.execute(
            sa.text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
        ).scalar()
    )


def ensure_roles(connection: sa.Connection, urls: Mapping[str, str | None]) -> RolesReport:
    """Create the roles and grant them the schema where the connected role may; else say why not.

    Commits. On a database other than PostgreSQL there are no roles, and nothing to do.
    """
    if connection.dialect.name != "postgresql":
        return RolesReport(present=True, managed=True)
    if not may_create_roles(connection):
        present = roles_exist(connection)
        connection.rollback()
        return RolesReport(
            present=present,
            managed=False,
            reason="the role it connects as is neither superuser nor CREATEROLE",
        )
    try:
        for statement in role_statements(encrypted_passwords(connection, urls)):
            connection.execute(sa.text(statement))
        connection.commit()
    except sa.exc.DBAPIError as error:
        connection.rollback()
        reason = f"{type(error.orig).__name__}: {str(error.orig).splitlines()[0]}"
        return RolesReport(present=roles_exist(connection), managed=False, reason=reason)
    return RolesReport(present=True, managed=True)


def roles_exist(connection: sa.Connection) -> bool:
    found = connection.execute(
        sa.text("SELECT count(*) FROM pg_roles WHERE rolname = ANY(:roles)"), {"roles": list(ROLES)}
    ).scalar()
    return found == len(ROLES)


def admin_sql() -> str:
    """What an administrator runs, in the application's database, when ``db upgrade`` may not."""
    return ";\n".join(role_statements()) + (
        f";\n-- and, unless db upgrade connects as {MIGRATOR} itself:\n"
        f"GRANT {MIGRATOR} TO <the role db upgrade connects as>;\n"
        f"-- passwords: ALTER ROLE <role> PASSWORD '...' for each role that logs in with one"
    )


def become_migrator(connection: sa.Connection) -> bool:
    """``SET ROLE`` to :data:`MIGRATOR` where it exists, may be taken, and owns the schema; whether it did.

    So that what the migrations create is owned by the migrator, whoever connected. A schema
    that is not the migrator's yet (Alembic's table made by another role, before migration
    0010) is migrated as the connected role, until 0010 hands it over and calls this again.
    """
    may = connection.execute(
        sa.text(
            "SELECT current_user <> :role AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :role) "
            "AND pg_has_role(current_user, (SELECT oid FROM pg_roles WHERE rolname = :role), 'MEMBER') "
            "AND coalesce((SELECT pg_get_userbyid(relowner) = :role FROM pg_class "
            "WHERE oid = to_regclass('alembic_version')), true)"
        ),
        {"role": MIGRATOR},
    ).scalar()
    if may:
        connection.execute(sa.text(f"SET ROLE {MIGRATOR}"))
    return bool(may)
