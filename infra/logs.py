"""structlog for our lines and the standard library's (dramatiq, domain) alike.

JSON when not on a terminal. Ids bound with :func:`structlog.contextvars.bind_contextvars`
(request id, message id) land on every line, and a redaction processor runs before
the renderer so that a secret passed by mistake never reaches the output.

The order is the guarantee: an exception (and a stack) is first formatted to plain text, then
redacted with everything else, and only then rendered, for our lines and for the standard
library's (dramatiq, pika, alembic) alike. A secret in an exception's message, or anywhere in a
traceback's text, is therefore masked like one in a field. Tracebacks are plain text without
local variables: no renderer gets an exception object it could expand (structlog's dict
tracebacks and rich both show locals when asked, and locals hold secrets).

dramatiq writes a message into its log lines as ``actor(args...)`` (``Message.__str__``): at
ERROR when an actor fails, at WARNING when one is skipped. A message's arguments are a
request's payload, with personal data, so :class:`MessageIdsOnly` rewrites every dramatiq
message in a standard library record's arguments to its ids (message id, actor, queue)
before anything formats it, and drops the arguments of the DEBUG line each actor call writes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from domain.outcomes import Outcome
from infra.credentials.issuing import CLIENT_SECRET_PREFIX

#: Keys whose values are replaced wherever they appear in an event.
SENSITIVE_KEYS = re.compile(r"(secret|password|passwd|token|api_?key|seal|authorization)", re.IGNORECASE)
#: Values that look like our API keys (af_<prefix>_<secret>) are masked even under innocent keys.
API_KEY_VALUE = re.compile(r"\b(af_[0-9a-f]{8})_[A-Za-z0-9_-]{20,}")
#: Values that look like our OAuth2 client secrets (afs_<43 url-safe>), masked the same way.
CLIENT_SECRET_VALUE = re.compile(rf"\b({CLIENT_SECRET_PREFIX})[A-Za-z0-9_-]{{20,}}")
REDACTED = "[redacted]"

#: The name of the logger the handlers' outcomes are told on.
OUTCOME_LOGGER = "accessflow.outcomes"


def log_outcome(outcome: Outcome) -> None:
    """Log what a handler did as one structured line: ``request.routed outcome=... request_id=...``.

    The event is the outcome's ``name``; its fields are the outcome's ids and values, next to
    the ids bound to the context (message id, actor). WARNING for refusals and failures.
    """
    fields = dataclasses.asdict(outcome)
    # A logger per line, from the configuration of the moment: a module-level one is frozen to
    # the first configuration it was used under (cache_logger_on_first_use), which would keep
    # structlog.testing.capture_logs from seeing outcomes. It costs microseconds per message.
    outcome_log = structlog.get_logger(OUTCOME_LOGGER)
    if outcome.level == "warning":
        outcome_log.warning(outcome.name, **fields)
    else:
        outcome_log.info(outcome.name, **fields)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return CLIENT_SECRET_VALUE.sub(r"\1" + REDACTED, API_KEY_VALUE.sub(r"\1_" + REDACTED, value))
    if isinstance(value, dict):
        return {k: REDACTED if SENSITIVE_KEYS.search(str(k)) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask sensitive keys and anything shaped like one of our keys."""
    for key in list(event_dict):
        if SENSITIVE_KEYS.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(event_dict[key])
    return event_dict


#: The line dramatiq's ``Actor.__call__`` writes at DEBUG, with the call's arguments as its own.
ACTOR_ARGUMENTS_LINE = "Received args=%r kwargs=%r."


def message_ids(message: Message[Any] | MessageProxy) -> str:
    """How a dramatiq message appears in a log line: its ids, never its arguments or options."""
    return f"message {message.message_id} (actor {message.actor_name}, queue {message.queue_name})"


def _ids_if_message(value: object) -> object:
    return message_ids(value) if isinstance(value, Message | MessageProxy) else value


class MessageIdsOnly(logging.Filter):
    """Replace each dramatiq message among a record's arguments by :func:`message_ids`.

    On the handler, so that it sees every logger's records (dramatiq's worker, its
    middleware, and any library's), not only the one logger a logger-level filter would.
    The record is changed in place, before any formatter reads it; it never drops one.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == ACTOR_ARGUMENTS_LINE:
            record.msg, record.args = "Received a call (arguments not logged).", ()
            return True
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_ids_if_message(arg) for arg in args)
        elif isinstance(args, Mapping):
            record.args = {key: _ids_if_message(value) for key, value in args.items()}
        record.msg = _ids_if_message(record.msg)
        return True


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure structlog and route the standard library's logging through it. Idempotent."""
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Exceptions and stacks become text here, before redact: rendered after it, a secret in an
        # exception's message or a traceback line would reach the output unmasked. Plain text,
        # never locals.
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        # The traceback arrives as text (the "exception" key); the formatter is a fallback that
        # prints without locals, in case an exc_info ever slips past format_exc_info.
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(MessageIdsOnly())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pika", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
