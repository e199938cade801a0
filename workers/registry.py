"""How an actor function becomes a dramatiq actor: decoding and bad input, in one place.

Every actor receives its contract already validated. A payload that fails
validation is recorded in ``malformed_messages`` with the validator's reason and
acknowledged: retrying cannot fix it, and it must not block the messages behind it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import dramatiq
import structlog
from dramatiq.errors import Retry
from dramatiq.middleware import CurrentMessage
from pydantic import BaseModel, ValidationError

from domain.errors import TransientError, Unauthorized
from infra.faults import poison_check
from infra.messaging.delivery import transient_database_error
from messages.routes import Route
from messages.v1 import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from infra.bootstrap import Services

log = structlog.get_logger()

C = TypeVar("C", bound=BaseModel)
ActorFunction = Callable[[Any, "Services", "str | None"], None]

#: Every actor, filled by the ``@actor`` decorator when ``workers.actors`` is imported.
ACTORS: list[tuple[Route, ActorFunction]] = []


def actor(
    route: Route,
) -> Callable[[Callable[[C, Services, str | None], None]], Callable[[C, Services, str | None], None]]:
    """Declare the function that consumes ``route``'s queue."""

    def declare(fn: Callable[[C, Services, str | None], None]) -> Callable[[C, Services, str | None], None]:
        ACTORS.append((route, fn))
        return fn

    return declare


def explain(error: ValidationError) -> str:
    """One line per problem, naming the field, without echoing the (possibly huge) input."""
    return "; ".join(f"{_location(problem['loc'])}: {problem['msg']}" for problem in error.errors())


def _location(loc: tuple[int | str, ...]) -> str:
    # A field name can come from the input: escape it, so a crafted key cannot break a line.
    return ".".join(str(part).encode("unicode_escape").decode() for part in loc) or "message"


def decode(route: Route, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseModel:
    """Validate the envelope's arguments against the route's contract.

    Raises:
      ValueError: the arguments are not one JSON object within the size limit.
      ValidationError: the object does not satisfy the contract.
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        raise ValueError("the envelope must carry exactly one positional argument, a JSON object")
    if len(json.dumps(args[0], default=str)) > MAX_MESSAGE_BYTES:
        raise ValueError(f"payload is larger than {MAX_MESSAGE_BYTES} bytes")
    return route.contract_for(args[0]).model_validate(args[0])


def register_all(services: Services) -> None:
    import workers.actors  # noqa: F401  -- fills ACTORS

    for route, fn in ACTORS:
        _register(route, fn, services)


def _register(route: Route, fn: ActorFunction, services: Services) -> None:
    queue_name = route.queue_name(services.settings.queue_prefix)

    def consume(*args: Any, **kwargs: Any) -> None:
        current = CurrentMessage.get_current_message()
        message_id = current.message_id if current is not None else "unknown"
        # Set where the message was received, from RabbitMQ's validated user_id (infra.messaging.envelope).
        origin = current.options.get("origin") if current is not None else None
        sender = origin if isinstance(origin, str) else None

        def refuse(kind: str, reason: str) -> None:
            log.warning(f"message.{kind}", queue=queue_name, reason=reason, sender=sender)
            services.record_malformed(
                message_id=message_id,
                queue_name=queue_name,
                actor_name=route.actor_name,
                reason=reason,
                body={"args": args, "kwargs": kwargs},
                sender=sender,
                kind=kind,
            )

        try:
            message = decode(route, args, kwargs)
        except (ValueError, ValidationError) as error:
            refuse("malformed", explain(error) if isinstance(error, ValidationError) else str(error))
            return
        request_id = getattr(message, "request_id", None)
        if request_id is not None:
            structlog.contextvars.bind_contextvars(request_id=request_id)
        poison_check(request_id)
        try:
            fn(message, services, sender)
        except Unauthorized as refused:
            refuse("forged", refused.reason)  # changes nothing, and retrying cannot make it allowed
        except TransientError as error:
            # Expected, and retried with backoff: one line in the log, not an ERROR with a traceback.
            raise Retry(str(error)) from None
        except Exception as error:
            # A dead database connection, or a database down or busy, is transient too: retried,
            # never dead-lettered at once (the pool has already dropped a dead connection).
            transient = transient_database_error(error)
            if transient is None:
                raise
            raise Retry(str(transient)) from None

    consume.__qualname__ = consume.__name__ = fn.__name__
    dramatiq.actor(actor_name=route.actor_name, queue_name=queue_name, broker=services.broker)(consume)
