"""How many messages wait in each queue, and how many consumers read it, over plain AMQP.

A passive ``queue.declare`` answers both (``message_count``, ``consumer_count``) without
the management plugin, and creates nothing: a queue that was never declared answers 404,
and is reported as absent rather than made. RabbitMQ closes the channel on that answer,
so each absent queue costs a new channel, never a new connection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pika
import pika.exceptions

from infra.messaging.amqp import connection_parameters

#: The AMQP reply code for a queue that does not exist.
NOT_FOUND = 404


@dataclass(frozen=True)
class QueueDepth:
    """One queue as the broker sees it now; ``messages`` and ``consumers`` are None if it is absent."""

    name: str
    messages: int | None
    consumers: int | None
    #: Why there are no figures: "not declared", or the broker's refusal ("403 ACCESS_REFUSED ...").
    note: str = ""


@contextmanager
def quiet_channel_closes() -> Iterator[None]:
    """pika logs a warning for every channel the broker closes; here a 404 is an answer, not news."""
    logger = logging.getLogger("pika.channel")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def queue_depths(broker_url: str, names: Iterable[str]) -> list[QueueDepth]:
    """Each of ``names`` with its ready messages and consumers, in order, over one connection.

    Parameters:
      broker_url: the AMQP URL to ask, or a cluster's comma-separated URLs; any user with
        access to the vhost will do.
      names: full queue names (``<prefix>.requests.XQ``...).

    Returns:
      One :class:`QueueDepth` per name. Messages delivered and not yet acknowledged are not
      counted, as RabbitMQ does not count them in ``message_count``.

    Raises:
      pika.exceptions.AMQPError: the broker is unreachable, or refused the connection.
    """
    connection = pika.BlockingConnection(connection_parameters(broker_url))  # a cluster: the first up
    try:
        with quiet_channel_closes():
            channel = connection.channel()
            found = []
            for name in names:
                try:
                    method = channel.queue_declare(queue=name, passive=True).method
                except pika.exceptions.ChannelClosedByBroker as error:
                    note = (
                        "not declared"
                        if error.reply_code == NOT_FOUND
                        else f"{error.reply_code} {error.reply_text}"
                    )
                    found.append(QueueDepth(name, None, None, note))
                    channel = connection.channel()
                    continue
                found.append(QueueDepth(name, int(method.message_count), int(method.consumer_count)))
            return found
    finally:
        if connection.is_open:
            connection.close()
