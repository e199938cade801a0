"""``accessflow db``: the schema's migrations."""

from __future__ import annotations

import logging
from typing import Any

import click

from infra.cli.common import (
    load_settings,
)
from infra.db import migrate


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
    """Apply the migrations to ACCESSFLOW_DATABASE_URL, printing one line per migration applied."""
    settings = load_settings()
    # Alembic logs its progress at INFO, which the JSON log format would print line by line.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        migrate.upgrade(settings.database_url, revision, on_version_apply=_say_applied)
    except Exception as error:
        raise click.ClickException(f"migration failed: {type(error).__name__}: {error}") from None
    click.echo(f"database at revision {migrate.current(settings.database_url)}")
