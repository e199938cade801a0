"""``dlq list`` and a dry-run ``dlq replay`` count no delivery, and name the real reason (real RabbitMQ).

A quorum queue counts every return of a message (``x-delivery-count``), and from
RabbitMQ 4.0 drops a message past a ``delivery-limit`` of 20 even on a queue that sets
none. A dead-letter queue has no dead-letter queue of its own, so a tool that looks by
taking and returning would, after enough looks, lose what it was looking at.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pika
import pytest

from infra.bootstrap import Services
from infra.messaging import dead_letters
from infra.messaging.amqp import broker_user
from infra.messaging.broker import QuorumRabbitmqBroker, make_broker
from infra.settings import Settings
from messages.routes import ISSUE, QUEUE_ROUTES, SUBMIT
from tests import services as svc
from tests.integration.test_dead_letter_tools import put, take
from tests.services import envelope

pytestmark = pytest.mark.integration

#: Looks at each queue in these tests: more than the delivery limit below.
LOOKS = 5
#: A delivery limit small enough to reach in a few looks; RabbitMQ 4.0's default is 20.
DELIVERY_LIMIT = 2


@pytest.fixture
def prefix(integration_settings: Settings) -> Iterator[str]:
    name = f"{integration_settings.queue_prefix}-dlq-{uuid.uuid4().hex[:6]}"
    yield name
    svc.delete_queues(integration_settings.broker_url, name, [route.queue for route in QUEUE_ROUTES])


@pytest.fixture
def limited_xq(integration_settings: Settings, prefix: str) -> str:
    """A requests XQ as RabbitMQ 4 makes it: a quorum queue with a delivery limit, past which it drops."""
    xq = f"{SUBMIT.queue_name(prefix)}.XQ"
    connection = pika.BlockingConnection(pika.URLParameters(integration_settings.broker_url))
    try:
        connection.channel().queue_declare(
            xq, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
        )
    finally:
        connection.close()
    return xq


@pytest.fixture
def broker(integration_settings: Settings, prefix: str) -> Iterator[QuorumRabbitmqBroker]:
    """The workers' broker on this test's queues, declared as the workers declare them."""
    built = make_broker(integration_settings.model_copy(update={"queue_prefix": prefix}))
    assert isinstance(built, QuorumRabbitmqBroker)
    built.declare_queue(SUBMIT.queue_name(prefix), ensure=True)
    try:
        yield built
    finally:
        built.close()


def letters_in(url: str, xq: str) -> list[tuple[str | None, int]]:
    """Take every message from ``xq`` for good: its AMQP message id and its delivery count."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        taken = []
        while True:
            method, properties, _ = channel.basic_get(xq, auto_ack=True)
            if method is None:
                return taken
            count = (properties.headers or {}).get("x-delivery-count", 0)
            taken.append((properties.message_id, count))
    finally:
        connection.close()


def a_message(queue: str, actor_name: str = SUBMIT.actor_name) -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    return message_id, envelope(queue, actor_name, {"request_id": "r"}, message_id=message_id)


class TestLookingCountsNoDelivery:
    def test_listing_again_and_again_neither_counts_a_delivery_nor_loses_a_letter(
        self, integration_settings: Settings, services: Services, limited_xq: str
    ) -> None:
        # Given three dead letters in a queue that drops a message after two deliveries
        url = integration_settings.broker_url
        ids = []
        for _ in range(3):
            message_id, body = a_message(limited_xq.removesuffix(".XQ"))
            put(url, limited_xq, body, message_id=message_id)
            ids.append(message_id)

        # When an operator lists them more often than that
        for _ in range(LOOKS):
            listed = dead_letters.peek(url, services.session_factory, limited_xq)

            # Then every listing shows all three, in order
            assert [letter.message_id for letter in listed] == ids

        # And they are all still there, never counted as delivered
        assert letters_in(url, limited_xq) == [(message_id, 0) for message_id in ids]

    def test_a_dry_run_and_the_letters_a_replay_keeps_count_no_delivery(
        self, integration_settings: Settings, services: Services, limited_xq: str
    ) -> None:
        # Given a replayable dead letter and one that is not a message at all
        url = integration_settings.broker_url
        message_id, body = a_message(limited_xq.removesuffix(".XQ"))
        put(url, limited_xq, body, message_id=message_id, user_id=broker_user(pika.URLParameters(url)))
        put(url, limited_xq, b"not a message", message_id="junk-1")

        # When a dry run looks at both, again and again
        for _ in range(LOOKS):
            result = dead_letters.replay(url, services.session_factory, limited_xq, dry_run=True)
            assert (result.replayed, result.kept) == (1, 1)

        # Then both are still there, in order, and neither counted a delivery
        assert letters_in(url, limited_xq) == [(message_id, 0), ("junk-1", 0)]

        # And a replay that keeps what is not a message, again and again, keeps it uncounted
        put(url, limited_xq, b"not a message", message_id="junk-2")
        for _ in range(LOOKS):
            result = dead_letters.replay(url, services.session_factory, limited_xq)
            assert (result.replayed, result.kept) == (0, 1)
        assert letters_in(url, limited_xq) == [("junk-2", 0)]


class TestTheRealReason:
    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (
                json.dumps(
                    json.loads(
                        envelope("QUEUE", "no.such.actor", {"request_id": "r"}, message_id="unknown-actor-1")
                    )
                ).encode(),
                'no actor is named "no.such.actor"',
            ),
            (b"\xff\xfe not even text", "the body is not UTF-8 (byte 0)"),
        ],
        ids=["unknown-actor", "undecodable-body"],
    )
    def test_a_refusal_the_consumer_could_not_record_is_listed_with_its_reason(
        self,
        integration_settings: Settings,
        services: Services,
        broker: QuorumRabbitmqBroker,
        prefix: str,
        body: bytes,
        reason: str,
    ) -> None:
        # Given a delivery the consumer refuses, in a process that cannot record the refusal
        # (its database is down), so that the consumer nacks it into the XQ
        url = integration_settings.broker_url
        queue = SUBMIT.queue_name(prefix)
        body = body.replace(b'"QUEUE"', json.dumps(queue).encode())
        put(url, queue, body, message_id="refused-1", user_id=broker.user_id)
        consumer = broker.consume(queue, prefetch=1, timeout=100)
        try:
            svc.wait_until(
                lambda: next(consumer) is None and svc.queue_depth(url, f"{queue}.XQ") == 1,
                what="the refused delivery to be dead-lettered",
            )
        finally:
            consumer.close()

        # When an operator lists the XQ
        [letter] = dead_letters.peek(url, services.session_factory, f"{queue}.XQ")

        # Then the reason is why the consumer refused it, not that "the broker rejected it"
        assert reason in letter.reason
        assert "rejected by the broker" not in letter.reason

    def test_a_letter_past_the_delivery_limit_says_so(
        self, integration_settings: Settings, services: Services, prefix: str
    ) -> None:
        # Given a message a work queue dead-lettered after its delivery limit (one, here)
        url = integration_settings.broker_url
        queue = f"{prefix}.limited"
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            channel.queue_declare(f"{queue}.XQ", durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_declare(
                queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": 0,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": f"{queue}.XQ",
                },
            )
            message_id, body = a_message(queue)
            put(url, queue, body, message_id=message_id)
            method, _, _ = channel.basic_get(queue)
            assert method is not None
            channel.basic_nack(method.delivery_tag, requeue=True)
            svc.wait_until(
                lambda: svc.queue_depth(url, f"{queue}.XQ") == 1, what="the letter to be dead-lettered"
            )

            # When it is listed
            [letter] = dead_letters.peek(url, services.session_factory, f"{queue}.XQ")

            # Then its reason names the delivery limit
            assert "delivery limit" in letter.reason
        finally:
            for name in (queue, f"{queue}.XQ"):
                channel.queue_delete(name)
            connection.close()


class TestAListedLetterKeepsItsPublisher:
    """A listing re-publishes each letter as the operator's user; a replay must still know its first publisher."""

    def test_an_outsiders_letter_for_an_internal_queue_is_not_laundered_by_a_listing(
        self, integration_settings: Settings, services: Services, prefix: str
    ) -> None:
        # Given a letter for the credentials queue from a publisher that set no user_id,
        # with a header claiming the workers published it
        url = integration_settings.broker_url
        xq = f"{ISSUE.queue_name(prefix)}.XQ"
        workers = broker_user(pika.URLParameters(url))
        declare_xq(url, xq)
        message_id, body = a_message(ISSUE.queue_name(prefix), ISSUE.actor_name)
        put(url, xq, body, message_id=message_id, headers={dead_letters.PUBLISHER_HEADER: workers})

        # When it is listed (and so moved by the workers' user), then replayed
        dead_letters.peek(url, services.session_factory, xq)
        dead_letters.peek(url, services.session_factory, xq)
        result = dead_letters.replay(url, services.session_factory, xq)

        # Then it stays in the XQ as an outsider's
        assert (result.replayed, result.kept, result.untrusted) == (0, 1, 1)
        assert svc.queue_depth(url, ISSUE.queue_name(prefix)) == 0

    def test_a_refusal_reason_is_believed_only_from_one_of_ours_even_after_a_listing(
        self, integration_settings: Settings, services: Services, prefix: str
    ) -> None:
        # Given two letters with a refusal header and a publisher header: one the workers put
        # there, one from a publisher that set no user_id
        url = integration_settings.broker_url
        xq = f"{SUBMIT.queue_name(prefix)}.XQ"
        workers = broker_user(pika.URLParameters(url))
        declare_xq(url, xq)
        ours_id, ours = a_message(SUBMIT.queue_name(prefix))
        forged_id, forged = a_message(SUBMIT.queue_name(prefix))
        headers = {dead_letters.PUBLISHER_HEADER: "", dead_letters.REFUSAL_HEADER: "a reason of ours"}
        put(url, xq, ours, message_id=ours_id, user_id=workers, headers=headers)
        put(url, xq, forged, message_id=forged_id, headers={**headers, "accessflow-refusal": "forged"})

        # When they are listed twice (the first listing moves them, as the workers' user)
        dead_letters.peek(url, services.session_factory, xq)
        letters = {
            letter.message_id: letter for letter in dead_letters.peek(url, services.session_factory, xq)
        }

        # Then ours shows its reason, and the other's header is not believed, before or after the move
        assert (
            letters[ours_id].reason == "refused by the consumer, which could not record why: a reason of ours"
        )
        assert "forged" not in letters[forged_id].reason

    def test_an_internal_letter_keeps_its_origin_through_listings(
        self, integration_settings: Settings, services: Services, prefix: str
    ) -> None:
        # Given a portal's submission as the workers dead-lettered it: their user_id, its origin
        url = integration_settings.broker_url
        queue = SUBMIT.queue_name(prefix)
        workers = broker_user(pika.URLParameters(url))
        declare_xq(url, f"{queue}.XQ")
        declare_xq(url, queue)
        message_id, body = a_message(queue)
        message = json.loads(body)
        message["options"] = {"origin": "acme-portal", "retries": 3}
        put(url, f"{queue}.XQ", json.dumps(message).encode(), message_id=message_id, user_id=workers)

        # When it is listed twice, then replayed
        dead_letters.peek(url, services.session_factory, f"{queue}.XQ")
        dead_letters.peek(url, services.session_factory, f"{queue}.XQ")
        result = dead_letters.replay(url, services.session_factory, f"{queue}.XQ")

        # Then it goes back with its origin, as if it had never been listed
        assert result.replayed == 1
        [(properties, replayed)] = take(url, queue)
        assert replayed["options"] == {"origin": "acme-portal"}
        assert properties.message_id == message_id


def declare_xq(url: str, name: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        connection.close()
