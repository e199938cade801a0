"""AMQP connection parameters: URLs with heartbeats and timeouts, and the user our publishes carry."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
import pika.exceptions
import pika.spec
from dramatiq.errors import ConnectionClosed

from infra.settings import split_broker_urls


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


def connection_parameters(url: str | Sequence[str]) -> list[pika.URLParameters]:
    """pika's parameters for each node ``url`` names, with :func:`amqp_url_with_timeouts` applied.

    ``url`` is one AMQP URL, several separated by commas (``ACCESSFLOW_BROKER_URL``, read by
    :func:`infra.settings.split_broker_urls`), or a list of URLs. pika's connections accept the
    list and try each node in turn, in this order, until one answers: so every reconnect, after
    a node died, lands on a surviving one.
    """
    urls = split_broker_urls(url) if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("no broker URL given")
    return [pika.URLParameters(amqp_url_with_timeouts(u)) for u in urls]
