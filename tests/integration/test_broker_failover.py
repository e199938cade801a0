"""A list of broker URLs whose first node is down: every client reaches the next one."""

from __future__ import annotations

import uuid

import pika
import pytest
from pika.adapters.blocking_connection import BlockingConnection

from infra.messaging import dead_letters
from infra.messaging.amqp import connection_parameters
from infra.messaging.broker import QuorumRabbitmqBroker, queue_declarer
from infra.messaging.publisher import BatchConfirmPublisher, Outgoing
from infra.observability.metrics import Snapshot, read_broker
from infra.settings import Settings
from messages.routes import NOTIFY
from tests import services as svc
from tests.services import free_port

pytestmark = pytest.mark.integration


def _dead_node(broker_url: str) -> str:
    """``broker_url`` moved to a port on which nothing listens: a node that is down."""
    url = pika.URLParameters(broker_url)
    dead = broker_url.replace(f"{url.host}:{url.port}", f"127.0.0.1:{free_port()}", 1)
    assert dead != broker_url, f"no host:port to replace in {broker_url}"
    return dead


class TestAListWithADeadFirstNode:
    def test_a_connection_goes_to_the_surviving_node(self, broker_url: str) -> None:
        # Given the URL of a node that is down, then the live one, as ACCESSFLOW_BROKER_URL lists them
        listed = f"{_dead_node(broker_url)},{broker_url}"
        # When a client connects with the parameters every accessflow client uses
        connection = BlockingConnection(connection_parameters(listed))
        try:
            # Then it is connected to the live node
            assert connection.is_open
            assert connection._impl.params.port == pika.URLParameters(broker_url).port
        finally:
            connection.close()

    def test_the_dead_letter_tools_read_through_the_surviving_node(self, broker_url: str) -> None:
        listed = f"{_dead_node(broker_url)},{broker_url}"
        assert dead_letters.depth(listed, "accessflow-never-declared.XQ") == 0


class TestThePublisherWithADeadFirstNode:
    def test_its_next_attempt_goes_to_the_next_node_and_the_batch_is_confirmed(
        self, settings: Settings, prefix: str, broker: QuorumRabbitmqBroker
    ) -> None:
        # Given the outbox publisher, given a node that is down and then the live one
        listed = f"{_dead_node(settings.broker_url)},{settings.broker_url}"
        publisher = BatchConfirmPublisher(listed, declare=queue_declarer(broker))
        queue = NOTIFY.queue_name(prefix)
        batch = [Outgoing(queue, NOTIFY.actor_name, {"n": i}, str(uuid.uuid4())) for i in range(5)]
        try:
            # When the relay publishes, as its sweep does, until the batch is confirmed
            confirmed = svc.wait_until(
                lambda: publisher.publish_batch(batch), timeout=30, interval=0.3, what="a confirmed batch"
            )
            # Then the whole batch is confirmed, after one refused attempt on the dead node
            assert confirmed == {m.message_id for m in batch}
            assert publisher.io is not None and publisher.io.connects == 2
        finally:
            publisher.close()


class TestTheMetricsCollectorWithADeadFirstNode:
    def test_it_reads_the_queues_through_the_surviving_node(self, broker_url: str) -> None:
        snapshot = Snapshot()
        read_broker(f"{_dead_node(broker_url)},{broker_url}", "accessflow-failover-none", snapshot)
        assert snapshot.broker_up
        assert snapshot.queues == {}  # no queue of that prefix exists: none is listed
