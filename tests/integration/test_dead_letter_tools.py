"""``dlq list`` and ``dlq replay`` (infra.messaging.dead_letters) on whatever a dead-letter queue holds.

Anything can end up in ``<queue>.XQ``: both tools must read every body without raising,
and a replay (published by an internal user) must not give a message more trust than
its first publisher had.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from infra.bootstrap import Services
from infra.messaging import dead_letters
from infra.messaging.amqp import broker_user
from infra.messaging.broker import QuorumRabbitmqBroker, make_broker
from infra.settings import Settings
from messages.routes import ISSUE, QUEUE_ROUTES, SUBMIT
from tests import services as svc
from tests.services import envelope

pytestmark = pytest.mark.integration

#: Bodies no tool may trip over; the last two carry an id the tools can name them by.
HOSTILE: list[tuple[bytes, dict[str, Any]]] = [
    (b"[" * 100_000, {}),
    (b'{"message_id": "\\ud800", "actor_name": "\\udfff"}', {}),
    ('{"message_id": "x\ud800"}'.encode("utf-8", "surrogatepass"), {}),
    (b"\x00\xff not json", {"headers": {"x-death": "nonsense"}}),
    (b"", {"headers": {"x-death": [1, 2]}}),
    (b'{"message_id": "m", "message_id": "n"}', {"headers": {"x-death": [{"reason": b"rejected\n\x00"}]}}),
    (b"[[[[", {"message_id": "amqp-id-1"}),
]


@pytest.fixture
def xq(integration_settings: Settings) -> Iterator[tuple[str, str, QuorumRabbitmqBroker]]:
    """A requests queue and a credentials queue of this test's own, with their XQs."""
    prefix = f"{integration_settings.queue_prefix}-dlq-{uuid.uuid4().hex[:6]}"
    broker = make_broker(integration_settings.model_copy(update={"queue_prefix": prefix}))
    assert isinstance(broker, QuorumRabbitmqBroker)
    requests, credentials = SUBMIT.queue_name(prefix), ISSUE.queue_name(prefix)
    for queue in (requests, credentials):
        broker.declare_queue(queue, ensure=True)
    try:
        yield requests, credentials, broker
    finally:
        broker.close()
        svc.delete_queues(integration_settings.broker_url, prefix, [route.queue for route in QUEUE_ROUTES])


def put(broker_url: str, queue: str, body: bytes, **properties: Any) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "", queue, body, pika.BasicProperties(delivery_mode=2, **properties), mandatory=True
        )
    finally:
        connection.close()


def take(broker_url: str, queue: str) -> list[tuple[pika.BasicProperties, dict[str, Any]]]:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        taken: list[tuple[pika.BasicProperties, dict[str, Any]]] = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, json.loads(body)))
    finally:
        connection.close()


def letter(queue: str, options: dict[str, Any]) -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    body = json.loads(envelope(queue, SUBMIT.actor_name, {"request_id": "r"}, message_id=message_id))
    body["options"] = options
    return message_id, json.dumps(body).encode()


class TestListing:
    def test_reads_any_body_and_leaves_the_queue_as_it_was(
        self, integration_settings: Settings, services: Services, xq: tuple[str, str, Any]
    ) -> None:
        url, (requests, _, _) = integration_settings.broker_url, xq
        for body, properties in HOSTILE:
            put(url, f"{requests}.XQ", body, **properties)

        letters = dead_letters.peek(url, services.session_factory, f"{requests}.XQ")

        assert len(letters) == len(HOSTILE)
        assert [letter.message_id for letter in letters] == [None] * (len(HOSTILE) - 1) + ["amqp-id-1"]
        for shown in letters:
            for text in (shown.reason, shown.body_excerpt, shown.actor_name or ""):
                text.encode("utf-8")  # no lone surrogate
                assert "\x00" not in text
        assert letters[5].reason == "dead-lettered by the broker (rejected \\x00)"
        assert svc.queue_depth(url, f"{requests}.XQ") == len(HOSTILE)


class TestReplaying:
    def test_keeps_what_is_not_a_message_and_survives_it(
        self, integration_settings: Settings, services: Services, xq: tuple[str, str, Any]
    ) -> None:
        url, (requests, _, _) = integration_settings.broker_url, xq
        for body, properties in HOSTILE:
            put(url, f"{requests}.XQ", body, **properties)

        result = dead_letters.replay(url, services.session_factory, f"{requests}.XQ")

        assert (result.replayed, result.kept) == (0, len(HOSTILE))
        assert svc.queue_depth(url, f"{requests}.XQ") == len(HOSTILE)

    def test_an_internal_senders_message_keeps_its_origin_and_nothing_else(
        self, integration_settings: Settings, services: Services, xq: tuple[str, str, QuorumRabbitmqBroker]
    ) -> None:
        # Given a retried portal submission as the workers dead-lettered it: their user_id, its origin
        url, (requests, _, broker) = integration_settings.broker_url, xq
        options = {"origin": "acme-portal", "retries": 7, "eta": 1, "pipe_target": {}, "traceback": "x"}
        message_id, body = letter(requests, options)
        put(url, f"{requests}.XQ", body, user_id=broker.user_id, message_id=message_id)

        result = dead_letters.replay(url, services.session_factory, f"{requests}.XQ")

        # Then it goes back with fresh retries, its origin, and the replaying user's validated id
        assert result.replayed == 1
        [(properties, replayed)] = take(url, requests)
        assert replayed["options"] == {"origin": "acme-portal"}
        assert (properties.user_id, properties.message_id) == (broker.user_id, message_id)

    def test_an_outsiders_message_cannot_claim_an_origin(
        self, integration_settings: Settings, services: Services, xq: tuple[str, str, Any]
    ) -> None:
        # Given a dead letter a portal published without user_id, claiming the workers as its origin
        url, (requests, _, _) = integration_settings.broker_url, xq
        workers = broker_user(pika.URLParameters(url))
        message_id, body = letter(requests, {"origin": workers, "retries": 0})
        put(url, f"{requests}.XQ", body, message_id=message_id)

        dead_letters.replay(url, services.session_factory, f"{requests}.XQ")

        [(_, replayed)] = take(url, requests)
        assert replayed["options"] == {}

    def test_an_outsiders_origin_is_the_user_that_published_it(
        self, integration_settings: Settings, services: Services, xq: tuple[str, str, Any]
    ) -> None:
        # Given a deployment where the user publishing this letter is not one of accessflow's own
        url, (requests, _, _) = integration_settings.broker_url, xq
        publisher = broker_user(pika.URLParameters(url))
        message_id, body = letter(requests, {"origin": "someone-trusted"})
        put(url, f"{requests}.XQ", body, user_id=publisher, message_id=message_id)

        dead_letters.replay(
            url, services.session_factory, f"{requests}.XQ", internal_senders={"accessflow-ops"}
        )

        [(_, replayed)] = take(url, requests)
        assert replayed["options"] == {"origin": publisher}

    def test_an_outsiders_message_for_an_internal_queue_stays_in_the_dead_letter_queue(
        self, integration_settings: Settings, services: Services, xq: tuple[str, str, Any]
    ) -> None:
        url, (_, credentials, _) = integration_settings.broker_url, xq
        message_id = str(uuid.uuid4())
        body = envelope(credentials, ISSUE.actor_name, {"request_id": "r"}, message_id=message_id)
        put(url, f"{credentials}.XQ", body, message_id=message_id)

        result = dead_letters.replay(url, services.session_factory, f"{credentials}.XQ")

        assert (result.replayed, result.kept, result.untrusted) == (0, 1, 1)
        assert svc.queue_depth(url, credentials) == 0
        assert svc.queue_depth(url, f"{credentials}.XQ") == 1
