"""least privilege: the migrator owns the schema, the runtime role writes rows, the read-only role reads

Every table, sequence and function of the schema passes to accessflow_migrator (the owner,
who alone may drop a trigger). accessflow_runtime gets SELECT, INSERT, UPDATE and DELETE on
every table, and on audit_log only INSERT and SELECT; accessflow_readonly gets SELECT. The
migrator's default privileges do the same for every table a later migration creates; one
that must be append-only calls infra.db.roles.make_append_only. audit_log now also refuses
TRUNCATE. The roles are made by ``accessflow db upgrade`` before the migrations run
(infra/db/roles.py); without them this migration stops and says what to run.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 13:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from infra.db.roles import (
    MIGRATOR,
    READONLY,
    RUNTIME,
    admin_sql,
    become_migrator,
    make_append_only,
    roles_exist,
)

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: Whatever of the schema is not the migrator's yet: tables, sequences, views and functions in
#: public, except what an extension owns.
NOT_THE_MIGRATORS = """
SELECT format('ALTER %s %s OWNER TO %I',
              CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                             WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
              c.oid::regclass, CAST(:migrator AS text))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S', 'v', 'm')
  AND pg_get_userbyid(c.relowner) <> :migrator
  -- a serial column's sequence follows its table
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i', 'e'))
UNION ALL
SELECT format('ALTER FUNCTION %s OWNER TO %I', p.oid::regprocedure, CAST(:migrator AS text))
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> :migrator
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if not roles_exist(bind):
        raise RuntimeError(
            "the database roles do not exist, and db upgrade could not create them: an administrator "
            f"runs, in this database:\n{admin_sql()}"
        )
    # Tables made before this revision belong to whoever ran the migrations then, and this run
    # is that role (infra.db.roles.become_migrator left it): it gives them to the migrator,
    # and becomes the migrator for the rest of the run, later revisions included.
    for statement in [row[0] for row in bind.execute(sa.text(NOT_THE_MIGRATORS), {"migrator": MIGRATOR})]:
        op.execute(statement)
    become_migrator(bind)

    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {RUNTIME}")
    op.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {RUNTIME}")
    op.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READONLY}")
    # Tables later migrations create, as the migrator, are granted the same without a word.
    op.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR} IN SCHEMA public "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {RUNTIME}"
    )
    op.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR} IN SCHEMA public "
        f"GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {RUNTIME}"
    )
    op.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR} IN SCHEMA public GRANT SELECT ON TABLES TO {READONLY}"
    )
    # Only migrations write the schema's revision.
    op.execute(f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {RUNTIME}")

    # Replaces 0001's row trigger (same name, same error text) with the shared function, adds
    # the TRUNCATE one, and leaves the runtime role INSERT and SELECT.
    make_append_only("audit_log")
    op.execute("DROP FUNCTION IF EXISTS audit_log_is_append_only()")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_log is append-only';
        END $$;
        """
    )
    op.execute(
        "CREATE OR REPLACE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only()"
    )
    op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
    op.execute("DROP FUNCTION IF EXISTS refuse_append_only_change()")
    for statement in (
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR} IN SCHEMA public REVOKE ALL ON TABLES FROM {RUNTIME}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR} IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {RUNTIME}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR} IN SCHEMA public REVOKE ALL ON TABLES FROM {READONLY}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {RUNTIME}, {READONLY}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {RUNTIME}",
    ):
        op.execute(statement)
    # Ownership stays with the migrator, and the roles stay: other databases may use them.
