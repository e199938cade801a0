"""The batch-confirm publisher (``infra.messaging.publisher.BatchConfirmPublisher``) against the real RabbitMQ.

Issue 8, point 2: bounded state whatever the acks, one connection per process that answers
heartbeats while idle, a queue deleted at runtime declared again, a deadline on every wait
(connecting, confirm-select, the confirms), and ``close()`` that leaves others' work alone.
A broker that does not answer is played by a TCP listener of the test's own, or by a proxy
to the real RabbitMQ that goes silent at a chosen AMQP method.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import struct
import threading
import time
import uuid
import weakref
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
import structlog

from infra.messaging import publisher as publisher_module
from infra.messaging.broker import QuorumRabbitmqBroker, queue_declarer
from infra.messaging.broker_admin import BrokerAdminError, Rabbitmqctl
from infra.messaging.publisher import BatchConfirmPublisher, Outgoing, _ConfirmRelay
from infra.settings import Settings
from messages.routes import NOTIFY
from tests import services as svc

pytestmark = pytest.mark.integration

CONFIRM_SELECT = (85, 10)
BASIC_PUBLISH = (60, 40)


def messages(queue: str, count: int) -> list[Outgoing]:
    return [Outgoing(queue, NOTIFY.actor_name, {"n": i}, str(uuid.uuid4())) for i in range(count)]


def ids(batch: list[Outgoing]) -> set[str]:
    return {m.message_id for m in batch}


def queue_exists(broker_url: str, queue: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as error:
        assert error.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()


def delete_queue(broker_url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@127.0.0.1:{port}"))


def publisher_connections(vhost: str, name: str) -> list[str]:
    """The connections named ``name`` on ``vhost``, as the broker lists them."""
    try:
        listing = Rabbitmqctl().run(
            "list_connections", "-p", vhost, "client_properties", "--no-table-headers", "-q"
        )
    except BrokerAdminError as error:
        svc.unavailable(f"cannot list the broker's connections with rabbitmqctl: {error}")
    return [line for line in listing.splitlines() if f'"{name}"' in line]


class SilentListener:
    """A TCP port that accepts connections and never says a word: a broker that hangs."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.socket.accept()[0])

    def close(self) -> None:
        self.socket.close()
        for conn in self.accepted:
            conn.close()


class SilencingProxy:
    """A TCP proxy to RabbitMQ that goes silent, on the next connection, once the client sends ``method``.

    From that frame on, nothing more is forwarded either way and the sockets stay open: to
    the client, a broker that stopped answering. Later connections are forwarded whole.
    """

    def __init__(self, upstream_port: int, method: tuple[int, int]) -> None:
        self.upstream_port = upstream_port
        self.method = struct.pack(">HH", *method)
        self.silence_next = True
        self.silenced = threading.Event()
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.sockets: list[socket.socket] = [self.socket]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client = self.socket.accept()[0]
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
                self.sockets += [client, server]
                silence, self.silence_next = self.silence_next, False
                state = {"silent": False}
                threading.Thread(target=self._up, args=(client, server, state, silence), daemon=True).start()
                threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(
        self, client: socket.socket, server: socket.socket, state: dict[str, bool], silence: bool
    ) -> None:
        """Client to server, frame by frame, until the frame that silences this connection."""
        buffer = b""
        header_sent = False
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                if state["silent"]:
                    continue
                buffer += chunk
                if not header_sent:
                    if len(buffer) < 8:
                        continue
                    server.sendall(buffer[:8])
                    buffer, header_sent = buffer[8:], True
                while len(buffer) >= 7:
                    frame_type, _channel, size = struct.unpack(">BHI", buffer[:7])
                    if len(buffer) < 8 + size:
                        break
                    frame, buffer = buffer[: 8 + size], buffer[8 + size :]
                    if silence and frame_type == 1 and frame[7:11] == self.method:
                        state["silent"] = True
                        self.silenced.set()
                        break
                    server.sendall(frame)

    def _down(self, server: socket.socket, client: socket.socket, state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                if not state["silent"]:
                    client.sendall(chunk)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


class TestBoundedState:
    def test_nothing_is_kept_after_10000_confirms_with_multiple_acks(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given a publisher, and the acks its I/O thread receives, watched
        multiple: list[bool] = []
        on_confirm = _ConfirmRelay._on_confirm

        def watched(relay: _ConfirmRelay, frame: Any) -> None:
            multiple.append(bool(frame.method.multiple))
            on_confirm(relay, frame)

        monkeypatch.setattr(_ConfirmRelay, "_on_confirm", watched)
        queue = NOTIFY.queue_name(prefix)
        publisher = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        largest: list[int] = []
        try:
            # When 4 threads publish 10,000 messages in batches of 250, on the one connection
            def publish(thread: int) -> set[str]:
                confirmed: set[str] = set()
                for _ in range(10):
                    batch = messages(queue, 250)
                    got = publisher.publish_batch(batch)
                    assert got == ids(batch)
                    confirmed |= got
                    io = publisher.io
                    assert io is not None
                    largest.append(len(io.unconfirmed))
                return confirmed

            results: list[set[str]] = []
            threads = [
                threading.Thread(target=lambda n=n: results.append(publish(n)), name=f"publisher-test-{n}")
                for n in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)

            # Then every one was confirmed, RabbitMQ answered some with multiple acks, and the
            # publisher keeps nothing of them: no tag, no batch, no id
            assert sum(len(r) for r in results) == 10_000
            assert any(multiple), "RabbitMQ sent no multiple ack: the test did not test them"
            io = publisher.io
            assert io is not None
            assert (len(io.unconfirmed), len(io.inflight), len(io.waiting)) == (0, 0, 0)
            # and what was outstanding at any time is bounded by the batches in flight, 4 x 250
            assert max(largest) <= 1000
            assert io.connects == 1
        finally:
            publisher.close()


class TestOneConnectionPerProcess:
    def test_threads_share_one_connection_and_leave_none_behind(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker, boundary: Any
    ) -> None:
        # Given a publisher
        queue = NOTIFY.queue_name(prefix)
        publisher = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        try:
            # When 8 threads each publish a batch, and end
            confirmed: list[set[str]] = []
            batches = [messages(queue, 20) for _ in range(8)]
            threads = [
                threading.Thread(target=lambda b=b: confirmed.append(publisher.publish_batch(b)))
                for b in batches
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)

            # Then all are confirmed, over one connection, which the broker lists once
            assert sorted(len(c) for c in confirmed) == [20] * 8
            io = publisher.io
            assert io is not None and io.connects == 1
            assert len(publisher_connections(boundary.vhost, io.connection_name)) == 1
        finally:
            publisher.close()
        # and once closed, none
        svc.wait_until(
            lambda: not publisher_connections(boundary.vhost, io.connection_name),
            what="the connection to close",
        )

    def test_a_connection_the_broker_drops_is_let_go_and_the_next_batch_opens_one(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker, boundary: Any
    ) -> None:
        # Given a publisher whose connection carried a batch
        queue = NOTIFY.queue_name(prefix)
        publisher = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        try:
            assert publisher.publish_batch(first := messages(queue, 2)) == ids(first)
            io = publisher.io
            assert io is not None and io.connection is not None
            dropped = weakref.ref(io.connection)

            # When the broker drops that connection (as an operator's close_connection does)
            listing = Rabbitmqctl().run(
                "list_connections",
                "-p",
                boundary.vhost,
                "pid",
                "client_properties",
                "--no-table-headers",
                "-q",
            )
            [pid] = [line.split()[0] for line in listing.splitlines() if f'"{io.connection_name}"' in line]
            Rabbitmqctl().run("close_connection", pid, "publisher test: dropped")
            svc.wait_until(lambda: io.connection is None, what="the publisher to see the drop")

            # Then the next batch is confirmed on a new connection, the broker lists one, and
            # the publisher keeps nothing of the dropped one: not in a list, not anywhere
            assert publisher.publish_batch(second := messages(queue, 2)) == ids(second)
            assert io.connects == 2 and not io.closing
            assert len(publisher_connections(boundary.vhost, io.connection_name)) == 1
            gc.collect()
            assert dropped() is None
        finally:
            publisher.close()

    def test_an_idle_connection_answers_heartbeats_and_is_kept(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker
    ) -> None:
        # Given a publisher on a 1 s heartbeat, whose first batch opened its connection
        queue = NOTIFY.queue_name(prefix)
        url = f"{settings.broker_url}?heartbeat=1"
        publisher = BatchConfirmPublisher(url, declare=queue_declarer(broker))
        try:
            assert publisher.publish_batch(first := messages(queue, 1)) == ids(first)
            io = publisher.io
            assert io is not None
            connection = io.connection

            # When it sits idle for 5 heartbeats (RabbitMQ closes a connection that misses 2)
            time.sleep(5)

            # Then the same connection is still open and carries the next batch
            assert connection.is_open
            assert publisher.publish_batch(second := messages(queue, 5)) == ids(second)
            assert io.connection is connection and io.connects == 1
        finally:
            publisher.close()


class TestDeclaredQueues:
    def test_a_declare_leaves_no_connection_open_on_the_calling_thread(
        self, prefix: str, broker: QuorumRabbitmqBroker
    ) -> None:
        # Given the broker's connections before a worker thread declares a queue for the publisher
        before = set(broker.connections)

        # When a thread declares one, as a worker thread's first batch to a queue does
        thread = threading.Thread(target=queue_declarer(broker), args=(NOTIFY.queue_name(prefix),))
        thread.start()
        thread.join(timeout=30)

        # Then the connection it opened is closed and forgotten: left idle, it would answer no
        # heartbeat, be dropped by RabbitMQ, and log an ERROR when the pool shuts down
        assert not thread.is_alive()
        assert set(broker.connections) == before

    def test_a_queue_deleted_at_runtime_is_declared_again(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker
    ) -> None:
        # Given a publisher that has declared its queue and published to it
        queue = NOTIFY.queue_name(prefix)
        declared: list[str] = []
        declare = queue_declarer(broker)

        def counted(name: str) -> None:
            declared.append(name)
            declare(name)

        publisher = BatchConfirmPublisher(settings.broker_url, declare=counted)
        try:
            assert publisher.publish_batch(first := messages(queue, 3)) == ids(first)
            assert declared == [queue]

            # When the queue is deleted at runtime, a batch to it is returned (unroutable)
            delete_queue(settings.broker_url, queue)
            assert publisher.publish_batch(messages(queue, 3)) == set()

            # Then the next batch declares it again, and is confirmed
            assert publisher.publish_batch(third := messages(queue, 3)) == ids(third)
            assert declared == [queue, queue]
            assert queue_exists(settings.broker_url, queue)
            assert svc.queue_depth(settings.broker_url, queue) == 3
        finally:
            publisher.close()


class TestExplained:
    def test_a_channel_closed_over_an_explained_batch_is_blamed_on_it_and_costs_other_threads_nothing(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker
    ) -> None:
        # Given threads publishing batches after their commits, on the shared channel
        queue = NOTIFY.queue_name(prefix)
        publisher = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        stop = threading.Event()
        results: list[bool] = []

        def publish() -> None:
            while not stop.is_set():
                batch = messages(queue, 20)
                results.append(publisher.publish_batch(batch) == ids(batch))

        threads = [threading.Thread(target=publish) for _ in range(4)]
        try:
            for thread in threads:
                thread.start()
            svc.wait_until(lambda: len(results) >= 8, what="the threads to publish")

            # When the sweep publishes, explained, a batch with an event to an exchange that
            # does not exist, over which RabbitMQ closes the channel
            missing = Outgoing(
                "", "", {"event": "test"}, str(uuid.uuid4()), exchange=f"{prefix}.missing", routing_key="x"
            )
            swept = [*messages(queue, 2), missing]
            outcomes = [publisher.publish_explained(swept) for _ in range(3)]
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

            # Then each time the batch is told the broker closed the channel over it, and why
            for outcome in outcomes:
                assert outcome.closed_by_broker
                assert outcome.unanswered is not None and "404" in outcome.unanswered
                assert missing.message_id not in outcome.confirmed
            # and no batch of the other threads lost a confirm to it
            assert results and all(results)
            # and a batch after it is confirmed whole, on the same connection
            assert publisher.publish_explained(last := messages(queue, 3)).confirmed == ids(last)
            io = publisher.io
            assert io is not None and io.connects == 1
        finally:
            stop.set()
            publisher.close()


class TestDeadlines:
    def test_a_broker_that_accepts_and_says_nothing_costs_one_deadline(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given a "broker" that accepts connections and never answers, and a 2 s batch deadline
        monkeypatch.setattr(BatchConfirmPublisher, "CONFIRM_TIMEOUT", 2.0)
        listener = SilentListener()
        publisher = BatchConfirmPublisher(
            with_port(settings.broker_url, listener.port), declare=lambda _: None
        )
        try:
            # When a batch goes out
            started = time.monotonic()
            confirmed = publisher.publish_batch(messages("nowhere", 3))

            # Then nothing is confirmed, and the call returned by its deadline (not pika's
            # 10 s socket timeout nor its 15 s stack timeout)
            assert confirmed == set()
            assert time.monotonic() - started < 2.0 + BatchConfirmPublisher.WAIT_GRACE
        finally:
            publisher.close()
            listener.close()

    def test_confirm_select_that_is_never_answered_times_out_and_the_next_connection_works(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given a broker that stops answering once a channel asks for confirm mode (once)
        monkeypatch.setattr(BatchConfirmPublisher, "CONNECT_TIMEOUT", 3.0)
        monkeypatch.setattr(BatchConfirmPublisher, "CONFIRM_TIMEOUT", 60.0)
        monkeypatch.setattr(BatchConfirmPublisher, "BACKOFF_MIN", 0.1)
        port = urlsplit(settings.broker_url).port or 5672
        proxy = SilencingProxy(port, CONFIRM_SELECT)
        queue = NOTIFY.queue_name(prefix)
        publisher = BatchConfirmPublisher(
            with_port(settings.broker_url, proxy.port), declare=queue_declarer(broker)
        )
        try:
            # When a batch goes out
            with structlog.testing.capture_logs() as logs:
                # A logger bound under capture_logs: the module's own was cached, on first use, with
                # whatever configuration an earlier test of the session left.
                monkeypatch.setattr(publisher_module, "log", structlog.get_logger())
                started = time.monotonic()
                confirmed = publisher.publish_batch(messages(queue, 3))
                elapsed = time.monotonic() - started

            # Then the confirm-select wait ended at its own timeout, not the batch's deadline
            assert proxy.silenced.is_set()
            assert confirmed == set()
            assert elapsed < 60.0  # far from the batch's deadline: the 3 s connect timeout ended it
            assert {"event": "publish.connect_timeout", "stage": "confirm-select"}.items() <= next(
                entry for entry in logs if entry["event"] == "publish.connect_timeout"
            ).items()

            # and once the backoff passed, the next batch goes out on a new connection
            batch = messages(queue, 3)
            deadline = time.monotonic() + 30
            while (confirmed := publisher.publish_batch(batch)) != ids(batch) and time.monotonic() < deadline:
                pass  # within the backoff a batch is refused at once; the next try comes after it
            assert confirmed == ids(batch)
        finally:
            publisher.close()
            proxy.close()

    def test_confirms_that_never_come_end_at_the_deadline_and_the_connection_is_replaced(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given a broker that stops answering once the first message is published (once)
        monkeypatch.setattr(BatchConfirmPublisher, "CONFIRM_TIMEOUT", 2.0)
        port = urlsplit(settings.broker_url).port or 5672
        proxy = SilencingProxy(port, BASIC_PUBLISH)
        queue = NOTIFY.queue_name(prefix)
        publisher = BatchConfirmPublisher(
            with_port(settings.broker_url, proxy.port), declare=queue_declarer(broker)
        )
        try:
            # When a batch goes out
            started = time.monotonic()
            confirmed = publisher.publish_batch(messages(queue, 3))

            # Then nothing is confirmed, by the deadline, and nothing of the batch is kept
            assert confirmed == set()
            assert time.monotonic() - started < 2.0 + BatchConfirmPublisher.WAIT_GRACE
            io = publisher.io
            assert io is not None
            assert (len(io.unconfirmed), len(io.inflight)) == (0, 0)

            # and the next batch goes out on a new connection, confirmed
            assert publisher.publish_batch(batch := messages(queue, 3)) == ids(batch)
            assert io.connects == 2
        finally:
            publisher.close()
            proxy.close()


class TestClose:
    def test_close_lets_a_batch_in_flight_on_another_thread_finish(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker
    ) -> None:
        # Given a thread publishing a large batch
        queue = NOTIFY.queue_name(prefix)
        publisher = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        assert publisher.publish_batch(warm := messages(queue, 1)) == ids(warm)
        io = publisher.io
        assert io is not None
        batch = messages(queue, 5000)
        confirmed: list[set[str]] = []
        worker = threading.Thread(target=lambda: confirmed.append(publisher.publish_batch(batch)))
        worker.start()
        svc.wait_until(lambda: io.inflight or confirmed, interval=0.001, what="the batch to go out")

        # When another thread closes the publisher meanwhile
        publisher.close()
        worker.join(timeout=30)

        # Then the batch in flight got every confirm, and a batch after the close goes nowhere
        assert confirmed == [ids(batch)]
        assert publisher.publish_batch(messages(queue, 1)) == set()
        assert not io.is_alive()

    def test_closing_one_publisher_leaves_another_alone(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker
    ) -> None:
        # Given two publishers in one process, one of them busy on a thread of its own
        queue = NOTIFY.queue_name(prefix)
        busy = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        other = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        try:
            assert other.publish_batch(warm := messages(queue, 1)) == ids(warm)
            results: list[bool] = []

            def publish() -> None:
                for _ in range(20):
                    batch = messages(queue, 200)
                    results.append(busy.publish_batch(batch) == ids(batch))

            worker = threading.Thread(target=publish)
            worker.start()

            # When the other is closed while the busy one publishes
            other.close()
            worker.join(timeout=60)

            # Then every batch of the busy one was confirmed whole
            assert results == [True] * 20
        finally:
            busy.close()
