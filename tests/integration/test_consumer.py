"""The envelope consumer, our publishes and the refusal record, against real RabbitMQ and PostgreSQL.

Each test consumes queues of its own, with a consumer built the way a worker builds
it (``broker.consume``), so no worker pool of this session sees these messages.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pika
import pytest
import sqlalchemy as sa
from dramatiq.brokers.stub import StubBroker

from infra.bootstrap import Services, build, wire
from infra.db import orm
from infra.messaging.amqp import broker_user
from infra.messaging.broker import EnvelopeConsumer, QuorumRabbitmqBroker, make_broker
from infra.messaging.envelope import Refused
from infra.messaging.publisher import BatchConfirmPublisher, DramatiqPublisher, Outgoing
from infra.settings import Settings
from messages.routes import ISSUE, QUEUE_ROUTES, SUBMIT
from tests import services as svc
from tests.services import envelope

pytestmark = pytest.mark.integration

#: Options a producer could use to reach around an actor.
HOSTILE_OPTIONS: dict[str, Any] = {
    "eta": 4_102_444_800_000,  # 2100-01-01
    "retries": 0,
    "max_retries": 10**6,
    "time_limit": 10**9,
    "pipe_target": {"queue_name": "x", "actor_name": ISSUE.actor_name, "args": [], "kwargs": {}},
    "on_success": ISSUE.actor_name,
    "on_failure": ISSUE.actor_name,
    "callbacks": [ISSUE.actor_name],
    "origin": "guest",
}


@dataclass
class Recorder:
    """Stands in for the database: keeps each refusal, or fails like a database that is down."""

    fail: bool = False
    calls: list[tuple[str, Refused, str | None]] = field(default_factory=list)

    def __call__(self, queue_name: str, refused: Refused, sender: str | None) -> None:
        self.calls.append((queue_name, refused, sender))
        if self.fail:
            raise RuntimeError("the database is down")


def nothing(*args: Any, **kwargs: Any) -> None:
    """An actor body; these tests never run actors."""


@pytest.fixture
def prefix(integration_settings: Settings) -> Iterator[str]:
    name = f"{integration_settings.queue_prefix}-consumer-{uuid.uuid4().hex[:6]}"
    yield name
    svc.delete_queues(integration_settings.broker_url, name, [route.queue for route in QUEUE_ROUTES])


@pytest.fixture
def broker(integration_settings: Settings, prefix: str) -> Iterator[QuorumRabbitmqBroker]:
    built = make_broker(integration_settings.model_copy(update={"queue_prefix": prefix}))
    assert isinstance(built, QuorumRabbitmqBroker)
    for route in (SUBMIT, ISSUE):
        dramatiq.actor(actor_name=route.actor_name, queue_name=route.queue_name(prefix), broker=built)(
            nothing
        )
    try:
        yield built
    finally:
        built.close()


def publish(
    broker_url: str, queue: str, body: bytes, *, user_id: str | None = None, message_id: str | None = None
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2, user_id=user_id, message_id=message_id)
        channel.basic_publish("", queue, body, properties, mandatory=True)
    finally:
        connection.close()


def open_consumer(broker: QuorumRabbitmqBroker, queue: str, prefetch: int = 10) -> Any:
    """A consumer as a worker's consumer thread opens it (dramatiq's Consumer is untyped: Any)."""
    consumer = broker.consume(queue, prefetch=prefetch, timeout=200)
    assert isinstance(consumer, EnvelopeConsumer)
    return consumer


def consume(consumer: Any, recorder: Recorder, expected: int) -> list[Any]:
    """Read deliveries until ``expected`` were either handed over or refused; ack those handed over."""
    messages: list[Any] = []
    deadline = time.monotonic() + 20
    while len(messages) + len(recorder.calls) < expected:
        assert time.monotonic() < deadline, f"{len(messages)} + {len(recorder.calls)} of {expected}"
        message = next(consumer)
        if message is not None:
            messages.append(message)
    for message in messages:
        consumer.ack(message)
    return messages


def depth(broker_url: str, queue: str) -> int:
    return svc.queue_depth(broker_url, queue)


class TestTheConsumer:
    def test_hands_over_only_checked_messages_and_refuses_the_rest_with_a_reason(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given a request with every hostile option, and three envelopes dramatiq cannot handle
        url, queue = integration_settings.broker_url, SUBMIT.queue_name(prefix)
        recorder = Recorder()
        broker.on_refused = recorder
        good = json.loads(envelope(queue, SUBMIT.actor_name, {"request_id": "r"}))
        good["options"] = HOSTILE_OPTIONS
        consumer = open_consumer(broker, queue, prefetch=10)
        publish(url, queue, json.dumps(good).encode())
        publish(url, queue, envelope(f"{queue}.XQ", SUBMIT.actor_name, {}, message_id="wrong-queue"))
        listed = json.loads(envelope(queue, SUBMIT.actor_name, {}, message_id="listed-actor"))
        listed["actor_name"] = [SUBMIT.actor_name]
        publish(url, queue, json.dumps(listed).encode())
        publish(url, queue, b"[" * 100_000, message_id="deep")

        # When the consumer reads them
        try:
            [message] = consume(consumer, recorder, expected=4)
        finally:
            consumer.close()

        # Then dramatiq gets the request with no option at all: no eta, no pipe, no callbacks
        assert message.message_id == good["message_id"]
        assert message.options == {}
        assert message.queue_name == queue
        # And each of the others is recorded with its reason, under its id
        reasons = {refused.message_id: refused.reason for _, refused, _ in recorder.calls}
        assert "is not the queue it was delivered on" in reasons["wrong-queue"]
        assert "actor_name must be a string, not an array" in reasons["listed-actor"]
        assert "more than" in reasons["deep"]
        assert {q for q, _, _ in recorder.calls} == {queue}
        # And nothing stays on the queue, acknowledged or not (closing would requeue the unacked)
        svc.wait_until(lambda: depth(url, queue) == 0, timeout=10, what="the queue to empty")
        assert depth(url, f"{queue}.XQ") == 0

    def test_leaves_the_thread_that_opened_it_no_idle_connection(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given a consumer thread that opens its consumer, as a worker's does at boot
        before = set(broker.connections)
        opened: list[Any] = []
        thread = threading.Thread(
            target=lambda: opened.append(open_consumer(broker, SUBMIT.queue_name(prefix)))
        )
        thread.start()
        thread.join(timeout=30)
        [consumer] = opened
        try:
            # Then the connection dramatiq declared the queue on is closed, not left to idle
            # (unanswered heartbeats would have RabbitMQ drop it, and its close log an ERROR)
            assert set(broker.connections) == before
            # And the consumer consumes, on its own connection
            url, queue = integration_settings.broker_url, SUBMIT.queue_name(prefix)
            publish(url, queue, envelope(queue, SUBMIT.actor_name, {"request_id": "r"}))
            message = svc.wait_until(lambda: next(consumer), what="the message through the consumer")
            consumer.ack(message)
        finally:
            consumer.close()

    def test_dead_letters_a_refusal_it_cannot_record(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given a database that is down
        url, queue = integration_settings.broker_url, SUBMIT.queue_name(prefix)
        recorder = Recorder(fail=True)
        broker.on_refused = recorder
        consumer = open_consumer(broker, queue, prefetch=10)
        publish(url, queue, b"not json", message_id="unrecordable")

        # When the consumer refuses a body
        try:
            consume(consumer, recorder, expected=1)
        finally:
            consumer.close()

        # Then it is in the dead-letter queue, not back in the queue, put there by the consumer
        # itself (ours, confirmed) with the reason it could not record
        svc.wait_until(lambda: depth(url, f"{queue}.XQ") == 1, timeout=10, what="the dead letter")
        assert depth(url, queue) == 0
        [(_, refused, _)] = recorder.calls
        properties, body = get_one(url, f"{queue}.XQ")
        assert body == b"not json"
        assert properties.user_id == broker.user_id
        assert properties.message_id == "unrecordable"
        assert properties.headers["accessflow-refusal"] == refused.reason
        assert "x-death" not in properties.headers

    def test_leaves_a_refusal_to_rabbitmqs_dead_lettering_when_it_cannot_publish_it_either(
        self,
        broker: QuorumRabbitmqBroker,
        prefix: str,
        integration_settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Given a database that is down, and a dead-letter publish that fails too
        monkeypatch.setattr(EnvelopeConsumer, "_dead_letter", lambda *args: False)
        url, queue = integration_settings.broker_url, SUBMIT.queue_name(prefix)
        recorder = Recorder(fail=True)
        broker.on_refused = recorder
        consumer = open_consumer(broker, queue, prefetch=10)
        publish(url, queue, b"not json", message_id="unrecordable-2")

        # When the consumer refuses a body
        try:
            consume(consumer, recorder, expected=1)
        finally:
            consumer.close()

        # Then it is nacked: RabbitMQ dead-letters it, with its own "rejected"
        svc.wait_until(lambda: depth(url, f"{queue}.XQ") == 1, timeout=10, what="the dead letter")
        properties, _ = get_one(url, f"{queue}.XQ")
        assert properties.headers["x-death"][0]["reason"] == "rejected"

    def test_refuses_an_outsiders_message_on_an_internal_queue_as_forged(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given an issue-credentials message from someone who did not say who they are, and one of ours
        url, queue = integration_settings.broker_url, ISSUE.queue_name(prefix)
        recorder = Recorder()
        broker.on_refused = recorder
        consumer = open_consumer(broker, queue, prefetch=10)
        publish(url, queue, envelope(queue, ISSUE.actor_name, {}, message_id="forged-1"))
        publish(
            url, queue, envelope(queue, ISSUE.actor_name, {}, message_id="ours-1"), user_id=broker.user_id
        )

        try:
            [message] = consume(consumer, recorder, expected=2)
        finally:
            consumer.close()

        # Then only ours is handed over; the other is recorded as forged, sender unknown
        assert message.message_id == "ours-1"
        [(_, refused, sender)] = recorder.calls
        assert (refused.message_id, refused.kind, sender) == ("forged-1", "forged", None)
        assert refused.reason.startswith(f"{queue} accepts only accessflow's own messages")

    def test_returns_or_refuses_without_raising_whatever_the_body(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        url, queue = integration_settings.broker_url, SUBMIT.queue_name(prefix)
        recorder = Recorder()
        broker.on_refused = recorder
        bodies = [
            b"",
            b"\xff\xfe",
            b'{"a": "\\ud800"}',
            b"{" * 70_000,
            b"x" * 200_000,
            b"null",
            json.dumps({**json.loads(envelope(queue, SUBMIT.actor_name, {})), "queue_name": 5}).encode(),
            json.dumps({**json.loads(envelope(queue, SUBMIT.actor_name, {})), "actor_name": None}).encode(),
            json.dumps({**json.loads(envelope(queue, SUBMIT.actor_name, {})), "options": []}).encode(),
        ]
        consumer = open_consumer(broker, queue, prefetch=20)
        for body in bodies:
            publish(url, queue, body)
        try:
            assert consume(consumer, recorder, expected=len(bodies)) == []
        finally:
            consumer.close()
        assert len({refused.message_id for _, refused, _ in recorder.calls}) == len(bodies)


class TestOurPublishes:
    def test_carry_our_user_id_and_only_our_own_options(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given a message as Retries leaves it: a retry count, a traceback, and a producer's pipe
        queue = SUBMIT.queue_name(prefix)
        options = {"retries": 2, "origin": "portal-a", "traceback": "secret=1", "pipe_target": {}}
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=SUBMIT.actor_name, args=({},), kwargs={}, options=options
        )

        # When the broker publishes it
        broker.enqueue(message)

        # Then it carries the connection's user, validated by RabbitMQ, and only our bookkeeping
        properties, body = get_one(integration_settings.broker_url, queue)
        assert properties.user_id == broker.user_id == workers_user(integration_settings)
        assert properties.message_id == message.message_id
        assert json.loads(body)["options"] == {"retries": 2, "origin": "portal-a"}

    def test_a_delayed_one_reaches_the_delay_queue_with_an_eta_the_consumer_keeps_within_bounds(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given a retry delayed within the longest backoff, and one delayed far beyond it
        queue = SUBMIT.queue_name(prefix)
        soon: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=SUBMIT.actor_name, args=({},), kwargs={}, options={"retries": 1}
        )
        late = soon.copy(message_id=str(uuid.uuid4()))
        before = int(time.time() * 1000)
        broker.enqueue(soon, delay=500)
        broker.enqueue(late, delay=3_600_000)

        # When the delay queue's consumer reads them
        recorder = Recorder()
        broker.on_refused = recorder
        consumer = open_consumer(broker, f"{queue}.DQ", prefetch=2)
        try:
            delayed = {m.message_id: m for m in consume(consumer, recorder, expected=2)}
        finally:
            consumer.close()
        after = int(time.time() * 1000)

        # Then both keep their retry count; the first its eta, the second no more than the longest wait
        assert {m.queue_name for m in delayed.values()} == {f"{queue}.DQ"}
        assert {m.options["retries"] for m in delayed.values()} == {1}
        assert before + 500 <= delayed[soon.message_id].options["eta"] <= after + 500
        assert (
            before + broker.max_delay_ms
            <= delayed[late.message_id].options["eta"]
            <= after + broker.max_delay_ms
        )

    def test_rabbitmq_refuses_a_user_id_that_is_not_the_publishers(
        self, integration_settings: Settings, broker: QuorumRabbitmqBroker, prefix: str
    ) -> None:
        # The premise of trusting user_id: RabbitMQ checks it against the connection's user.
        queue = SUBMIT.queue_name(prefix)
        broker.declare_queue(queue, ensure=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            publish(integration_settings.broker_url, queue, b"{}", user_id="accessflow-workers")
        assert refused.value.reply_code == 406


def workers_user(settings: Settings) -> str:
    return broker_user(pika.URLParameters(settings.broker_url))


def get_one(broker_url: str, queue: str) -> tuple[pika.BasicProperties, bytes]:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None, f"nothing on {queue}"
        return properties, body
    finally:
        connection.close()


@pytest.fixture
def events_exchange(integration_settings: Settings, prefix: str) -> Iterator[tuple[str, str]]:
    """A topic exchange with one queue bound for portal.acme.#, and nothing else."""
    exchange, queue = f"{prefix}.events", f"{prefix}.events.acme"
    connection = pika.BlockingConnection(pika.URLParameters(integration_settings.broker_url))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=False, auto_delete=False)
    channel.queue_declare(queue, durable=False)
    channel.queue_bind(queue, exchange, routing_key="portal.acme.#")
    try:
        yield exchange, queue
    finally:
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        connection.close()


def event(exchange: str, routing_key: str) -> Outgoing:
    payload = {"event": "access_request.provisioned", "request_id": str(uuid.uuid4()), "seq": 1}
    return Outgoing("", "", payload, str(uuid.uuid4()), exchange=exchange, routing_key=routing_key)


class TestEventsForPortals:
    def test_the_batch_publisher_sends_the_payload_itself_to_the_exchange(
        self, integration_settings: Settings, events_exchange: tuple[str, str]
    ) -> None:
        exchange, queue = events_exchange
        routed, unroutable = event(exchange, "portal.acme.provisioned"), event(exchange, "portal.nobody.x")
        publisher = BatchConfirmPublisher(integration_settings.broker_url, declare=lambda _: None)
        try:
            confirmed = publisher.publish_batch([routed, unroutable])
        finally:
            publisher.close()

        # Then the routed one is confirmed and arrives as plain JSON; the one no queue takes is not
        assert confirmed == {routed.message_id}
        properties, body = get_one(integration_settings.broker_url, queue)
        assert json.loads(body) == routed.payload
        assert (properties.type, properties.message_id) == ("access_request.provisioned", routed.message_id)
        assert (properties.user_id, properties.content_type, properties.delivery_mode) == (
            workers_user(integration_settings),
            "application/json",
            2,
        )

    def test_the_dramatiq_publisher_sends_them_through_the_brokers_channel(
        self, integration_settings: Settings, broker: QuorumRabbitmqBroker, events_exchange: tuple[str, str]
    ) -> None:
        exchange, queue = events_exchange
        routed, unroutable = event(exchange, "portal.acme.provisioned"), event(exchange, "portal.nobody.x")
        publisher = DramatiqPublisher(broker)
        assert publisher.publish_batch([routed]) == {routed.message_id}
        assert publisher.publish_batch([unroutable]) == set()
        properties, body = get_one(integration_settings.broker_url, queue)
        assert json.loads(body) == routed.payload
        assert properties.user_id == workers_user(integration_settings)

    def test_the_in_memory_broker_keeps_them_for_whoever_reads_them(self) -> None:
        publisher = DramatiqPublisher(StubBroker())
        sent = event("accessflow.events", "portal.acme.provisioned")
        assert publisher.publish_batch([sent]) == {sent.message_id}
        assert publisher.events == [sent]


def malformed_rows(services: Services, message_id: str) -> list[sa.Row[Any]]:
    with services.engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(orm.malformed_messages).where(orm.malformed_messages.c.message_id == message_id)
            )
        )


def cycle() -> list[Any]:
    looped: list[Any] = []
    looped.append(looped)
    return looped


class TestRecordingARefusal:
    @pytest.mark.parametrize(
        "body",
        [
            "lone \ud800 surrogate and NUL \x00",
            {"args": [{"justification": "\udfff\x00"}], "kwargs": {}},
            "x" * 1_000_000,
            {"a set": {1, 2}, "bytes": b"\x00\xff", "object": object()},
            cycle(),
            10**5000,
        ],
        ids=["surrogate-and-nul", "surrogate-in-args", "huge", "not-json-types", "cycle", "huge-int"],
    )
    def test_survives_any_body(self, services: Services, body: Any) -> None:
        message_id = str(uuid.uuid4())
        services.record_malformed(
            message_id=message_id,
            queue_name="q\x00",
            actor_name="a\ud800",
            reason="bad \ud800\x00 reason",
            body=body,
            sender="portal\x00",
            kind="forged",
        )
        [row] = malformed_rows(services, message_id)
        assert row.kind == "forged" and row.sender == "portal\\x00"
        assert row.reason == "bad \\ud800\\x00 reason"
        assert 0 < len(row.body_excerpt) <= 2000

    def test_records_a_redelivery_once_even_when_two_workers_race(self, services: Services) -> None:
        message_id = str(uuid.uuid4())
        errors: list[BaseException] = []

        def record(n: int) -> None:
            try:
                services.record_malformed(
                    message_id=message_id, queue_name="q", actor_name="a", reason=f"try {n}", body="b"
                )
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
        [row] = malformed_rows(services, message_id)
        assert (row.kind, row.sender) == ("malformed", None)


class TestAContractFailureWithALoneSurrogate:
    def test_is_recorded_once_and_not_retried(self, integration_settings: Settings) -> None:
        # Given the real actors on the in-memory broker, with the real database behind them
        services = build(integration_settings.model_copy(update={"broker_url": "stub://"}))
        broker = wire(services)
        assert isinstance(broker, StubBroker)
        worker = dramatiq.Worker(broker, worker_timeout=100)
        worker.start()
        try:
            # When a submission breaks its contract and carries a lone surrogate
            queue = SUBMIT.queue_name(integration_settings.queue_prefix)
            message_id = str(uuid.uuid4())
            payload = {"request_id": str(uuid.uuid4()), "justification": "\ud800", "plan_id": 5}
            broker.enqueue(
                dramatiq.Message(
                    queue_name=queue,
                    actor_name=SUBMIT.actor_name,
                    args=(payload,),
                    kwargs={},
                    options={},
                    message_id=message_id,
                )
            )
            broker.join(queue, timeout=30_000)
            worker.join()

            # Then it is recorded, with its reason, and nothing was retried or dead-lettered
            [row] = malformed_rows(services, message_id)
            assert "plan_id" in row.reason
            assert "\\ud800" in row.body_excerpt
            assert broker.dead_letters == []
        finally:
            worker.stop()
            broker.close()
