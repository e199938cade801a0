"""ACCESSFLOW_BROKER_URL: one node's URL as always, or the comma-separated URLs of a cluster's nodes."""

from __future__ import annotations

import dramatiq
import pika
import pytest
from pydantic import ValidationError

from infra.cli.broker import vhost_of
from infra.cli.producer import AmqpWire
from infra.messaging.amqp import amqp_url_with_timeouts, connection_parameters
from infra.messaging.broker import QuorumRabbitmqBroker, make_broker
from infra.messaging.publisher import BatchConfirmPublisher
from infra.messaging.topology import Topology
from infra.settings import Settings, split_broker_urls

ONE = "amqp://workers:s3cret@10.0.0.1:5672/accessflow"
THREE = (
    "amqp://workers:s3cret@10.0.0.1:5672/accessflow,"
    "amqp://workers:s3cret@10.0.0.2:5672/accessflow, "
    "amqps://workers:s3cret@10.0.0.3:5671/accessflow"
)


class TestSplittingTheSetting:
    def test_one_url_comes_back_unchanged(self) -> None:
        assert split_broker_urls(ONE) == [ONE]

    def test_several_urls_split_at_commas_in_their_order(self) -> None:
        assert [u.split("@")[1] for u in split_broker_urls(THREE)] == [
            "10.0.0.1:5672/accessflow",
            "10.0.0.2:5672/accessflow",
            "10.0.0.3:5671/accessflow",
        ]

    def test_a_comma_inside_a_password_or_a_query_stays_in_its_url(self) -> None:
        # Given a password and a query with commas in them, neither followed by a scheme
        first = "amqp://workers:a,b@10.0.0.1:5672/accessflow?heartbeat=10,"
        value = f"{first}amqp://workers:a,b@10.0.0.2:5672/accessflow"
        # Then only the comma before the second scheme separates
        assert split_broker_urls(value) == [first[:-1], "amqp://workers:a,b@10.0.0.2:5672/accessflow"]

    def test_whitespace_and_a_trailing_comma_are_ignored(self) -> None:
        assert split_broker_urls(f"  {ONE} ,\n amqp://workers:s3cret@h2/accessflow ") == [
            ONE,
            "amqp://workers:s3cret@h2/accessflow",
        ]


class TestSettings:
    def test_one_url_is_read_as_before(self) -> None:
        settings = Settings(broker_url=ONE)
        assert settings.broker_url == ONE
        assert settings.broker_urls() == [ONE]
        assert settings.internal_users() == {"workers"}

    def test_several_urls_give_the_first_ones_user_as_the_internal_user(self) -> None:
        settings = Settings(broker_url=THREE)
        assert len(settings.broker_urls()) == 3
        assert settings.internal_users() == {"workers"}

    def test_the_nodes_must_share_one_user(self) -> None:
        with pytest.raises(ValidationError, match="one user and one vhost"):
            Settings(broker_url=f"{ONE},amqp://portal:x@10.0.0.2:5672/accessflow")

    def test_the_nodes_must_share_one_vhost(self) -> None:
        with pytest.raises(ValidationError, match="one user and one vhost"):
            Settings(broker_url=f"{ONE},amqp://workers:s3cret@10.0.0.2:5672/other")

    def test_the_default_vhost_may_be_spelt_either_way(self) -> None:
        settings = Settings(broker_url="amqp://g:g@h1:5672/%2F,amqp://g:g@h2:5672/,amqp://g:g@h3:5672")
        assert len(settings.broker_urls()) == 3

    def test_the_in_memory_broker_is_not_listed_with_nodes(self) -> None:
        with pytest.raises(ValidationError):
            Settings(broker_url=f"stub://,{ONE}")

    def test_the_environment_variable_carries_the_list(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ACCESSFLOW_BROKER_URL", THREE)
        assert len(Settings().broker_urls()) == 3


class TestConnectionParameters:
    def test_each_node_gets_the_timeouts_in_order(self) -> None:
        parameters = connection_parameters(THREE)
        assert [p.host for p in parameters] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        assert [p.port for p in parameters] == [5672, 5672, 5671]
        assert {p.virtual_host for p in parameters} == {"accessflow"}
        assert {p.heartbeat for p in parameters} == {30}
        assert {p.socket_timeout for p in parameters} == {10}

    def test_a_list_of_urls_is_taken_as_it_is(self) -> None:
        assert [p.host for p in connection_parameters(["amqp://g:g@a/", "amqp://g:g@b/"])] == ["a", "b"]

    def test_nothing_to_connect_to_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="no broker URL"):
            connection_parameters([])


class TestWhoTakesTheList:
    def test_one_url_builds_dramatiqs_broker_exactly_as_before(self) -> None:
        broker = make_broker(Settings(broker_url=ONE))
        assert isinstance(broker, QuorumRabbitmqBroker)
        # One URL: dramatiq keeps a single parameters object, as it always did.
        assert isinstance(broker.parameters, pika.URLParameters)
        assert broker.parameters == pika.URLParameters(amqp_url_with_timeouts(ONE))
        assert broker.user_id == "workers"

    def test_several_urls_give_dramatiq_a_list_that_pika_tries_in_turn(self) -> None:
        broker = make_broker(Settings(broker_url=THREE))
        assert isinstance(broker, QuorumRabbitmqBroker)
        assert isinstance(broker.parameters, list)
        assert [p.host for p in broker.parameters] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        assert {p.heartbeat for p in broker.parameters} == {30}
        assert broker.user_id == "workers"

    def test_the_outbox_publisher_takes_every_node(self) -> None:
        publisher = BatchConfirmPublisher(THREE, declare=lambda queue: None)
        assert [p.host for p in publisher.parameters] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        assert publisher.user_id == "workers"

    def test_the_portals_wire_takes_every_node(self) -> None:
        wire = AmqpWire(THREE, Topology("accessflow"))
        assert [p.host for p in wire.parameters] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        assert wire.user == "workers"

    def test_broker_setup_reads_the_vhost_of_the_first_node(self) -> None:
        assert vhost_of(THREE) == "accessflow"
        assert vhost_of(ONE) == "accessflow"

    def test_the_stub_broker_is_still_one_url(self) -> None:
        assert not isinstance(make_broker(Settings(broker_url="stub://")), QuorumRabbitmqBroker)
        assert isinstance(make_broker(Settings(broker_url="stub://")), dramatiq.Broker)
