"""A list of broker URLs whose first node is down: every client reaches the next one."""

from __future__ import annotations

import pika
from pika.adapters.blocking_connection import BlockingConnection

from infra.messaging import dead_letters
from infra.messaging.broker import connection_parameters
from tests.services import free_port


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
