"""How an actor function becomes a dramatiq actor: decoding and bad input, in one place.

Every actor receives its contract already validated. A payload that fails validation is
recorded in ``malformed_messages`` with the validator's reason and acknowledged: retrying
cannot fix it, and it must not block the messages behind it. A forged one (``Unauthorized``)
is recorded the same way; a transient error is retried with backoff, in one log line. A
:class:`~domain.errors.PermanentDeliveryError` (a gateway's 4xx) is never retried: Retries
fails the message at once (``throws``), and it is dead-lettered with its reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dramatiq
import structlog
from dramatiq.errors import Retry
from dramatiq.middleware import CurrentMessage
from pydantic import ValidationError

from domain.errors import PermanentDeliveryError, TransientError, Unauthorized
from infra.messaging.delivery import transient_database_error
from messages.validation import decode, explain

if TYPE_CHECKING:
    from infra.bootstrap import Services
    from workers.registry import Actor

log = structlog.get_logger()


def register(declared: Actor[Any], services: Services) -> None:
    """Make ``declared`` a dramatiq actor on the services' broker, consuming its route's queue."""
    route, fn = declared.route, declared.fn
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
        credential_id = getattr(message, "credential_id", None)  # a gateway push names no request
        if credential_id is not None:
            structlog.contextvars.bind_contextvars(credential_id=credential_id)
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
    dramatiq.actor(
        actor_name=route.actor_name,
        queue_name=queue_name,
        broker=services.broker,
        # Refused for good: retrying cannot change the answer, and would only delay the dead letter.
        throws=(PermanentDeliveryError,),
    )(consume)
