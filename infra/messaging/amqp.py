"""AMQP connection parameters: URLs with heartbeats and timeouts, and the user our publishes carry."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
import pika.exceptions
import pika.spec
from dramatiq.errors import ConnectionClosed


def connection_closed(error: Exception) -> ConnectionClosed:
    return ConnectionClosed(error)  # type: ignore[no-untyped-call]


def broker_user(parameters: pika.connection.Parameters | Sequence[pika.connection.Parameters]) -> str:
    """The AMQP user of these connection parameters: the user_id our publishes carry."""
    first = parameters[0] if isinstance(parameters, Sequence) else parameters
    return str(first.credentials.username)


def amqp_url_with_timeouts(url: str) -> str:
    """Add heartbeat and timeouts to an AMQP URL that does not set them, so a dead peer is noticed."""
    defaults = {"heartbeat": "30", "blocked_connection_timeout": "60", "socket_timeout": "10"}
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode({**defaults, **query})))
