"""Reading a delivered body before dramatiq sees any of it.

dramatiq trusts its envelope: the consumer thread acts on ``options.eta`` as a message
arrives (RELIABILITY.md, pitfall 11), the worker acks through ``consumers[queue_name]``
taken from the body, and an ``actor_name`` that is not a string restarts the consumer.
So every delivery is read here first, by a pure function, and either becomes a
dramatiq :class:`~dramatiq.Message` built from checked fields, or a :class:`Refused`
with a precise reason that the consumer records and acknowledges.

What a delivery may say depends on who published it. RabbitMQ validates the AMQP
``user_id`` property against the publishing connection's user, so it names the sender
truthfully when set. Messages from accessflow's own users (the workers, and operators
replaying dead letters) keep accessflow's bookkeeping options; from anyone else every
option is dropped, and ``origin`` records who published. Internal queues (everything
but the requests and decisions queues, and every delay queue) take only accessflow's
own messages.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import dramatiq

from messages.v1 import MAX_MESSAGE_BYTES

#: Bytes; a little above a contract's limit, for the envelope's own fields.
MAX_ENVELOPE_BYTES = MAX_MESSAGE_BYTES + 16 * 1024
#: Nesting of arrays and objects allowed in a body; a contract needs about six.
MAX_DEPTH = 32
#: Characters of a refused body kept for the operator.
EXCERPT_CHARS = 2000
#: Characters of ``origin`` kept: an AMQP user name is at most 255 bytes, ours far shorter.
MAX_ORIGIN_CHARS = 200
#: Highest ``retries`` kept from the wire; dramatiq's Retries gives up long before.
MAX_RETRIES_OPTION = 1000
#: Milliseconds since the epoch; anything above cannot be a publish time.
MAX_TIMESTAMP_MS = 2**63 - 1

FIELDS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")
DELAY_SUFFIX = ".DQ"

#: Characters in a message id: room for any UUID or hash id, and within the 200 of every
#: ``message_id`` column, so that an id this module accepts can always be stored.
MAX_MESSAGE_ID_CHARS = 128
MESSAGE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_MESSAGE_ID_CHARS - 1}}}")
#: Why an id is refused, as the refusal says it.
MESSAGE_ID_RULE = (
    f"message_id must be 1 to {MAX_MESSAGE_ID_CHARS} characters of A-Z a-z 0-9 . _ : -, "
    "starting with a letter or digit"
)
# A JSON string, escapes included; unrolled so that it runs in linear time.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Bytes that open or close a level, and everything else, which the depth scan deletes.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# A JSON escape of a UTF-16 surrogate: the only way a lone one can get past strict UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

Kind = Literal["malformed", "forged"]


@dataclass(frozen=True)
class Accepted:
    """A delivery dramatiq may process: its message is built only from checked fields."""

    message: dramatiq.Message[Any]
    message_id: str


@dataclass(frozen=True)
class Refused:
    """A delivery that must not reach an actor, and why; every field is safe to store and log."""

    message_id: str
    actor_name: str
    reason: str
    kind: Kind
    body_excerpt: str


class Unreadable(ValueError):
    """The body is not a JSON document this module will read; the message says why."""


def read_envelope(
    body: bytes,
    *,
    delivered_on: str,
    actors: Mapping[str, str],
    user_id: str | None,
    internal_senders: frozenset[str],
    external_queues: frozenset[str],
    now_ms: int,
    max_delay_ms: int,
    amqp_message_id: str | None = None,
) -> Accepted | Refused:
    """Check one delivered body, and build the message dramatiq will process.

    Parameters:
      body: the delivery's bytes, whatever they are.
      delivered_on: the queue the consumer reads: a work queue or its ``.DQ``.
      actors: each actor name and its canonical queue.
      user_id: the delivery's AMQP ``user_id`` (validated by RabbitMQ), None if unset.
      internal_senders: AMQP users whose messages are accessflow's own.
      external_queues: canonical queues outside parties may publish to.
      now_ms: the current time, milliseconds since the epoch.
      max_delay_ms: the longest a delay-queue message may wait, in milliseconds.
      amqp_message_id: the delivery's AMQP ``message_id``, to name a refusal whose
        body has no usable id.

    Returns:
      :class:`Accepted` with the message, or :class:`Refused` with the reason.
    """
    internal_sender = user_id is not None and user_id in internal_senders
    canonical = delivered_on.removesuffix(DELAY_SUFFIX)
    internal_queue = delivered_on.endswith(DELAY_SUFFIX) or canonical not in external_queues

    fields: dict[str, Any] | None = None
    problem: str | None = None
    try:
        document = parse_json(body)
    except Unreadable as unreadable:
        problem = str(unreadable)
    else:
        if isinstance(document, dict):
            fields = document
        else:
            problem = f"the body must be a JSON object (dramatiq's envelope), not {_json_type(document)}"

    message_id = _message_id_of(fields, body, amqp_message_id)
    actor_name = _actor_name_of(fields)

    def refuse(reason: str, kind: Kind = "malformed") -> Refused:
        return Refused(
            message_id=message_id, actor_name=actor_name, reason=reason, kind=kind, body_excerpt=excerpt(body)
        )

    if internal_queue and not internal_sender:
        sender = _show(user_id) if user_id is not None else "a sender that did not set user_id"
        return refuse(
            f"{delivered_on} accepts only accessflow's own messages; published by {sender}", "forged"
        )
    if fields is None:
        return refuse(problem or "unreadable body")
    problem = _envelope_problem(fields, delivered_on=delivered_on, canonical=canonical, actors=actors)
    if problem is not None:
        return refuse(problem)

    if internal_sender:
        options = _own_options(
            fields["options"], delayed=delivered_on != canonical, latest_eta=now_ms + max_delay_ms
        )
        # A message a worker re-published keeps the origin it was first received with; one an
        # internal user published first is its own origin. On a broker with one user for
        # everything (development) that makes the one user a portal's sender; in production
        # no portal is registered under the workers' or the operators' user, so nothing gains.
        options.setdefault("origin", user_id)
    else:
        options = {} if user_id is None else {"origin": user_id[:MAX_ORIGIN_CHARS]}
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=delivered_on,
        actor_name=fields["actor_name"],
        args=tuple(fields["args"]),
        kwargs=fields["kwargs"],
        options=options,
        message_id=fields["message_id"],
        message_timestamp=fields["message_timestamp"],
    )
    return Accepted(message=message, message_id=fields["message_id"])


def parse_json(body: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Any:
    """Parse ``body`` as strict JSON, bounded in size and depth, without lone surrogates.

    Raises:
      Unreadable: with a reason fit for an operator, for any body that is not such JSON.
    """
    if len(body) > max_bytes:
        raise Unreadable(f"the body is {len(body)} bytes, more than the {max_bytes} allowed")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Unreadable(f"the body is not UTF-8 (byte {error.start})") from None
    if nesting_depth(body) > MAX_DEPTH:
        raise Unreadable(f"the body nests arrays and objects more than {MAX_DEPTH} deep")
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:  # the depth scan should have caught it; never let it escape
        raise Unreadable("the body nests too deeply to read") from None
    except json.JSONDecodeError as error:
        raise Unreadable(f"the body is not JSON: {error.msg} at character {error.pos}") from None
    except ValueError as error:  # duplicate keys, NaN, an integer with thousands of digits
        raise Unreadable(f"the body is not strict JSON: {_one_line(str(error))}") from None
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(document):
        raise Unreadable("the body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")
    return document


def nesting_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in ``body``, counted without parsing it.

    Exact for valid JSON up to ``MAX_DEPTH + 1``, where it stops counting; for anything
    else an estimate, good enough to refuse early.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest  # enough to refuse; counting on is wasted work
        else:
            depth -= 1
    return deepest


def is_message_id(value: object) -> bool:
    """Whether ``value`` is an id accessflow uses to name a message: see :data:`MESSAGE_ID_RULE`."""
    return isinstance(value, str) and MESSAGE_ID.fullmatch(value) is not None


def body_id(body: bytes) -> str:
    """A stable id for a body that carries none: its SHA-256."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


def excerpt(body: bytes, limit: int = EXCERPT_CHARS) -> str:
    """The start of ``body`` as text safe to store: invalid UTF-8 and NUL shown as escapes."""
    text = body[: limit * 4].decode("utf-8", errors="backslashreplace")
    return safe_text(text)[:limit]


def safe_text(text: str) -> str:
    """``text`` with lone surrogates and NUL written as escapes, so PostgreSQL can store it."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _envelope_problem(
    fields: dict[str, Any], *, delivered_on: str, canonical: str, actors: Mapping[str, str]
) -> str | None:
    missing = [name for name in FIELDS if name not in fields]
    unknown = sorted(name for name in fields if name not in FIELDS)
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if unknown:
            parts.append("unknown " + ", ".join(_show(name) for name in unknown[:5]))
        return f"the envelope must have exactly the fields {', '.join(FIELDS)}: {'; '.join(parts)}"
    queue_name = fields["queue_name"]
    if not isinstance(queue_name, str):
        return f"queue_name must be a string, not {_json_type(queue_name)}"
    if queue_name != delivered_on:
        return f"queue_name {_show(queue_name)} is not the queue it was delivered on ({delivered_on})"
    if not is_message_id(fields["message_id"]):
        return MESSAGE_ID_RULE
    actor_name = fields["actor_name"]
    if not isinstance(actor_name, str):
        return f"actor_name must be a string, not {_json_type(actor_name)}"
    if actor_name not in actors:
        return f"no actor is named {_show(actor_name)}"
    if actors[actor_name] != canonical:
        return f"actor {_show(actor_name)} consumes {actors[actor_name]}, not {canonical}"
    if not isinstance(fields["args"], list):
        return f"args must be an array, not {_json_type(fields['args'])}"
    if not isinstance(fields["kwargs"], dict):
        return f"kwargs must be an object, not {_json_type(fields['kwargs'])}"
    if not isinstance(fields["options"], dict):
        return f"options must be an object, not {_json_type(fields['options'])}"
    timestamp = fields["message_timestamp"]
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        return f"message_timestamp must be an integer (milliseconds), not {_json_type(timestamp)}"
    if not 0 <= timestamp <= MAX_TIMESTAMP_MS:
        return "message_timestamp is out of range"
    return None


def _own_options(options: dict[str, Any], *, delayed: bool, latest_eta: int) -> dict[str, Any]:
    """The bookkeeping accessflow itself writes into options; nothing else survives."""
    kept: dict[str, Any] = {}
    retries = options.get("retries")
    if _is_int(retries) and retries >= 0:
        kept["retries"] = min(retries, MAX_RETRIES_OPTION)
    eta = options.get("eta")
    if delayed and _is_int(eta):
        # Even our own eta holds a prefetch slot while it waits: never longer than the longest backoff.
        kept["eta"] = min(eta, latest_eta)
    origin = options.get("origin")
    if isinstance(origin, str) and 0 < len(origin) <= MAX_ORIGIN_CHARS:
        kept["origin"] = origin
    return kept


def _message_id_of(fields: dict[str, Any] | None, body: bytes, amqp_message_id: str | None) -> str:
    if fields is not None and is_message_id(fields.get("message_id")):
        return str(fields["message_id"])
    if is_message_id(amqp_message_id):
        return str(amqp_message_id)
    return body_id(body)


def _actor_name_of(fields: dict[str, Any] | None) -> str:
    name = fields.get("actor_name") if fields is not None else None
    return safe_text(name[:200]) if isinstance(name, str) else ""


def _show(value: str) -> str:
    """``value`` quoted, as ASCII with every control character and surrogate escaped, and short."""
    shown = json.dumps(value[:80])
    return shown + "..." if len(value) > 80 else shown


def _one_line(text: str) -> str:
    return safe_text(" ".join(text.split()))[:200]


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case dict():
            return "an object"
    return type(value).__name__


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different copies of a repeated key; refuse the ambiguity.
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {_show(key)}")
            seen.add(key)
    return document


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _has_lone_surrogate(value: Any) -> bool:
    # The depth is bounded by MAX_DEPTH before this runs, so the recursion is too.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False
