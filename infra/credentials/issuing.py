"""Credential generation, hashing and sealing.

API keys look like ``af_<8 hex>_<43 url-safe chars>``: the ``af_<8 hex>`` part is
the public lookup prefix, stored in the clear; the whole key is stored only as a
SHA-256 hash, which is enough for a 256-bit random secret (RFC 6819 5.1.4.1.3)
and lets a gateway check a key without a slow KDF. OAuth2 client secrets are
handled the same way under a public ``client_id``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from nacl.public import PrivateKey, PublicKey, SealedBox

from domain.errors import AccessflowError
from domain.model import AuthMethod, Credential
from domain.ports import IssuedSecret

API_KEY_PREFIX = "af_"
CLIENT_ID_PREFIX = "afc_"
#: The secret part is URL-safe base64, which may itself contain "_": match the prefix, not a split.
API_KEY_SHAPE = re.compile(r"^(af_[0-9a-f]{8})_[A-Za-z0-9_-]{43}$")


def hash_secret(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


class LocalCredentialIssuer:
    """Mints credentials locally. A gateway or IdP adapter would register them remotely instead."""

    def issue(self, kind: AuthMethod) -> IssuedSecret:
        if kind is AuthMethod.API_KEY:
            public_id = API_KEY_PREFIX + secrets.token_hex(4)
            secret = f"{public_id}_{secrets.token_urlsafe(32)}"
        else:
            public_id = CLIENT_ID_PREFIX + secrets.token_hex(8)
            secret = secrets.token_urlsafe(32)
        return IssuedSecret(public_id=public_id, secret=secret, secret_hash=hash_secret(secret))


def api_key_public_id(api_key: str) -> str | None:
    """The lookup prefix of a presented API key, or ``None`` if it is not shaped like ours."""
    match = API_KEY_SHAPE.match(api_key)
    return match.group(1) if match else None


def verify(presented_secret: str, credential: Credential | None) -> bool:
    """What a gateway does: check a presented secret against the stored hash, in constant time."""
    if credential is None or credential.revoked_at is not None:
        # Still spend the hash, so a miss and a mismatch take the same time.
        secret_matches(presented_secret, hash_secret(""))
        return False
    return secret_matches(presented_secret, credential.secret_hash)


class SealKeyMissing(AccessflowError):
    """No ACCESSFLOW_SEAL_KEY is configured, so secrets cannot be sealed or revealed."""


class FernetSealer:
    """Seals with the first key and unseals with any, so keys can be rotated."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise SealKeyMissing("ACCESSFLOW_SEAL_KEY is not set; create one with `accessflow keys generate`")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

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
