"""Sealing secrets: at rest with Fernet (the seal keys, rotatable), and to a portal's X25519 key.

A secret is stored only sealed, and only until its first reveal; a portal's secret is sealed
to the portal's public key, so that no one but the portal, accessflow included, opens it.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from nacl.public import PrivateKey, PublicKey, SealedBox

from domain.errors import AccessflowError


class SealKeyMissing(AccessflowError):
    """No ACCESSFLOW_SEAL_KEY is configured, so secrets cannot be sealed or revealed."""


class FernetSealer:
    """Seals with the first key and unseals with any, so keys can be rotated."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise SealKeyMissing("ACCESSFLOW_SEAL_KEY is not set; create one with `accessflow keys generate`")
        fernets = [Fernet(k.encode()) for k in keys]
        self._newest = fernets[0]
        self._fernet = MultiFernet(fernets)

    def reseal(self, sealed: bytes) -> bytes | None:
        """``sealed`` sealed again with the newest key, or ``None`` if the newest key already opens it.

        The secret is never returned: it goes from one token to the other inside
        :meth:`MultiFernet.rotate`, which keeps the token's original timestamp.

        Raises:
          SealKeyMissing: no configured key opens ``sealed``.
        """
        try:
            self._newest.decrypt(sealed)
            return None
        except InvalidToken:
            pass
        try:
            return self._fernet.rotate(sealed)
        except InvalidToken:
            raise SealKeyMissing(
                "sealed secret cannot be opened with the configured ACCESSFLOW_SEAL_KEY"
            ) from None

    def seal(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def unseal(self, sealed: bytes) -> str:
        try:
            return self._fernet.decrypt(sealed).decode()
        except InvalidToken:
            raise SealKeyMissing(
                "sealed secret cannot be opened with the configured ACCESSFLOW_SEAL_KEY"
            ) from None


def generate_seal_key() -> str:
    return Fernet.generate_key().decode()


#: How a secret travels to its portal: a libsodium sealed box (X25519, XSalsa20-Poly1305).
SEALED_BOX = "x25519-xsalsa20-poly1305-sealedbox"


def portal_public_key(text: str) -> str:
    """Check and normalise a portal's X25519 public key: standard base64 of its 32 bytes.

    Raises:
      ValueError: the text is not a 32-byte key in base64.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a portal public key is standard base64 of 32 bytes") from None
    if len(raw) != 32:
        raise ValueError(f"a portal public key has 32 bytes, this one {len(raw)}")
    return base64.b64encode(raw).decode()


class PortalSealedBox:
    """Seals a secret to a portal's public key. accessflow can seal, never open: it has no private key."""

    def seal_to(self, public_key: str, secret: str) -> dict[str, str]:
        box = SealedBox(PublicKey(base64.b64decode(public_key)))
        return {
            "algorithm": SEALED_BOX,
            "recipient_key": public_key,
            "value": base64.b64encode(box.encrypt(secret.encode())).decode(),
        }


def generate_portal_keypair() -> tuple[str, str]:
    """A new X25519 keypair for a portal, as (private, public) base64; the portal keeps the private one."""
    private = PrivateKey.generate()
    return (
        base64.b64encode(bytes(private)).decode(),
        base64.b64encode(bytes(private.public_key)).decode(),
    )


def open_sealed_secret(private_key: str, sealed_value: str) -> str:
    """What a portal does with a ``credentials.issued`` event: open the sealed secret with its key."""
    box = SealedBox(PrivateKey(base64.b64decode(private_key)))
    return box.decrypt(base64.b64decode(sealed_value)).decode()
