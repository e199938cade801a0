"""Publishing as a portal or an admin tool does, with publisher confirms, as fast as asked.

pika's blocking channel waits for each confirm in turn (one round trip per message),
which would make the publisher, not accessflow, the bottleneck of a burst. This one runs
pika's asynchronous :class:`pika.SelectConnection` in the calling thread and keeps
publishing while confirms come back (``window`` of them may be outstanding), and it can
follow a schedule of send times (an open-loop load: a message is sent when it is due,
whether or not earlier ones were confirmed or handled). It returns once every message
is confirmed; a message nacked or returned (``mandatory``, unroutable) is an error.

Bodies are dramatiq's JSON envelope around a contract payload, built here the way a
producer in another language builds them (README: The message contract).
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.channel
import pika.connection
import pika.frame
import pika.spec

from bench.tracking import HarnessError


def envelope(queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str) -> bytes:
    """dramatiq's envelope around one contract payload."""
    return json.dumps(
        {
            "queue_name": queue_name,
            "actor_name": actor_name,
            "args": [dict(payload)],
            "kwargs": {},
            "options": {},
            "message_id": message_id,
            "message_timestamp": int(time.time() * 1000),
        },
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True)
class Message:
    body: bytes
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Published:
    """What a :meth:`ConfirmingPublisher.publish` call did."""

    #: Monotonic time each message was handed to the socket, in the order given.
    sent_at: list[float]
    confirmed: int
    #: Seconds from the first send to the last confirm.
    seconds: float

    def lateness(self, schedule: Sequence[float]) -> float:
        """How far behind its schedule the latest send was, in seconds (0 when on time)."""
        return max((sent - due for sent, due in zip(self.sent_at, schedule, strict=True)), default=0.0)


class ConfirmingPublisher:
    """One AMQP user's publishes to one exchange and routing key, with ``user_id`` and confirms."""

    def __init__(self, url: str, *, exchange: str, routing_key: str, user_id: str) -> None:
        self.parameters = pika.URLParameters(url)
        self.exchange = exchange
        self.routing_key = routing_key
        self.user_id = user_id

    def publish(
        self,
        messages: Sequence[Message],
        *,
        schedule: Sequence[float] | None = None,
        window: int | None = 1000,
        timeout: float = 300.0,
    ) -> Published:
        """Publish ``messages`` (persistent, mandatory) and wait for every confirm.

        Parameters:
          messages: what to send, in order.
          schedule: monotonic due times, one per message (an open loop); None sends at once.
          window: at most this many unconfirmed messages at a time; None for no limit
            (what an open loop needs: confirms must not hold the schedule back).
          timeout: seconds the whole call may take.

        Raises:
          HarnessError: a message was nacked or returned, the connection or channel
            closed, or ``timeout`` passed.
        """
        if schedule is not None and len(schedule) != len(messages):
            raise ValueError("one due time per message")
        run = _Run(self, messages, schedule, window, timeout)
        return run.go()


class _Run:
    """The state of one publish call, driven by pika's ioloop callbacks."""

    def __init__(
        self,
        publisher: ConfirmingPublisher,
        messages: Sequence[Message],
        schedule: Sequence[float] | None,
        window: int | None,
        timeout: float,
    ) -> None:
        self.publisher = publisher
        self.messages = messages
        self.schedule = schedule
        self.window = window
        self.timeout = timeout
        self.sent_at: list[float] = []
        self.next = 0
        self.outstanding: collections.deque[int] = collections.deque()
        self.answered: set[int] = set()  # tags acked or nacked out of order
        self.confirmed = 0
        self.failures: list[str] = []
        self.channel: pika.channel.Channel | None = None
        self.connection: pika.SelectConnection | None = None
        self.timer: Any = None
        self.last_confirm = 0.0
        self.finished = False

    def go(self) -> Published:
        if not self.messages:
            return Published([], 0, 0.0)
        self.connection = pika.SelectConnection(
            self.publisher.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self.connection.ioloop.call_later(self.timeout, self._on_timeout)
        self.connection.ioloop.start()
        if self.failures:
            raise HarnessError("publishing failed: " + "; ".join(self.failures[:5]))
        if self.confirmed != len(self.messages):
            raise HarnessError(f"publishing stopped with {self.confirmed} of {len(self.messages)} confirmed")
        return Published(self.sent_at, self.confirmed, self.last_confirm - self.sent_at[0])

    # ---- connection and channel

    def _on_open(self, connection: pika.connection.Connection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, connection: pika.connection.Connection, error: BaseException | str) -> None:
        self.failures.append(f"cannot connect: {error}")
        assert self.connection is not None
        self.connection.ioloop.stop()

    def _on_closed(self, connection: pika.connection.Connection, reason: BaseException) -> None:
        if not self.finished:
            self.failures.append(f"connection closed: {reason}")
        assert self.connection is not None
        self.connection.ioloop.stop()

    def _on_channel(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: self._pump())

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if not self.finished:
            self.failures.append(f"channel closed: {reason}")
            self._close()

    def _on_return(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Return,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        self.failures.append(f"returned as unroutable: {method.reply_code} {method.reply_text}")

    def _on_timeout(self) -> None:
        if not self.finished:
            self.failures.append(
                f"timed out after {self.timeout:.0f}s with {self.next} of {len(self.messages)} sent "
                f"and {self.confirmed} confirmed"
            )
            self._close()

    def _close(self) -> None:
        self.finished = True
        if self.timer is not None and self.connection is not None:
            self.connection.ioloop.remove_timeout(self.timer)
            self.timer = None
        if self.connection is not None and self.connection.is_open:
            self.connection.close()
        elif self.connection is not None:
            self.connection.ioloop.stop()

    # ---- publishing

    def _pump(self) -> None:
        self.timer = None
        if self.finished or self.channel is None:
            return
        properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, user_id=self.publisher.user_id
        )
        now = time.monotonic()
        while self.next < len(self.messages):
            if self.window is not None and len(self.outstanding) - len(self.answered) >= self.window:
                return  # the next confirm pumps again
            if self.schedule is not None and self.schedule[self.next] > now:
                assert self.connection is not None
                self.timer = self.connection.ioloop.call_later(self.schedule[self.next] - now, self._pump)
                return
            message = self.messages[self.next]
            properties.message_id = message.message_id
            self.channel.basic_publish(
                self.publisher.exchange,
                self.publisher.routing_key,
                message.body,
                properties=properties,
                mandatory=True,
            )
            now = time.monotonic()
            self.sent_at.append(now)
            self.next += 1
            self.outstanding.append(self.next)  # delivery tags count from 1

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        tag = method.delivery_tag
        if isinstance(method, pika.spec.Basic.Nack):
            self.failures.append(f"nacked by the broker (delivery tag {tag})")
            self._close()
            return
        if method.multiple:
            while self.outstanding and self.outstanding[0] <= tag:
                head = self.outstanding.popleft()
                if head in self.answered:
                    self.answered.discard(head)
                else:
                    self.confirmed += 1
        elif self.outstanding and self.outstanding[0] == tag:
            self.outstanding.popleft()
            self.confirmed += 1
        else:
            self.answered.add(tag)
            self.confirmed += 1
        while self.outstanding and self.outstanding[0] in self.answered:
            self.answered.discard(self.outstanding.popleft())
        self.last_confirm = time.monotonic()
        if self.failures or self.confirmed == len(self.messages):
            self._close()
        elif self.timer is None:
            self._pump()
