"""catalogue version: one row whose value every change to a cached table replaces

Each worker process caches the catalogue, the portals and the admin keys, and checks this
one row to know whether its cache is still current. Triggers replace the value in the
transaction of every change to those tables, whoever makes it: the repositories, a
catalogue load, or an operator revoking a key in psql. A cache therefore never serves an
entry once the change that outdates it has committed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: The tables the workers cache (infra.db.orm.CACHED_TABLES, copied: a migration must not change
#: when the code does), with the changes that bump the version. Inserting an app bumps
#: nothing: requests insert apps all the time, and no cache keeps an app that was not found.
BUMPED_BY = {
    "products": ("INSERT", "UPDATE", "DELETE"),
    "plans": ("INSERT", "UPDATE", "DELETE"),
    "consumers": ("INSERT", "UPDATE", "DELETE"),
    "apps": ("UPDATE", "DELETE"),
    "portals": ("INSERT", "UPDATE", "DELETE"),
    "portal_consumers": ("INSERT", "UPDATE", "DELETE"),
    "admins": ("INSERT", "UPDATE", "DELETE"),
    "admin_keys": ("INSERT", "UPDATE", "DELETE"),
}

POSTGRES_FUNCTION = """
CREATE FUNCTION bump_catalogue_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalogue_version SET version = gen_random_uuid()::text WHERE id = 1;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "catalogue_version",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_catalogue_version_one_row"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("INSERT INTO catalogue_version (id, version) VALUES (1, gen_random_uuid()::text)")
        op.execute(POSTGRES_FUNCTION)
        for table, events in BUMPED_BY.items():
            # Per statement: one bump however many rows it changes. An upsert (INSERT ... ON
            # CONFLICT DO UPDATE) fires the UPDATE statement trigger whether or not it updated.
            op.execute(
                f"CREATE TRIGGER {table}_bump_catalogue_version AFTER {' OR '.join(events)} OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION bump_catalogue_version()"
            )
    else:  # SQLite, for the demo: row triggers only, one per event
        op.execute("INSERT INTO catalogue_version (id, version) VALUES (1, lower(hex(randomblob(16))))")
        for table, events in BUMPED_BY.items():
            for event in events:
                op.execute(
                    f"CREATE TRIGGER {table}_{event.lower()}_bump_catalogue_version AFTER {event} ON {table} "  # noqa: S608 - names from BUMPED_BY
                    "BEGIN UPDATE catalogue_version SET version = lower(hex(randomblob(16))) WHERE id = 1; END"
                )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in BUMPED_BY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_bump_catalogue_version ON {table}")
        op.execute("DROP FUNCTION IF EXISTS bump_catalogue_version()")
    else:
        for table, events in BUMPED_BY.items():
            for event in events:
                op.execute(f"DROP TRIGGER IF EXISTS {table}_{event.lower()}_bump_catalogue_version")
    op.drop_table("catalogue_version")
