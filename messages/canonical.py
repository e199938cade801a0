"""The canonical form of a signed message: the exact bytes an admin's signature covers.

Part of the wire contract (``asyncapi.yaml``, "Signing admin decisions"): a producer in any
language derives the same bytes, and a worker rebuilds them from the message it received.
``infra.credentials.signing`` signs and verifies these bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

#: The member that carries the signature; it is never part of the signed bytes.
SIGNATURE_MEMBER = "signature"
#: The largest integer every JSON implementation reads exactly (an IEEE 754 double holds it).
MAX_SAFE_INTEGER = 2**53 - 1


def canonical_bytes(fields: Mapping[str, object]) -> bytes:
    """The bytes a decision's signature covers.

    Parameters
    ----------
    fields:
        The decision message as a JSON object. A ``"signature"`` member is left out. Member
        names must be ASCII strings; values must be strings or integers of at most 2**53 - 1
        in magnitude. Anything else (floats, booleans, null, nested objects or arrays, lone
        surrogates) is refused, because languages disagree on how to write it and a
        signature must cover bytes that every producer derives identically.

    Returns
    -------
    bytes
        UTF-8 of the JSON object with members sorted by name, separators ``,`` and ``:`` and
        non-ASCII characters unescaped (RFC 8785 for these types).

    Raises
    ------
    ValueError
        A name or value outside the types above.
    """
    if not isinstance(fields, Mapping):
        raise ValueError(f"a signed message is a JSON object, not {type(fields).__name__}")
    unsigned: dict[str, str | int] = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            raise ValueError(f"member names must be strings, not {type(name).__name__}: {name!r}")
        # Python sorts names by code point, JavaScript and RFC 8785 by UTF-16 unit: they agree on ASCII.
        if not name.isascii():
            raise ValueError(f"member names must be ASCII: {name!r}")
        if name == SIGNATURE_MEMBER:
            continue
        unsigned[name] = _signable_value(name, value)
    text = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _signable_value(name: str, value: object) -> str | int:
    # bool is an int in Python; JSON writes it as true/false, which is not a signed type here.
    if isinstance(value, bool):
        raise ValueError(f"{name}: booleans are not signed; only strings and integers are")
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError(f"{name}: {value} is beyond 2**53 - 1, which not every language reads exactly")
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate has no UTF-8 form; JSON libraries escape or replace it each their own way.
            raise ValueError(f"{name}: holds a lone surrogate, which has no UTF-8 encoding") from None
        return value
    if isinstance(value, float):
        raise ValueError(f"{name}: floats are not signed; languages write them differently")
    raise ValueError(f"{name}: {type(value).__name__} values are not signed; only strings and integers are")
