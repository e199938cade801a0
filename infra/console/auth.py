"""Who may log in to the review console, and the checks on what they post.

Each admin is listed in ``ACCESSFLOW_CONSOLE_ADMINS_FILE`` (a JSON list) with a scrypt hash of
their password and the Ed25519 key their decisions are signed with: the key registered for
them in the admins registry (``accessflow admins keys add``), so that the workers verify a
decision made in the console exactly as one made with ``accessflow decide``.

Passwords and CSRF tokens are compared in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from domain.errors import AccessflowError

#: scrypt's cost parameters for new hashes: n=2**14, r=8, p=1 (about 16 MiB, tens of milliseconds).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
#: Bytes of salt, and of the derived key.
SALT_BYTES, KEY_BYTES = 16, 32
#: Bytes of randomness in a CSRF token.
CSRF_BYTES = 32
#: Failed logins for one admin id within LOGIN_WINDOW_SECONDS after which its logins are refused until the window passes.
LOGIN_FAILURES_ALLOWED = 5
LOGIN_WINDOW_SECONDS = 300.0


class ConsoleConfigError(AccessflowError):
    """The console's admins file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class ConsoleAdmin:
    """An admin who may log in: their id in the admins registry, and the key they sign with."""

    admin_id: str
    password_hash: str = field(repr=False)
    key_file: Path
    key_id: str


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A scrypt hash of ``password``, as ``scrypt$n$r$p$salt$key`` (base64 salt and key)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (from :func:`hash_password`) was made from."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _no_one() -> str:
    """A hash no password matches, checked for unknown admin ids so that a login takes as long either way."""
    return hash_password(secrets.token_urlsafe(16))


def authenticate(admins: dict[str, ConsoleAdmin], admin_id: str, password: str) -> ConsoleAdmin | None:
    """The admin ``admin_id`` if ``password`` is theirs; None otherwise, in the same time whoever asks."""
    admin = admins.get(admin_id)
    matches = verify_password(password, admin.password_hash if admin else _no_one())
    return admin if admin is not None and matches else None


class LoginThrottle:
    """Refuses logins to an admin id after too many failures in a window: a guess costs the guesser time.

    Kept in the process: one console process serves the admins, and a restart forgives.
    """

    def __init__(
        self,
        *,
        failures: int = LOGIN_FAILURES_ALLOWED,
        window_seconds: float = LOGIN_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.window = window_seconds
        self.clock = clock
        self._failed: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, admin_id: str) -> bool:
        """Whether logins to ``admin_id`` are refused now."""
        with self._lock:
            return len(self._recent(admin_id)) >= self.failures

    def failed(self, admin_id: str) -> None:
        with self._lock:
            self._failed[admin_id] = [*self._recent(admin_id), self.clock()]

    def succeeded(self, admin_id: str) -> None:
        with self._lock:
            self._failed.pop(admin_id, None)

    def _recent(self, admin_id: str) -> list[float]:
        since = self.clock() - self.window
        return [at for at in self._failed.get(admin_id, []) if at > since]


def new_csrf_token() -> str:
    return secrets.token_urlsafe(CSRF_BYTES)


def csrf_matches(expected: object, submitted: object) -> bool:
    """Whether the form's token is the session's; False when either is missing."""
    if not isinstance(expected, str) or not isinstance(submitted, str) or not expected:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


def read_admins(path: Path) -> dict[str, ConsoleAdmin]:
    """The admins listed in the JSON file at ``path``, by id; ConsoleConfigError if it is not well-formed.

    Each entry is ``{"admin_id", "password_hash", "key_file", "key_id"}``; a relative key_file
    is read from the file's own directory.
    """
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConsoleConfigError(f"cannot read the console's admins file {path}: {error}") from None
    if not isinstance(entries, list):
        raise ConsoleConfigError(f"{path} must hold a JSON list of admins")
    admins: dict[str, ConsoleAdmin] = {}
    for number, entry in enumerate(entries, 1):
        try:
            admin = ConsoleAdmin(
                admin_id=str(entry["admin_id"]),
                password_hash=str(entry["password_hash"]),
                key_file=path.parent / str(entry["key_file"]),
                key_id=str(entry["key_id"]),
            )
        except (KeyError, TypeError):
            raise ConsoleConfigError(
                f"{path}: admin {number} needs admin_id, password_hash, key_file and key_id"
            ) from None
        if not admin.password_hash.startswith("scrypt$"):
            raise ConsoleConfigError(f"{path}: admin {admin.admin_id}'s password_hash is not a scrypt hash")
        admins[admin.admin_id] = admin
    return admins


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=KEY_BYTES
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
