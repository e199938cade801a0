"""``accessflow portals``: registered developer portals."""

from __future__ import annotations

import click

from infra.cli.common import (
    echo_json,
    open_services,
    print_table,
    validated_entry,
)
from infra.db import catalogue_file


@click.group()
def portals() -> None:
    """Developer portals: who may submit for which consumers, and where their events go."""


@portals.command("add")
@click.argument("portal_id")
@click.option("--name", required=True, help="The portal's name, as the approve email shows it.")
@click.option("--broker-user", required=True, help="The AMQP user the portal publishes as.")
@click.option(
    "--public-key", required=True, help="The portal's X25519 public key, base64 (keys portal-generate)."
)
@click.option("--url", default="", help="Where consumers sign in to the portal; shown in the approve email.")
@click.option("--consumer", "consumers", multiple=True, help="A consumer the portal speaks for (repeatable).")
def portals_add(
    portal_id: str, name: str, broker_user: str, public_key: str, url: str, consumers: tuple[str, ...]
) -> None:
    """Register a portal, or replace its registration (its consumers included)."""
    entry = validated_entry(
        catalogue_file.PortalEntry,
        {
            "id": portal_id,
            "name": name,
            "broker_user": broker_user,
            "public_key": public_key,
            "url": url,
            "consumers": list(consumers),
        },
    )
    with open_services() as services, services.uow() as uow:
        unknown = [c for c in entry.consumers if uow.catalogue.consumer(c) is None]
        if unknown:
            raise click.ClickException(f"unknown consumer(s): {', '.join(unknown)}")
        uow.portals.upsert(entry.to_portal())
        uow.commit()
    click.echo(f"portal {entry.id} registered for {len(entry.consumers)} consumer(s)")


@portals.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def portals_list(as_json: bool) -> None:
    """Every registered portal."""
    with open_services() as services, services.uow() as uow:
        rows = [
            {
                "id": p.id,
                "name": p.name,
                "broker_user": p.broker_user,
                "public_key": p.public_key,
                "url": p.url,
                "consumers": sorted(p.consumer_ids),
            }
            for p in uow.portals.list()
        ]
    if as_json:
        echo_json(rows)
        return
    print_table(
        ["portal", "name", "AMQP user", "consumers", "url"],
        [(r["id"], r["name"], r["broker_user"], ",".join(r["consumers"]), r["url"]) for r in rows],
        empty="no portals",
    )
