"""Credential generation and hashing: the secrets issued to apps, and checking one a gateway presents.

API keys look like ``af_<8 hex>_<43 url-safe chars>``: the ``af_<8 hex>`` part is
the public lookup prefix, stored in the clear; the whole key is stored only as a
SHA-256 hash, which is enough for a 256-bit random secret (RFC 6819 5.1.4.1.3)
and lets a gateway check a key without a slow KDF. OAuth2 client secrets are
handled the same way under a public ``client_id``, and look like ``afs_<43 url-safe chars>``:
the prefix lets the log redactor (:mod:`infra.logs`) and secret scanners (GitHub's, gitleaks)
recognise one wherever it turns up. Secrets issued before the prefix have none, and still
verify: only the hash is compared.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime

from domain.model import AuthMethod, Credential
from domain.ports import IssuedSecret

API_KEY_PREFIX = "af_"
CLIENT_ID_PREFIX = "afc_"
#: The start of every OAuth2 client secret: "af" and "s" for secret, unlike the client id's "afc_".
CLIENT_SECRET_PREFIX = "afs_"  # noqa: S105 (a public prefix, not a secret)
#: The secret part is URL-safe base64, which may itself contain "_": match the prefix, not a split.
API_KEY_SHAPE = re.compile(r"^(af_[0-9a-f]{8})_[A-Za-z0-9_-]{43}$")
#: An OAuth2 client secret as issued since the prefix: ``afs_`` and 32 random bytes, URL-safe base64.
CLIENT_SECRET_SHAPE = re.compile(r"^afs_[A-Za-z0-9_-]{43}$")


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
            secret = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
        return IssuedSecret(public_id=public_id, secret=secret, secret_hash=hash_secret(secret))


def api_key_public_id(api_key: str) -> str | None:
    """The lookup prefix of a presented API key, or ``None`` if it is not shaped like ours."""
    match = API_KEY_SHAPE.match(api_key)
    return match.group(1) if match else None


def verify(presented_secret: str, public_id: str, credential: Credential | None, now: datetime) -> bool:
    """What a gateway does: check a presented secret against the stored hashes, in constant time.

    It verifies only while the credential is active and unexpired at ``now``; after a rotation
    the previous secret verifies too, under its own public id, until its grace period ends.
    """
    hashes = credential.hashes_for(public_id, now) if credential is not None else []
    presented = hash_secret(presented_secret)
    # Every candidate is compared, and a miss still spends a comparison: a miss, a mismatch and
    # a match take about the same time.
    matched = False
    for stored in hashes or ["sha256:"]:
        matched |= hmac.compare_digest(presented, stored)
    return matched and bool(hashes)
