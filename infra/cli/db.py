"""``accessflow db``: the schema's migrations."""

from __future__ import annotations

import click

from infra.cli.common import (
    load_settings,
)
from infra.db import migrate


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
def db_upgrade(revision: str) -> None:
    """Apply the migrations to ACCESSFLOW_DATABASE_URL."""
    settings = load_settings()
    try:
        migrate.upgrade(settings.database_url, revision)
    except Exception as error:
        raise click.ClickException(f"migration failed: {type(error).__name__}: {error}") from None
    click.echo(f"database at revision {migrate.current(settings.database_url)}")
