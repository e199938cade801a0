"""``accessflow keys``: generating the keys accessflow and its parties need."""

from __future__ import annotations

from pathlib import Path

import click

from infra.cli.common import open_services
from infra.credentials.sealing import generate_portal_keypair, generate_seal_key
from infra.credentials.signing import generate_keypair
from infra.db import resealing


@click.group()
def keys() -> None:
    """Keys accessflow needs."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new seal key for ACCESSFLOW_SEAL_KEY."""
    click.echo(generate_seal_key())


@keys.command("rotate")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=resealing.BATCH_SIZE,
    show_default=True,
    help="Secrets re-sealed per transaction.",
)
def keys_rotate(batch_size: int) -> None:
    """Re-seal every sealed secret with the newest (first) key of ACCESSFLOW_SEAL_KEY.

    Rotate a seal key by putting the new one first in ACCESSFLOW_SEAL_KEY, the old ones after
    it; run this; then remove the old keys. Safe to run again, and while workers run. Exits 1
    if a secret opens with none of the configured keys (it is left as it is).
    """
    with open_services() as services:
        report = resealing.reseal_all(services.engine, services.sealer(), batch_size=batch_size)
    click.echo(
        f"re-sealed {report.resealed} secret(s) with the newest seal key; {report.current} already were"
    )
    if report.unopenable:
        raise click.ClickException(
            f"{len(report.unopenable)} sealed secret(s) open with none of the configured keys, left as they are "
            f"(credentials {', '.join(report.unopenable[:10])}{', ...' if len(report.unopenable) > 10 else ''}): "
            "add the key that sealed them after the newest one, and run this again"
        )


@keys.command("admin-generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keys_admin_generate(path: Path) -> None:
    """Write an admin's Ed25519 signing keypair: PATH (private, mode 0600) and PATH.pub.

    Existing files are never overwritten. The private key stays with the admin portal;
    accessflow's workers get only the public key, once it is registered.
    """
    try:
        public_key = generate_keypair(path)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"private key: {path} (mode 0600; keep it on the admin portal, never on a worker)")
    click.echo(f"public key:  {path}.pub")
    click.echo(public_key)
    click.echo("")
    click.echo("Next: register the public key under a key id of your choosing (e.g. dana-2026-11):")
    click.echo(f"  accessflow admins keys add ADMIN_ID --key-id KEY_ID --public-key '{public_key}'")
    click.echo("then sign decisions with the private key and that key id (messages/asyncapi.yaml:")
    click.echo('"Signing admin decisions"). Rotate by registering a new key before revoking the old one.')


@keys.command("portal-generate")
def keys_portal_generate() -> None:
    """Print a new X25519 keypair for a portal: the portal keeps the private key and opens its secrets with it.

    A real portal makes its own keypair and registers only the public half; this is for
    trying accessflow out, and for tests.
    """
    private, public = generate_portal_keypair()
    click.echo(f"private: {private}")
    click.echo(f"public:  {public}")
