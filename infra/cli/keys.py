"""``accessflow keys``: generating the keys accessflow and its parties need."""

from __future__ import annotations

from pathlib import Path

import click

from infra.credentials.sealing import generate_portal_keypair, generate_seal_key
from infra.credentials.signing import generate_keypair


@click.group()
def keys() -> None:
    """Keys accessflow needs."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new seal key for ACCESSFLOW_SEAL_KEY."""
    click.echo(generate_seal_key())


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
