"""``accessflow admins``: admins and the public keys their signed decisions are checked with."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from domain.model import AdminKey, utcnow
from infra.cli import producer
from infra.cli.common import (
    echo_json,
    load_settings,
    open_services,
    print_table,
    validated_entry,
)
from infra.credentials import signing
from infra.db import catalogue_file
from infra.messaging.topology import Topology
from messages.events import AdminEvent
from messages.validation import explain


@click.group()
def admins() -> None:
    """Admins, and the public keys their signed decisions are checked with."""


@admins.command("add")
@click.argument("admin_id")
@click.option("--email", required=True, help="The admin's address, shown with their decisions.")
def admins_add(admin_id: str, email: str) -> None:
    """Register an admin, or change their address."""
    entry = validated_entry(catalogue_file.AdminEntry, {"id": admin_id, "email": email})
    with open_services() as services, services.uow() as uow:
        uow.admin_keys.upsert_admin(entry.id, str(entry.email))
        uow.commit()
    click.echo(f"admin {entry.id} registered")


@admins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def admins_list(as_json: bool) -> None:
    """Every admin and their keys, revoked ones marked."""
    with open_services() as services, services.uow() as uow:
        rows: list[dict[str, Any]] = [
            {
                "id": admin_id,
                "email": email,
                "keys": [
                    {
                        "key_id": k.key_id,
                        "public_key": k.public_key,
                        "created_at": k.created_at.isoformat(),
                        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                    }
                    for k in keys
                ],
            }
            for admin_id, email, keys in uow.admin_keys.admins()
        ]
    if as_json:
        echo_json(rows)
        return
    print_table(
        ["admin", "email", "key", "state", "public key"],
        [
            (
                row["id"],
                row["email"],
                k["key_id"] if k else "",
                ("revoked " + k["revoked_at"] if k["revoked_at"] else "active") if k else "no key",
                k["public_key"] if k else "",
            )
            for row in rows
            for k in (row["keys"] or [None])
        ],
        empty="no admins",
    )


@admins.group("keys")
def admin_keys() -> None:
    """An admin's signing keys: several may be active at once, so keys can rotate."""


@admin_keys.command("add")
@click.argument("admin_id")
@click.option("--key-id", required=True, help="A name for the key, unique across admins.")
@click.option(
    "--public-key",
    required=True,
    help="'ed25519:<base64>' as keys admin-generate prints it, a PEM public key, or @FILE to read one.",
)
def admin_keys_add(admin_id: str, key_id: str, public_key: str) -> None:
    """Register a public key of ADMIN_ID; decisions signed with its private half then count."""
    text = Path(public_key[1:]).read_text() if public_key.startswith("@") else public_key
    try:
        normalised = signing.public_key_text(signing.parse_public_key(text))
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    entry = validated_entry(catalogue_file.AdminKeyEntry, {"key_id": key_id, "public_key": normalised})
    with open_services() as services, services.uow() as uow:
        if uow.admin_keys.admin_email(admin_id) is None:
            raise click.ClickException(f"no admin {admin_id}: add them first with `accessflow admins add`")
        try:
            uow.admin_keys.add_key(AdminKey(entry.key_id, admin_id, entry.public_key, utcnow()))
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        uow.commit()
    click.echo(f"key {entry.key_id} of {admin_id} registered")


@admin_keys.command("revoke")
@click.argument("key_id")
def admin_keys_revoke(key_id: str) -> None:
    """Revoke a key for good: decisions signed with it are refused from now on."""
    with open_services() as services, services.uow() as uow:
        if not uow.admin_keys.revoke(key_id):
            raise click.ClickException(f"no key {key_id}")
        uow.commit()
    click.echo(f"key {key_id} revoked")


@admins.command("events")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Wait up to SECONDS for events; 0 takes only what is there.",
)
@click.option("--max", "limit", type=click.IntRange(min=1), default=None, help="Stop after N events.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print each event as one line of JSON, as received, whatever its version.",
)
def admins_events(wait: float, limit: int | None, as_json: bool) -> None:
    """Take the admins' events from the broker: each bulk decision's results, per request.

    Reads the queue only the admin tool's AMQP user may read (ACCESSFLOW_BROKER_URL's user),
    and acknowledges each event once printed, so each is printed once, by one reader.
    """
    settings = load_settings()
    wire = producer.AmqpWire(settings.broker_url, Topology(settings.queue_prefix))

    def show(body: bytes) -> None:
        if as_json:
            # As received: a bot reading these also gets events of versions this CLI does not know.
            click.echo(json.dumps(json.loads(body), separators=(",", ":")))
            return
        event = AdminEvent.model_validate_json(body)
        counts = Counter(item.result for item in event.results)
        title = (
            f"bulk decision {event.bulk_id} by {event.admin_id}: {event.decision} {event.selection},"
            f" {event.outcome}" + (f": {event.reason}" if event.reason else "")
        )
        summary = ", ".join(f"{n} {result}" for result, n in sorted(counts.items())) or "no request selected"
        print_table(
            ("request", "result"),
            [(item.request_id, item.result) for item in event.results],
            empty=f"{title} ({summary})",
            title=f"{title} ({summary})",
        )

    try:
        taken = wire.take_admin_events(show, wait=wait, limit=limit)
    except ValidationError as error:
        raise click.ClickException(
            f"an event this version cannot show, left on the queue (--json prints any): {explain(error)}"
        ) from None
    except Exception as error:  # the broker is unreachable or refused the read
        raise click.ClickException(
            f"could not read the admins' events: {type(error).__name__}: {error}"
        ) from None
    if not as_json and not taken:
        click.echo("no admin events")
