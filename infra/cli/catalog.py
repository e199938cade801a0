"""``accessflow catalog``: loading products, plans, consumers and apps."""

from __future__ import annotations

from pathlib import Path

import click

from infra.cli.common import (
    echo_json,
    open_services,
)
from infra.db import catalogue_file


@click.group()
def catalog() -> None:
    """The catalogue of products, plans, consumers and apps."""


@catalog.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def catalog_load(file: Path, as_json: bool) -> None:
    """Insert or update everything in FILE (YAML or JSON)."""
    try:
        parsed = catalogue_file.read(file)
    except catalogue_file.CatalogueFileError as error:
        raise click.ClickException(str(error)) from None
    with open_services() as services:
        counts = catalogue_file.load(parsed, services.uow())
    if as_json:
        echo_json(counts)
    else:
        click.echo("loaded " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
