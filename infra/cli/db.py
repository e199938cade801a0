"""``accessflow db``: the schema's migrations."""

from __future__ import annotations

import logging
from typing import Any

import click

from infra.cli.common import (
    load_settings,
)
from infra.db import migrate, roles


@click.group()
def db() -> None:
    """Database schema."""


def _say_applied(*, step: Any, **_: Any) -> None:
    """One line per migration applied, instead of Alembic's log lines."""
    for script in step.up_revisions:
        click.echo(f"applied {script.revision}: {script.doc}")


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
def db_upgrade(revision: str) -> None:
    """Create the database roles where allowed, then apply the migrations, one line per migration.

    Connects with ACCESSFLOW_MIGRATION_DATABASE_URL (else ACCESSFLOW_DATABASE_URL). As a
    superuser or a CREATEROLE role it creates accessflow_migrator, accessflow_runtime and
    accessflow_readonly if missing, and sets the password of each that one of the
    ACCESSFLOW_*DATABASE_URL settings logs in as with one; otherwise it says so, and prints
    the SQL an administrator runs. The migrations run as accessflow_migrator.
    """
    settings = load_settings()
    url = settings.migration_url()
    # Alembic logs its progress at INFO, which the JSON log format would print line by line.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    role_urls = {
        "database": settings.database_url,
        "migration": settings.migration_database_url,
        "readonly": settings.readonly_database_url,
    }
    try:
        report = migrate.upgrade(url, revision, on_version_apply=_say_applied, role_urls=role_urls)
    except Exception as error:
        raise click.ClickException(f"migration failed: {type(error).__name__}: {error}") from None
    names = ", ".join(roles.ROLES)
    if not url.startswith("postgresql"):
        pass  # the demo's SQLite has no roles
    elif report.managed:
        click.echo(f"roles {names}: present, and granted the schema")
    elif report.present:
        click.echo(f"roles {names}: present; not created or changed by this run ({report.reason})")
    else:
        click.echo(
            f"skipped creating the database roles ({report.reason}); an administrator runs, in this database:\n"
            f"{roles.admin_sql()}",
            err=True,
        )
    click.echo(f"database at revision {migrate.current(url)}")
