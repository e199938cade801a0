"""Publishing with publisher confirms: what the outbox relay hands to RabbitMQ, and how it learns what arrived.

:class:`BatchConfirmPublisher` keeps one connection per process, owned by one I/O thread that
runs pika's public ``SelectConnection``: callers hand it batches and wait for the broker's
confirms, each wait bounded (connect, confirm-select, confirms, close), its state bounded by
the messages in flight. :class:`DramatiqPublisher` is the same port on any dramatiq broker,
for the demo's in-memory one. The relay (:mod:`infra.messaging.relay`) asks a publisher that
can say so why a message went unconfirmed (:class:`ExplainingPublisher`).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import dramatiq
import pika
import pika.exceptions
import pika.spec
import structlog
from dramatiq.brokers.rabbitmq import (
    RabbitmqBroker,
)
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.selector_ioloop_adapter import SelectorIOServicesAdapter

from infra.messaging.amqp import broker_user, connection_parameters

log = structlog.get_logger()


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: a contract payload, its queue and actor, and its id.

    With ``exchange`` set it is an event for portals instead: the payload itself, as
    JSON, goes to that exchange with ``routing_key`` (default: ``queue_name``), not a
    dramatiq envelope to a queue.
    """

    queue_name: str
    actor_name: str
    payload: Mapping[str, Any]
    message_id: str
    exchange: str = ""
    routing_key: str | None = None

    def event_properties(self, user_id: str | None) -> pika.BasicProperties:
        event = self.payload.get("event")
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=self.message_id,
            user_id=user_id,
            type=event if isinstance(event, str) else None,
        )

    def event_routing_key(self) -> str:
        return self.routing_key if self.routing_key is not None else self.queue_name

    def event_body(self) -> bytes:
        return json.dumps(dict(self.payload)).encode()

    def envelope(self) -> dramatiq.Message[Any]:
        return dramatiq.Message(
            queue_name=self.queue_name,
            actor_name=self.actor_name,
            args=(dict(self.payload),),
            kwargs={},
            options={},
            message_id=self.message_id,
            message_timestamp=int(time.time() * 1000),
        )


class Publisher(Protocol):
    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        """Hand one message to the broker; return only once the broker has accepted it."""
        ...

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        """Hand several messages to the broker; return the ids of those it confirmed."""
        ...

    def close(self) -> None:
        """Release connections of the publisher's own."""
        ...


@dataclass(frozen=True)
class PublishOutcome:
    """What the broker said about each message of a batch, for the outbox relay to act on."""

    #: Acked, and neither returned nor nacked.
    confirmed: set[str]
    #: Refused for itself, with why: returned as unroutable (``mandatory``), or the one message of
    #: a batch on which the broker closed the channel. Sent again, it will likely be refused again.
    refused: dict[str, str] = field(default_factory=dict)
    #: Nacked: the broker could not take it just now (a full queue, an internal error).
    nacked: set[str] = field(default_factory=set)
    #: Why the rest got no answer (connection lost, confirms timed out); None if all got one.
    unanswered: str | None = None
    #: The broker itself ended the batch over one of its messages (it closed the channel: no such
    #: exchange, access refused, too large): it is up, and smaller batches tell which message.
    closed_by_broker: bool = False


@runtime_checkable
class ExplainingPublisher(Protocol):
    """A :class:`Publisher` that also says why a message was not confirmed."""

    def publish_explained(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        """Hand several messages to the broker; say what became of each."""
        ...


class DramatiqPublisher:
    """Publishes through a dramatiq broker, one message at a time.

    On RabbitMQ the broker is built with publisher confirms and ``mandatory``, so
    :meth:`publish` returns only once the message is on a queue. The CLI and the
    in-memory demo use this; the workers' outbox relay uses :class:`BatchConfirmPublisher`.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        #: Events for portals, kept here when the broker is in memory: no portal listens there.
        self.events: list[Outgoing] = []

    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        self.broker.enqueue(Outgoing(queue_name, actor_name, payload, message_id).envelope())

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        confirmed: set[str] = set()
        for message in messages:
            try:
                if message.exchange:
                    self._publish_event(message)
                else:
                    self.broker.enqueue(message.envelope())
            except Exception as error:
                log.warning("publish.failed", message_id=message.message_id, error=type(error).__name__)
                break
            confirmed.add(message.message_id)
        return confirmed

    def _publish_event(self, message: Outgoing) -> None:
        if not isinstance(self.broker, RabbitmqBroker):
            # The in-memory broker has exchanges for nobody: the demo and unit tests read them here.
            self.events.append(message)
            return
        if not self.broker.confirm_delivery:
            raise RuntimeError("events are published only with publisher confirms")
        try:
            # With confirms on, pika raises if the event is nacked or returned (mandatory).
            self.broker.channel.basic_publish(
                exchange=message.exchange,
                routing_key=message.event_routing_key(),
                body=message.event_body(),
                properties=message.event_properties(getattr(self.broker, "user_id", None)),
                mandatory=True,
            )
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
            del self.broker.connection  # the next publish opens a fresh connection and channel
            raise

    def close(self) -> None:
        pass  # the broker, and its connections, belong to whoever built it


class _Batch:
    """One caller's messages on their way to the broker, and what the broker said of each.

    The caller builds it and waits on :attr:`done`; from then on only the publisher's I/O
    thread writes to it, until it sets :attr:`done`. :attr:`confirmed` is the answer.
    """

    __slots__ = (
        "acked",
        "alone",
        "closed_by_broker",
        "confirmed",
        "deadline",
        "done",
        "finished",
        "frames",
        "ids",
        "passes",
        "rejected",
        "returned",
        "timer",
        "unanswered",
        "why",
    )

    def __init__(self, frames: list[_Frame], deadline: float, *, alone: bool = False) -> None:
        self.frames = frames
        self.ids = {frame.message_id for frame in frames}
        self.deadline = deadline
        #: Published only while no other batch is in flight on the channel, and none goes out
        #: beside it: a channel the broker closes meanwhile was closed over one of its messages.
        self.alone = alone
        self.unanswered = len(frames)
        self.acked: set[str] = set()
        #: Nacked, or returned as unroutable (``mandatory``): not confirmed even if acked after.
        self.rejected: set[str] = set()
        #: Message id -> why the broker returned it (a subset of :attr:`rejected`).
        self.returned: dict[str, str] = {}
        #: Why the batch was finished with messages unanswered; None while it was not.
        self.why: str | None = None
        #: The broker closed the channel while the batch was in flight (its reply), if it did.
        self.closed_by_broker: str | None = None
        self.confirmed: set[str] = set()
        self.finished = False
        self.timer: Any = None
        self.done = threading.Event()
        #: How many times the caller's wait went to sleep: once, when the confirms end it.
        self.passes = 0

    def wait(self, grace: float) -> bool:
        """Sleep until the I/O thread finishes the batch; False if it has not ``grace`` s past the deadline.

        The I/O thread finishes every batch by its deadline, with what was confirmed by
        then; the grace is a backstop for an I/O thread that cannot run at all.
        """
        while not self.done.is_set():
            remaining = self.deadline + grace - time.monotonic()
            if remaining <= 0:
                return False
            self.passes += 1
            self.done.wait(remaining)
        return True

    def confirmed_so_far(self) -> set[str]:
        """What the broker confirmed of the batch up to now; safe from the caller's thread."""
        # Copies made by C code, each atomic under the GIL; a return always precedes its ack.
        rejected = set(self.rejected)
        return set(self.acked) - rejected

    def outcome(self, confirmed: set[str], why: str | None) -> PublishOutcome:
        """What became of each message, for :meth:`BatchConfirmPublisher.publish_explained`.

        ``confirmed`` is the batch's answer (or what was confirmed so far, for a batch the
        I/O thread never finished); every message neither confirmed nor answered otherwise
        is unanswered, and ``why`` (or the batch's own reason) says why.
        """
        returned = dict(self.returned)
        refused = {mid: reason for mid, reason in returned.items() if mid not in confirmed}
        nacked = set(self.rejected) - confirmed - refused.keys()
        answered = len(confirmed) + len(refused) + len(nacked)
        unanswered = None
        if answered < len(self.ids):
            unanswered = why or self.why or "not confirmed"
        closed = self.closed_by_broker is not None and self.alone
        return PublishOutcome(set(confirmed), refused, nacked, unanswered, closed_by_broker=closed)


class _Frame(NamedTuple):
    """One ``basic.publish``, built by the caller so that the I/O thread only writes it out."""

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    message_id: str


class BatchConfirmPublisher:
    """Publishes batches with publisher confirms over one connection per process, on pika's public API.

    Design. A process has one publisher connection, owned by one I/O thread (started on
    the first publish) that runs pika's :class:`~pika.SelectConnection` ioloop. A caller
    (a worker thread right after its handler's commit, or the sweeper) builds the frames
    of its batch, hands the batch over with the ioloop's ``add_callback_threadsafe``, and
    sleeps on the batch's event. The I/O thread publishes the batch with ``mandatory``
    on a channel in confirm mode (``channel.confirm_delivery``), and finishes the batch
    when its last confirm arrives, which wakes the caller at once: the wait is for the
    confirms, never for a timer. Batches of several threads share the channel, so
    RabbitMQ's ``multiple`` acks answer them together.

    Why pika's SelectConnection, not aio-pika: pika is already the dependency of dramatiq
    and of this module, its asynchronous connection has exactly the public calls a
    confirm relay needs (``confirm_delivery`` with an ack/nack callback,
    ``add_on_return_callback``, the ioloop's ``add_callback_threadsafe`` and
    ``call_later``), and the callers are plain threads: aio-pika would add asyncio,
    aiormq and pamqp and one more thread hop per batch, for the same wire.

    Bounded state: the I/O thread keeps the delivery tag of each message not yet answered
    (an ordered map, so a ``multiple`` ack takes entries from its front only until the
    first later tag) and the batches in flight; a confirm removes its entries, and a lost
    connection or channel clears them. Late confirms of a tag nobody waits for are ignored.
    Nothing is kept per connection once it is gone, and there is one connection at a time.
    The idle connection is served by the ioloop, so it answers heartbeats between batches.

    Timeouts everywhere: connecting, opening the channel and confirm-select together
    take at most :attr:`CONNECT_TIMEOUT`; a batch is finished by :attr:`CONFIRM_TIMEOUT`
    with what was confirmed by then (the connection is then replaced: a broker that
    answers no confirm is not trusted with the next batch); the caller's own wait ends
    :attr:`WAIT_GRACE` later whatever happens; :meth:`close` takes at most about
    :attr:`CLOSE_TIMEOUT`. After a failed connection attempt, batches fail at once (to the
    sweep) until a backoff passes, doubling from :attr:`BACKOFF_MIN` to :attr:`BACKOFF_MAX`.

    Unroutable: a message returned (``mandatory``) or nacked is not confirmed. A queue a
    message was returned from is forgotten by the declared-queue cache, so the next batch
    for it declares it again (a queue deleted at runtime comes back).
    """

    #: Seconds a batch may take, from its hand-over to its last confirm (connecting included).
    CONFIRM_TIMEOUT = 15.0
    #: Seconds to open the connection and the channel and have confirm mode selected.
    CONNECT_TIMEOUT = 10.0
    #: Seconds :meth:`close` lets batches in flight finish before it closes the connection.
    CLOSE_TIMEOUT = 5.0
    #: Seconds past a batch's deadline the caller still waits for the I/O thread to answer.
    WAIT_GRACE = 2.0
    BACKOFF_MIN = 0.25
    BACKOFF_MAX = 5.0
    #: Queues the declared-queue cache remembers at most; beyond that it starts again.
    MAX_DECLARED = 1024

    def __init__(self, url: str | Sequence[str], declare: Callable[[str], None]) -> None:
        """``url``: one AMQP URL, or the URLs of a cluster's nodes (:func:`connection_parameters`).

        ``declare(queue)`` must declare the queue on the broker each time it is called.
        It is called from the publishing thread, before a batch for the queue goes out,
        the first time and after the queue was found missing.
        """
        self.parameters = connection_parameters(url)
        self.user_id = broker_user(self.parameters)
        self.declare = declare
        self.declared: set[str] = set()
        self._lock = threading.Lock()
        self._io: _ConfirmRelay | None = None
        self._closed = False

    @property
    def io(self) -> _ConfirmRelay | None:
        """The I/O thread and the state it owns, once the first batch started it."""
        return self._io

    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        if message_id not in self.publish_batch([Outgoing(queue_name, actor_name, payload, message_id)]):
            raise RuntimeError(f"message {message_id} was not confirmed by the broker")

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        """Publish ``messages`` and wait for their confirms, at most :attr:`CONFIRM_TIMEOUT` seconds.

        Returns:
          The ids of the messages the broker confirmed (acked, and neither nacked nor returned).
          On a lost connection or a timeout, those confirmed before it, or none.
        """
        if not messages:
            return set()
        return self._publish(messages, alone=False)[1]

    def publish_explained(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        """:meth:`publish_batch`, saying why each message that was not confirmed was not.

        A message returned as unroutable is ``refused``, with the broker's reply; a nacked
        one is ``nacked``; the rest of a batch that got no answer is ``unanswered``, with
        why: the connection was lost or could not be opened, the confirms did not come by
        :attr:`CONFIRM_TIMEOUT`, or the broker closed the channel. Only in that last case is
        ``closed_by_broker`` set, and then the broker closed it over a message of this batch:
        an explained batch goes out alone on the channel (after the batches in flight are
        answered, and none goes out beside it), so that another thread's message, on the
        shared channel, is never taken for one of this batch's. It is meant for the sweep,
        which publishes seldom; the publish after each commit takes :meth:`publish_batch`.
        """
        if not messages:
            return PublishOutcome(set())
        batch, confirmed, why = self._publish(messages, alone=True)
        return batch.outcome(confirmed, why)

    def _publish(self, messages: Sequence[Outgoing], *, alone: bool) -> tuple[_Batch, set[str], str | None]:
        """Hand a batch to the I/O thread and wait for it: the batch, what was confirmed, and why not all if known."""
        for queue_name in {m.queue_name for m in messages if not m.exchange} - self.declared:
            self.declare(queue_name)  # with accessflow's queue arguments, before anything is routed there
            if len(self.declared) >= self.MAX_DECLARED:
                self.declared.clear()
            self.declared.add(queue_name)
        batch = _Batch(
            [self._frame(m) for m in messages], time.monotonic() + self.CONFIRM_TIMEOUT, alone=alone
        )
        io = self._running()
        if io is None:
            log.warning("publish.closed", messages=len(messages))
            return batch, set(), "the publisher is closed"
        io.submit(batch)
        if batch.wait(self.WAIT_GRACE):
            return batch, batch.confirmed, None
        # The I/O thread did not finish the batch by its deadline, as it always should: it is
        # stuck. It is let go (told to close, not waited for), and the next batch starts another.
        log.error("publish.io_unresponsive", messages=len(messages))
        with self._lock:
            if self._io is io:
                self._io = None
        io.abandon(batch)
        io.retire()
        return batch, batch.confirmed_so_far(), "the publisher's I/O thread did not answer"

    def forget_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` again before the next publish to it: it was found missing."""
        self.declared.discard(queue_name)

    def close(self) -> None:
        """Let batches in flight finish (:attr:`CLOSE_TIMEOUT`), then close this publisher's connection.

        Only what this publisher owns: its I/O thread and its connection. A caller whose
        batch is in flight gets its confirms; a batch handed over afterwards gets none.
        """
        with self._lock:
            self._closed = True
            io, self._io = self._io, None
        if io is not None:
            io.shutdown(self.CLOSE_TIMEOUT)

    def _running(self) -> _ConfirmRelay | None:
        with self._lock:
            if self._closed:
                return None
            io = self._io
            if io is not None and io.pid == os.getpid() and io.is_alive() and not io.stopping:
                return io
            if io is not None and io.pid == os.getpid():
                io.shutdown(0)  # it died: whatever it still held is let go
            # In a forked child the parent's thread does not exist, and its connection is the
            # parent's: it is left alone, and this process gets its own.
            self._io = _ConfirmRelay(self)
            self._io.start()
            return self._io

    def _frame(self, message: Outgoing) -> _Frame:
        if message.exchange:
            return _Frame(
                message.exchange,
                message.event_routing_key(),
                message.event_body(),
                message.event_properties(self.user_id),
                message.message_id,
            )
        return _Frame(
            "",
            message.queue_name,
            message.envelope().encode(),
            pika.BasicProperties(
                delivery_mode=2,
                content_type="application/json",
                message_id=message.message_id,
                user_id=self.user_id,  # validated by RabbitMQ: marks it as accessflow's own
            ),
            message.message_id,
        )


class _SocketKeepingIO(SelectorIOServicesAdapter):  # type: ignore[misc]
    """pika's I/O services on the publisher's ioloop, keeping the socket of the connection they serve.

    Passed as ``custom_ioloop`` to :class:`pika.SelectConnection`, which takes any of pika's
    ``AbstractIOServices``: the one extension point pika documents for its I/O. The socket
    is kept only to be shut down (:meth:`hang_up`) when a broker never completes a close.
    """

    def __init__(self, loop: IOLoop) -> None:
        super().__init__(loop)
        self.socket: socket.socket | None = None

    def connect_socket(self, sock: socket.socket, resolved_addr: Any, on_done: Any) -> Any:
        self.socket = sock
        return super().connect_socket(sock, resolved_addr, on_done)

    def hang_up(self) -> None:
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)


#: Numbers the I/O threads of a process, for their connections' names.
_relays = itertools.count(1)


class _ConfirmRelay(threading.Thread):
    """The I/O thread of a :class:`BatchConfirmPublisher`: its ioloop, connection, channel and confirms.

    Every attribute below is read and written on this thread only; other threads reach it
    through :meth:`submit`, :meth:`abandon` and :meth:`shutdown`, which hand a call to
    the ioloop with ``add_callback_threadsafe``.
    """

    #: Seconds a connection we closed may take to complete its close before its socket is shut down.
    HANG_UP_AFTER = 1.0

    def __init__(self, publisher: BatchConfirmPublisher) -> None:
        super().__init__(name="accessflow-publisher", daemon=True)
        self.publisher = publisher
        self.pid = os.getpid()
        #: The connection's name in ``rabbitmqctl list_connections`` and the management UI: whose it is.
        self.connection_name = f"accessflow publisher (pid {self.pid}, #{next(_relays)})"
        for node in publisher.parameters:  # whichever node of the list it connects to
            node.client_properties = {"connection_name": self.connection_name}
        self.ioloop = IOLoop()
        self.stopping = False
        #: Set once the connection was closed for good, by :meth:`shutdown`.
        self.shut = False
        self.connection: pika.SelectConnection | None = None
        self.channel: Any = None
        #: True once the channel is in confirm mode; batches go out only then.
        self.ready = False
        self.setup_timer: Any = None
        #: The I/O services (and so the socket) of the current connection.
        self.services: _SocketKeepingIO | None = None
        #: Connections we closed whose close has not completed yet, with their I/O services.
        self.closing: dict[pika.SelectConnection, _SocketKeepingIO] = {}
        #: Batches handed over and not published yet, oldest first: no channel was ready, or
        #: they wait for the channel to themselves (:attr:`_Batch.alone`), or behind one that does.
        self.waiting: collections.deque[_Batch] = collections.deque()
        #: Batches published and not yet finished, for returns to find theirs.
        self.inflight: dict[_Batch, None] = {}
        #: The batch in flight that has the channel to itself, if one has.
        self.alone: _Batch | None = None
        #: Delivery tag -> (batch, message id) of every message published and not yet answered.
        self.unconfirmed: collections.OrderedDict[int, tuple[_Batch, str]] = collections.OrderedDict()
        self.next_tag = 1
        self.retry_at = 0.0
        self.backoff = publisher.BACKOFF_MIN
        #: Connections opened, over the thread's life (for tests and logs).
        self.connects = 0

    # -- from any thread ------------------------------------------------------------------

    def submit(self, batch: _Batch) -> None:
        self._call(lambda: self._submit(batch), otherwise=lambda: self._finish(batch))

    def abandon(self, batch: _Batch) -> None:
        self._call(lambda: self._finish(batch))

    def shutdown(self, timeout: float) -> None:
        """Close what this thread owns after batches in flight finish (``timeout`` s at most); wait for it."""
        self.retire(timeout)
        if threading.current_thread() is not self and self.is_alive():
            self.join(timeout + self.HANG_UP_AFTER + self.publisher.WAIT_GRACE)

    def retire(self, timeout: float = 0.0) -> None:
        """Have this thread close what it owns and end, without waiting for it."""
        self._call(lambda: self._shut_down(timeout))

    def _call(self, callback: Callable[[], None], otherwise: Callable[[], None] | None = None) -> None:
        try:
            self.ioloop.add_callback_threadsafe(callback)
        except Exception:  # the ioloop is closed: nobody will run it
            if otherwise is not None:
                otherwise()

    # -- the I/O thread -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                try:
                    self.ioloop.start()
                    break
                except Exception as error:  # a bug in a callback costs the batches in flight, not the thread
                    log.error("publish.io_failed", error=type(error).__name__)
                    self._abandon_connection(f"the publisher failed ({type(error).__name__})")
                    if self.stopping:
                        break
        finally:
            self.stopping = True
            self._lose("the publisher is closed")
            for batch in list(self.waiting):
                self._finish(batch, "the publisher is closed")
            self.waiting.clear()
            # Connections whose close did not complete in time: the loop no longer serves them.
            for services in self.closing.values():
                if services.socket is not None:
                    services.socket.close()
            self.closing.clear()
            self.ioloop.close()

    def _submit(self, batch: _Batch) -> None:
        if self.stopping:
            self._finish(batch, "the publisher is closing")
            return
        batch.timer = self.ioloop.call_later(
            max(0.0, batch.deadline - time.monotonic()), lambda: self._expire(batch)
        )
        if self.ready:
            if not self.waiting and self._may_send(batch):
                self._send(batch)
            else:
                self.waiting.append(batch)
            return
        if self.setup_timer is None and time.monotonic() < self.retry_at:
            # The last attempt failed a moment ago: to the sweep, at once.
            self._finish(batch, "the broker could not be reached a moment ago")
            return
        self.waiting.append(batch)
        if self.setup_timer is None:
            self._set_up()

    def _may_send(self, batch: _Batch) -> bool:
        """Whether ``batch`` may go out now: nothing has the channel to itself, nor would it share it."""
        return self.alone is None and not (batch.alone and self.inflight)

    def _pump(self) -> None:
        """Publish the waiting batches that may go out now, oldest first; none overtakes another."""
        waiting = self.waiting
        while self.ready and waiting:
            batch = waiting[0]
            if batch.finished:  # expired while it waited
                waiting.popleft()
                continue
            if not self._may_send(batch):
                return
            waiting.popleft()
            self._send(batch)

    def _resume(self) -> None:
        """Set up a channel again for batches left waiting when the last one was lost."""
        if self.waiting and not self.ready and self.setup_timer is None and not self.stopping:
            if time.monotonic() < self.retry_at:
                self._setup_failed("the broker could not be reached a moment ago")
            else:
                self._set_up()

    def _send(self, batch: _Batch) -> None:
        self.inflight[batch] = None
        if batch.alone:
            self.alone = batch
        try:
            for frame in batch.frames:
                self.channel.basic_publish(
                    frame.exchange, frame.routing_key, frame.body, frame.properties, mandatory=True
                )
                self.unconfirmed[self.next_tag] = (batch, frame.message_id)
                self.next_tag += 1
        except (pika.exceptions.AMQPError, OSError) as error:
            log.warning("publish.connection_lost", error=type(error).__name__)
            self._lose(f"the connection was lost ({type(error).__name__})")

    def _set_up(self) -> None:
        """Open the connection if need be, then a channel, then confirm mode: all by :attr:`CONNECT_TIMEOUT`."""
        self.setup_timer = self.ioloop.call_later(self.publisher.CONNECT_TIMEOUT, self._setup_timed_out)
        if self.connection is not None and self.connection.is_open:
            self._open_channel(self.connection)
            return
        self.connects += 1
        self.services = _SocketKeepingIO(self.ioloop)
        # A SelectConnection takes one node's parameters: each attempt takes the next node of the
        # list, so after a node is lost (or refuses) the next attempt goes to another one.
        nodes = self.publisher.parameters
        self.connection = pika.SelectConnection(
            nodes[(self.connects - 1) % len(nodes)],
            on_open_callback=self._open_channel,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self.services,
        )

    def _open_channel(self, connection: Any) -> None:
        current = self.connection
        if current is None or connection is not current or self.stopping:
            return
        current.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Any) -> None:
        if channel.connection is not self.connection or self.stopping:
            return
        self.channel = channel
        self.next_tag = 1
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_selected)

    def _on_confirm_selected(self, _frame: Any) -> None:
        if self.setup_timer is not None:
            self.ioloop.remove_timeout(self.setup_timer)
            self.setup_timer = None
        self.ready = True
        self.backoff = self.publisher.BACKOFF_MIN
        self.retry_at = 0.0
        self._pump()

    def _setup_timed_out(self) -> None:
        self.setup_timer = None
        log.warning(
            "publish.connect_timeout",
            stage="confirm-select" if self.channel is not None else "connection and channel",
            seconds=self.publisher.CONNECT_TIMEOUT,
        )
        why = f"no connection in confirm mode within {self.publisher.CONNECT_TIMEOUT:g} s"
        self._setup_failed(why)
        self._abandon_connection(why)

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        self.closing.pop(connection, None)
        if self.stopping and not self.closing:
            self.ioloop.stop()
        if connection is not self.connection:
            return
        log.warning("publish.connect_failed", error=type(error).__name__)
        self.connection = self.services = None
        self._setup_failed(f"could not connect ({type(error).__name__})")

    def _setup_failed(self, why: str) -> None:
        if self.setup_timer is not None:
            self.ioloop.remove_timeout(self.setup_timer)
            self.setup_timer = None
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.publisher.BACKOFF_MAX)
        waiting, self.waiting = self.waiting, collections.deque()
        for batch in waiting:
            self._finish(batch, why)

    def _on_connection_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        self.closing.pop(connection, None)
        if connection is self.connection:
            log.warning("publish.connection_lost", error=type(reason).__name__)
            self.connection = self.services = None
            why = f"the connection was lost ({type(reason).__name__})"
            if self.setup_timer is not None:
                self._setup_failed(why)
            self._lose(why)
        if self.stopping and self.connection is None and not self.closing:
            self.ioloop.stop()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self.channel:
            return
        if not isinstance(reason, pika.exceptions.ChannelClosedByClient):
            log.warning("publish.channel_closed", reason=str(reason)[:200])
        by_broker = None
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            by_broker = f"{reason.reply_code} {reason.reply_text}"
        why = f"the broker closed the channel: {by_broker}" if by_broker else "the channel was closed"
        # The next batch opens a new channel on the same connection.
        self._lose(why, closed_by_broker=by_broker)
        if self.setup_timer is not None:
            self._setup_failed(why)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        unconfirmed = self.unconfirmed
        if method.multiple:  # every tag up to this one not answered yet: they are at the front
            while unconfirmed and next(iter(unconfirmed)) <= method.delivery_tag:
                batch, message_id = unconfirmed.popitem(last=False)[1]
                self._answer(batch, message_id, acked)
        else:
            entry = unconfirmed.pop(method.delivery_tag, None)
            if entry is not None:
                self._answer(entry[0], entry[1], acked)

    def _answer(self, batch: _Batch, message_id: str, acked: bool) -> None:
        (batch.acked if acked else batch.rejected).add(message_id)
        batch.unanswered -= 1
        if batch.unanswered == 0:
            self._finish(batch)

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # RabbitMQ sends a mandatory message's basic.return before its basic.ack, so the
        # batch knows it before its last confirm finishes it.
        message_id = properties.message_id
        for batch in self.inflight:
            if message_id in batch.ids:
                batch.rejected.add(message_id)
                batch.returned[message_id] = f"unroutable: {method.reply_code} {method.reply_text}"
                break
        if not method.exchange:  # to a queue by name: the queue is missing, declare it again
            self.publisher.forget_queue(method.routing_key)
        log.warning(
            "publish.returned",
            message_id=message_id,
            exchange=method.exchange,
            routing_key=method.routing_key,
            reply=method.reply_text,
        )

    def _expire(self, batch: _Batch) -> None:
        batch.timer = None
        if batch.finished:
            return
        why = f"not confirmed within {self.publisher.CONFIRM_TIMEOUT:g} s"
        if batch in self.inflight:
            log.warning("publish.confirm_timeout", unconfirmed=batch.unanswered, messages=len(batch.frames))
            batch.why = why
            # Finishes every batch on it with what was confirmed.
            self._abandon_connection("the connection was replaced: a batch's confirms timed out")
        self._finish(batch, why)

    def _finish(self, batch: _Batch, why: str | None = None) -> None:
        if batch.finished:
            return
        batch.finished = True
        if batch.why is None:
            batch.why = why
        batch.confirmed = batch.acked - batch.rejected
        self.inflight.pop(batch, None)
        if self.alone is batch:
            self.alone = None
        if batch.timer is not None:
            self.ioloop.remove_timeout(batch.timer)
            batch.timer = None
        batch.done.set()
        if self.stopping and not self.inflight:
            self._close_connection()
        elif self.waiting and self.ready:
            self._pump()

    def _lose(self, why: str, *, closed_by_broker: str | None = None) -> None:
        """The channel is gone: every batch on it gets what was confirmed, and nothing of it is kept.

        ``why`` is told to each batch in flight; ``closed_by_broker`` is the broker's reply, if
        it closed the channel. Batches still waiting get a new channel.
        """
        self.ready = False
        self.channel = None
        self.alone = None
        self.unconfirmed.clear()
        for batch in list(self.inflight):
            if closed_by_broker is not None:
                batch.closed_by_broker = closed_by_broker
            self._finish(batch, why)
        if self.waiting and not self.stopping:
            self.ioloop.call_later(0, self._resume)

    def _abandon_connection(self, why: str = "the connection was abandoned") -> None:
        """Stop using the current connection now; it is closed in the background, within :attr:`HANG_UP_AFTER`.

        pika closes an open connection gracefully only (Connection.Close, then it waits for
        Close-Ok, without a time limit), and a broker that stopped answering never sends
        Close-Ok: if the close has not completed by then, the socket is shut down, which
        pika reads as the peer hanging up and ends the connection on its own path.
        """
        connection, services = self.connection, self.services
        self.connection = self.services = None
        self._lose(why)
        if connection is None or services is None or connection.is_closed:
            return
        self.closing[connection] = services
        if not connection.is_closing:
            with contextlib.suppress(Exception):
                connection.close()
        self.ioloop.call_later(self.HANG_UP_AFTER, lambda: self._hang_up(connection))

    def _hang_up(self, connection: pika.SelectConnection) -> None:
        services = self.closing.get(connection)
        if services is not None:
            log.warning("publish.close_unanswered", seconds=self.HANG_UP_AFTER)
            services.hang_up()

    def _shut_down(self, timeout: float) -> None:
        self.stopping = True
        waiting, self.waiting = self.waiting, collections.deque()
        for batch in waiting:
            self._finish(batch, "the publisher is closing")
        # Batches in flight get up to ``timeout`` to finish; the last one closes the connection.
        self.ioloop.call_later(timeout, self._close_connection)
        if not self.inflight:
            self._close_connection()

    def _close_connection(self) -> None:
        if self.shut:
            return
        self.shut = True
        if self.setup_timer is not None:
            self.ioloop.remove_timeout(self.setup_timer)
            self.setup_timer = None
        self._abandon_connection("the publisher is closed")
        if not self.closing:
            self.ioloop.stop()
        else:  # the last close to complete stops the loop; this is the backstop
            self.ioloop.call_later(self.HANG_UP_AFTER + 1.0, self.ioloop.stop)
