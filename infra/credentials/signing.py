"""Ed25519 signatures on admin decisions, so that workers hold only public keys.

An admin portal signs each decision with the admin's private key; a worker verifies it
against the public keys registered for that admin. A stolen worker can therefore read
decisions but not forge one, which an HMAC key on every worker would allow
(RELIABILITY.md, "Security anchors").

What is signed is the canonical form of the decision message: every member but
``"signature"``, as JSON with the members sorted by name, no insignificant whitespace and
non-ASCII characters written as themselves, encoded as UTF-8. For an object of strings and
integers that is exactly RFC 8785 (JCS), and it is what ``JSON.stringify`` writes over
sorted keys in JavaScript, so a producer in any language derives the same bytes.
``messages/asyncapi.yaml`` ("Signing admin decisions") gives a worked example that
``tests/unit/test_signing.py`` verifies.

Public keys travel as text, ``ed25519:<standard base64 of the raw 32 bytes>``; an SPKI PEM
(what ``openssl pkey -pubout`` writes) is accepted too. Private keys live in PKCS#8 PEM files
readable by their owner only.

Errors::

    ValueError                 a malformed value: a field canonical_bytes refuses, bad key text
    AccessflowError
     +-- SigningKeyError       a private key file is missing, exposed, encrypted or not Ed25519
    FileExistsError            generate_keypair would overwrite a file

``verify`` and ``verify_signed`` never raise: hostile input is simply not a valid signature.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from domain.errors import AccessflowError
from messages.canonical import SIGNATURE_MEMBER, canonical_bytes

__all__ = ["SIGNATURE_MEMBER", "canonical_bytes"]  # re-exported: signing is where a reader looks

#: The only value of ``signature.algorithm``.
ALGORITHM = "ed25519"
#: The prefix of a public key written as text.
PUBLIC_KEY_PREFIX = "ed25519:"
#: Ed25519 sizes in bytes: a raw public key, a signature.
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
#: Permission bits that let anyone but the owner at a private key file.
EXPOSED_BITS = stat.S_IRWXG | stat.S_IRWXO


class SigningKeyError(AccessflowError):
    """A private signing key file is missing, readable by others, undecryptable, or not Ed25519."""


# --- signing and verifying ----------------------------------------------------------------------


def sign(private_key: Ed25519PrivateKey, fields: Mapping[str, object], *, key_id: str) -> dict[str, str]:
    """Sign a decision message.

    Parameters
    ----------
    private_key:
        The admin's private key.
    fields:
        The message; any ``"signature"`` member it already has is ignored.
    key_id:
        The id under which the public key is registered (``accessflow admins keys add``).
        It is not signed: a verifier looks the key up by it, then checks the key belongs to
        the message's ``admin_id``, which is signed.

    Returns
    -------
    dict[str, str]
        The ``"signature"`` member: ``key_id``, ``algorithm`` (``"ed25519"``) and ``value``,
        the 64-byte signature in standard base64 with padding.

    Raises
    ------
    ValueError
        ``fields`` has no canonical form (see ``canonical_bytes``), or ``key_id`` is empty.
    """
    if not key_id:
        raise ValueError("key_id is empty")
    signature = private_key.sign(canonical_bytes(fields))
    return {"key_id": key_id, "algorithm": ALGORITHM, "value": base64.b64encode(signature).decode("ascii")}


def verify(public_key_text: str, signature_b64: str, data: bytes) -> bool:
    """Whether ``signature_b64`` is a valid Ed25519 signature of ``data`` by the key.

    Never raises: a malformed key, signature or argument of the wrong type gives ``False``.

    Parameters
    ----------
    public_key_text:
        The public key, as ``parse_public_key`` reads it.
    signature_b64:
        The signature in standard base64 with padding. Only the canonical encoding of 64
        bytes is accepted (88 characters, no whitespace, zero trailing bits), so that each
        signature has one spelling.
    data:
        The signed bytes, normally ``canonical_bytes(message)``.

    Returns
    -------
    bool
        ``True`` only for a valid signature.
    """
    if not isinstance(data, bytes):
        return False
    signature = _strict_b64decode(signature_b64, SIGNATURE_SIZE)
    if signature is None:
        return False
    try:
        public_key = parse_public_key(public_key_text)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def verify_signed(public_key_text: str, message: Mapping[str, object]) -> bool:
    """Whether a whole signed message verifies under the key: its signature member and its bytes.

    Never raises. It does not check which key ``signature.key_id`` names, the admin it
    belongs to, revocation, ``audience`` or freshness: the caller looked the key up and owns
    those rules.

    Parameters
    ----------
    public_key_text:
        The public key registered under ``message["signature"]["key_id"]``.
    message:
        The decoded decision message, ``"signature"`` member included.

    Returns
    -------
    bool
        ``True`` if the signature member is well formed, names ``ed25519`` and verifies over
        the message's canonical bytes.
    """
    if not isinstance(message, Mapping):
        return False
    member = message.get(SIGNATURE_MEMBER)
    if not isinstance(member, Mapping) or member.get("algorithm") != ALGORITHM:
        return False
    value = member.get("value")
    if not isinstance(value, str):
        return False
    try:
        data = canonical_bytes(message)
    except ValueError:
        return False
    return verify(public_key_text, value, data)


def _strict_b64decode(text: object, size: int) -> bytes | None:
    """Exactly ``size`` bytes from their one canonical standard-base64 spelling, else ``None``."""
    if not isinstance(text, str) or len(text) != 4 * -(-size // 3):
        return None
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None
    # b64decode ignores non-zero trailing bits ("...A=" and "...B=" decode alike); re-encoding catches that.
    if len(raw) != size or base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


# --- keys ---------------------------------------------------------------------------------------


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The public key as text.

    Parameters
    ----------
    key:
        A public key, or a private key whose public half is wanted.

    Returns
    -------
    str
        ``ed25519:`` and the standard base64 (with padding) of the raw 32-byte key.
    """
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Read a public key written as text.

    Parameters
    ----------
    text:
        ``ed25519:<standard base64 of the raw 32 bytes>``, or an SPKI PEM block
        (``-----BEGIN PUBLIC KEY-----``, as ``openssl pkey -pubout`` writes) holding an
        Ed25519 key. Surrounding whitespace is ignored.

    Returns
    -------
    Ed25519PublicKey
        The key.

    Raises
    ------
    ValueError
        Any other text, with a message that says what was expected.
    """
    if not isinstance(text, str):
        raise ValueError(f"a public key is text, not {type(text).__name__}")
    stripped = text.strip()
    if stripped.startswith(PUBLIC_KEY_PREFIX):
        raw = _strict_b64decode(stripped[len(PUBLIC_KEY_PREFIX) :], PUBLIC_KEY_SIZE)
        if raw is None:
            raise ValueError(
                "an ed25519: public key must be followed by the standard base64 (with padding) "
                "of exactly 32 bytes: 44 characters"
            )
        return Ed25519PublicKey.from_public_bytes(raw)
    if stripped.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            key = serialization.load_pem_public_key(stripped.encode("ascii"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            raise ValueError(f"not a readable SPKI PEM public key: {error}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"the PEM holds a {type(key).__name__.lstrip('_')}, not an Ed25519 public key")
        return key
    raise ValueError(
        "a public key must be 'ed25519:<base64 of the raw 32 bytes>' "
        "or a PEM block starting with '-----BEGIN PUBLIC KEY-----'"
    )


def generate_keypair(path: Path) -> str:
    """Create an admin's signing keypair.

    Parameters
    ----------
    path:
        Where the private key goes, as unencrypted PKCS#8 PEM with mode 0600. The public key
        text goes to the same path with ``.pub`` appended (``admin.pem`` -> ``admin.pem.pub``;
        appending rather than replacing the suffix means the two can never be the same file).
        The directory must exist.

    Returns
    -------
    str
        The public key text, ``ed25519:...``, to register for the admin.

    Raises
    ------
    FileExistsError
        Either file already exists; nothing is written then, so a key is never overwritten.
    OSError
        The files cannot be written.
    """
    public_path = path.with_name(path.name + ".pub")
    if public_path.exists():
        raise FileExistsError(f"{public_path} already exists; refusing to overwrite a key")
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    text = public_key_text(private_key)
    _write_new(path, pem, mode=0o600)
    try:
        _write_new(public_path, (text + "\n").encode("ascii"), mode=0o644)
    except OSError:
        path.unlink()  # we created it a moment ago: leave no half of a pair behind
        raise
    return text


def _write_new(path: Path, content: bytes, *, mode: int) -> None:
    # O_EXCL: fail rather than overwrite, with no window between a check and the open.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite a key") from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # the umask may have taken bits away; this is the mode we promise
            file.write(content)
    except BaseException:
        path.unlink(missing_ok=True)  # ours, and incomplete: a half-written key is worse than none
        raise


def load_private_key(path: Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """Read an admin's private signing key from a PEM file.

    A file that its group or others may read or write is refused, as OpenSSH refuses one:
    the key may already have been copied, and a warning is easy to miss in a portal's logs.
    Fix it with ``chmod 600 PATH`` (and consider the key compromised if others did read it).

    Parameters
    ----------
    path:
        A PKCS#8 (``-----BEGIN PRIVATE KEY-----``) or traditional PEM file, such as
        ``accessflow keys admin-generate`` or ``openssl genpkey -algorithm ed25519`` writes.
    password:
        The passphrase of an encrypted PEM; ``None`` for an unencrypted one.

    Returns
    -------
    Ed25519PrivateKey
        The key.

    Raises
    ------
    SigningKeyError
        The file is missing or unreadable, readable by others, encrypted without a (right)
        password, not a PEM private key, or not Ed25519.
    """
    try:
        with open(path, "rb") as file:
            # fstat the open file, not the path: the file checked is the file read.
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise SigningKeyError(f"{path} is not a regular file")
            if os.name == "posix" and status.st_mode & EXPOSED_BITS:
                raise SigningKeyError(
                    f"the private key {path} is accessible to others (mode {stat.S_IMODE(status.st_mode):04o}); "
                    f"run `chmod 600 {path}`, and treat the key as compromised if someone else read it"
                )
            pem = file.read()
    except FileNotFoundError:
        raise SigningKeyError(
            f"no private key at {path}; create one with `accessflow keys admin-generate {path}`"
        ) from None
    except OSError as error:
        raise SigningKeyError(f"cannot read the private key {path}: {error.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except TypeError as error:
        # cryptography raises TypeError for a missing password and for one given to a plain key.
        raise SigningKeyError(f"the private key {path}: {error}") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise SigningKeyError(
            f"{path} is not a readable PEM private key (or the password is wrong): {error}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__.lstrip('_')}, not an Ed25519 private key")
    return key
