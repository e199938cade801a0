"""The broker is a boundary: what each AMQP user may and may not do, on a real node.

One private RabbitMQ node (never the shared one) serves the whole module. ``accessflow
broker setup`` (the CLI, as a subprocess) applies the definitions with passwords for the
workers, the admin tool, ops and two portals (p1, p2), and a third portal (p3) without
one; setup makes each portal's events queue and its binding. The workers' dramatiq broker
then declares the work queues as the workers would, and :func:`infra.messaging.topology.declare`
runs on top, with the portal ids, as at worker boot.

Every refusal is its own test and asserts RabbitMQ's exact error: an over-permissive
setup would let the operation through and the test would fail. A portal declares and
binds nothing (infra/messaging/topology.py says why: a queue of its own could dead-letter other
users' messages into the submissions exchange), so every such attempt is a refusal test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from infra.messaging.broker import QuorumRabbitmqBroker, make_broker
from infra.messaging.broker_admin import MASK, BrokerAdminError, Rabbitmqctl, apply_definitions
from infra.messaging.topology import HASHING_ALGORITHM, WORK_QUEUES, QueueArguments, Topology, declare
from infra.settings import Settings
from tests.faults.private_services import RABBITMQ_SCRIPTS, PrivateRabbitMQ
from tests.services import IN_CI, wait_until

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        PrivateRabbitMQ.available() is not None and not IN_CI,
        reason=f"no private RabbitMQ: {PrivateRabbitMQ.available()}",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "accessflow"
VHOST = "accessflow"
TOPOLOGY = Topology(PREFIX)
WORKERS, ADMIN, OPS = "af-workers", "af-admin", "af-ops"
PORTAL_USERS = {"p1": "portal-p1", "p2": "portal-p2", "p3": "portal-p3"}
ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED = 403, 404, 406


@dataclass(frozen=True)
class Deployment:
    node: PrivateRabbitMQ
    ctl: Rabbitmqctl
    passwords: dict[str, str]
    cli_env: dict[str, str]

    def url(self, user: str) -> str:
        return f"amqp://{user}:{self.passwords[user]}@127.0.0.1:{self.node.port}/{VHOST}"

    def parameters(self, user: str, password: str | None = None) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host="127.0.0.1",
            port=self.node.port,
            virtual_host=VHOST,
            credentials=pika.PlainCredentials(user, self.passwords[user] if password is None else password),
            connection_attempts=1,
            socket_timeout=5,
            blocked_connection_timeout=30,
        )

    @contextmanager
    def channel(self, user: str) -> Iterator[BlockingChannel]:
        """A channel of ``user`` with publisher confirms on, so a refused publish raises at once."""
        connection = pika.BlockingConnection(self.parameters(user))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            yield channel
        finally:
            if connection.is_open:
                connection.close()

    def setup(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``accessflow broker setup`` for this node, as a subprocess."""
        argv = [sys.executable, "-m", "infra.cli.broker", "setup", "--node", self.node.node]
        argv += ["--rabbitmqctl", str(RABBITMQ_SCRIPTS / "rabbitmqctl"), "--json"]
        argv += ["--workers-user", WORKERS, "--admin-user", ADMIN, "--ops-user", OPS]
        for portal_id, user in PORTAL_USERS.items():
            argv += ["--portal", f"{portal_id}={user}"]
        return subprocess.run(
            [*argv, *args],
            env=self.cli_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateRabbitMQ]:
    with PrivateRabbitMQ() as rabbit:
        yield rabbit


@pytest.fixture(scope="module")
def first_setup(node: PrivateRabbitMQ, tmp_path_factory: pytest.TempPathFactory) -> tuple[Deployment, Any]:
    """The definitions applied with ``broker setup``; returns the deployment and the command's JSON summary."""
    passwords = {user: secrets.token_urlsafe(16) for user in (WORKERS, ADMIN, OPS, "portal-p1", "portal-p2")}
    passwords_file = tmp_path_factory.mktemp("broker") / "passwords.yaml"
    passwords_file.touch(mode=0o600)
    passwords_file.write_text(json.dumps(passwords))
    ctl_env = node._ctl_env()  # HOME with the node's private Erlang cookie, epmd on loopback
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_", "ACCESSFLOW_"))}
    cli_env = {
        **base,
        **ctl_env,
        "ACCESSFLOW_QUEUE_PREFIX": PREFIX,
        "ACCESSFLOW_BROKER_URL": f"amqp://127.0.0.1:{node.port}/{VHOST}",
        "ACCESSFLOW_LOG_FORMAT": "json",
    }
    deployment = Deployment(
        node=node,
        ctl=Rabbitmqctl(executable=str(RABBITMQ_SCRIPTS / "rabbitmqctl"), node=node.node, env=ctl_env),
        passwords=passwords,
        cli_env=cli_env,
    )
    result = deployment.setup("--passwords", str(passwords_file))
    assert result.returncode == 0, result.stderr
    for password in passwords.values():
        assert password not in result.stdout + result.stderr
    return deployment, json.loads(result.stdout)


@pytest.fixture(scope="module")
def deployment(first_setup: tuple[Deployment, Any]) -> Deployment:
    """The applied definitions, plus the work queues declared by the workers' own broker and declare()."""
    deployment, _summary = first_setup
    settings = Settings(broker_url=deployment.url(WORKERS), queue_prefix=PREFIX)
    broker = make_broker(settings)
    assert isinstance(broker, QuorumRabbitmqBroker)
    try:
        for name in WORK_QUEUES:
            # Exactly what a worker does at boot; arguments unlike the imported ones would be a 406 here.
            broker.declare_queue(TOPOLOGY.queue(name), ensure=True)
        declare(
            broker.channel,
            TOPOLOGY,
            queue_arguments=QueueArguments.from_settings(settings),
            portal_ids=PORTAL_USERS,  # setup made their queues: equal arguments, or this is a 406
        )
        declare(broker.channel, TOPOLOGY, portal_ids=PORTAL_USERS)  # idempotent
    finally:
        broker.close()
    return deployment


def refused(operation: Callable[..., object], *args: Any, **kwargs: Any) -> tuple[int, str]:
    """Run ``operation(*args, **kwargs)``, which the broker must refuse by closing the channel.

    Returns the reply code and text of that close.
    """
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        operation(*args, **kwargs)
    return closed.value.reply_code, closed.value.reply_text


def publish(
    channel: BlockingChannel, exchange: str, routing_key: str, body: bytes, *, user_id: str | None = None
) -> None:
    channel.basic_publish(
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        properties=pika.BasicProperties(delivery_mode=2, content_type="application/json", user_id=user_id),
        mandatory=True,
    )


def marked_body() -> tuple[str, bytes]:
    marker = str(uuid.uuid4())
    return marker, json.dumps({"marker": marker}).encode()


def take(deployment: Deployment, user: str, queue: str, marker: str) -> pika.BasicProperties:
    """Wait until a message with ``marker`` is in ``queue`` (read as ``user``), take it, return its properties."""
    found: list[pika.BasicProperties] = []

    def arrived() -> bool:
        with deployment.channel(user) as channel:
            others = []
            while (got := channel.basic_get(queue, auto_ack=False))[0] is not None:
                method, properties, body = got
                if json.loads(body).get("marker") == marker:
                    channel.basic_ack(method.delivery_tag)
                    found.append(properties)
                else:
                    others.append(method.delivery_tag)
            for tag in others:  # not ours: back to the queue
                channel.basic_nack(tag, requeue=True)
        return bool(found)

    wait_until(arrived, timeout=15, what=f"{marker} in {queue}")
    return found[0]


def markers_in(deployment: Deployment, queue: str) -> list[str]:
    """The markers of every message in ``queue``, read as the workers and all put back."""
    markers: list[str] = []
    with deployment.channel(WORKERS) as channel:
        tags = []
        while (got := channel.basic_get(queue, auto_ack=False))[0] is not None:
            method, _properties, body = got
            markers.append(json.loads(body).get("marker"))
            tags.append(method.delivery_tag)
        for tag in tags:
            channel.basic_nack(tag, requeue=True)
    return markers


def depth(deployment: Deployment, queue: str) -> int:
    with deployment.channel(WORKERS) as channel:
        return int(channel.queue_declare(queue=queue, passive=True).method.message_count)


def exists(deployment: Deployment, queue: str) -> bool:
    """Whether ``queue`` exists (a passive declare as the workers; 404 when it does not)."""
    with deployment.channel(WORKERS) as channel:
        try:
            channel.queue_declare(queue=queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as closed:
            assert closed.reply_code == NOT_FOUND, closed
            return False
    return True


def consume_until(channel: BlockingChannel, queue: str, marker: str) -> list[str]:
    """Consume ``queue`` (acking) until the message with ``marker`` arrives; every marker seen, in order."""
    seen: list[str] = []

    def on_message(ch: BlockingChannel, method: Any, _properties: pika.BasicProperties, body: bytes) -> None:
        seen.append(json.loads(body).get("marker"))
        ch.basic_ack(method.delivery_tag)

    tag = channel.basic_consume(queue, on_message, auto_ack=False)

    def arrived() -> bool:
        channel.connection.process_data_events(time_limit=0.2)
        return marker in seen

    wait_until(arrived, timeout=15, what=f"{marker} consumed from {queue}")
    channel.basic_cancel(tag)
    return seen


# --------------------------------------------------------------------------------------
# Setup


class TestSetup:
    def test_it_reports_who_got_a_password_and_who_did_not(self, first_setup: tuple[Deployment, Any]) -> None:
        _deployment, summary = first_setup
        assert summary == {
            "vhost": VHOST,
            "with_new_password": sorted([ADMIN, WORKERS, OPS, "portal-p1", "portal-p2"]),
            "created_without_password": ["portal-p3"],
            "kept": [],
        }

    def test_running_it_again_without_passwords_keeps_every_password(self, deployment: Deployment) -> None:
        result = deployment.setup()
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["kept"] == sorted([ADMIN, WORKERS, OPS, *PORTAL_USERS.values()])
        with deployment.channel("portal-p1"), deployment.channel(WORKERS):
            pass  # both still log in with the passwords set the first time

    def test_a_user_created_without_a_password_logs_in_only_once_one_is_set(
        self, deployment: Deployment
    ) -> None:
        with pytest.raises(pika.exceptions.ProbableAuthenticationError) as refused_login:
            pika.BlockingConnection(deployment.parameters("portal-p3", password=""))
        assert "ACCESS_REFUSED" in str(refused_login.value)
        password = secrets.token_urlsafe(16)
        deployment.ctl.change_password("portal-p3", password)  # read by rabbitmqctl from stdin
        pika.BlockingConnection(deployment.parameters("portal-p3", password=password)).close()

    def test_an_import_rabbitmq_refuses_is_an_error_with_its_message_and_no_secret(
        self, deployment: Deployment
    ) -> None:
        bad_hash = "not-base64-" + secrets.token_hex(8)
        document = {
            "vhosts": [{"name": "scratch"}],
            "users": [
                {
                    "name": "scratch-user",
                    "password_hash": bad_hash,
                    "hashing_algorithm": HASHING_ALGORITHM,
                    "tags": [],
                }
            ],
        }
        try:
            with pytest.raises(BrokerAdminError, match=r"import_definitions .* exited with") as failed:
                apply_definitions(deployment.ctl, document)
            assert bad_hash not in str(failed.value)
            assert MASK in str(failed.value)  # rabbitmqctl quoted it back: {:not_base64, "..."}
        finally:
            deployment.ctl.delete_vhost("scratch")
            deployment.ctl.delete_user("scratch-user")

    def test_a_queue_kept_with_other_arguments_is_an_error(self, deployment: Deployment) -> None:
        # As on a node where a portal declared its events queue itself, with a dead-letter
        # exchange, before portals lost configure: an import keeps that queue as it is.
        def document(arguments: dict[str, Any]) -> dict[str, Any]:
            return {
                "vhosts": [{"name": "scratch"}],
                "queues": [
                    {"name": "accessflow.portal.p1.events", "vhost": "scratch", "durable": True}
                    | {"auto_delete": False, "arguments": arguments}
                ],
            }

        planted = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": "accessflow.in.submissions",
            "x-dead-letter-routing-key": "p2",
        }
        try:
            apply_definitions(deployment.ctl, document(planted))
            with pytest.raises(
                BrokerAdminError, match="keeps queues declared before with other arguments"
            ) as failed:
                apply_definitions(deployment.ctl, document({"x-queue-type": "quorum"}))
            assert "x-dead-letter-routing-key" in str(failed.value)
        finally:
            deployment.ctl.delete_vhost("scratch")

    def test_a_binding_rabbitmq_skipped_on_import_is_an_error(self, deployment: Deployment) -> None:
        # RabbitMQ imports a binding to a missing queue "successfully", without the binding.
        document = {
            "vhosts": [{"name": "scratch"}],
            "exchanges": [
                {"name": "x", "vhost": "scratch", "type": "topic", "durable": True, "auto_delete": False}
                | {"internal": False, "arguments": {}}
            ],
            "bindings": [
                {"source": "x", "vhost": "scratch", "destination": "missing", "destination_type": "queue"}
                | {"routing_key": "#", "arguments": {}}
            ],
        }
        try:
            with pytest.raises(BrokerAdminError, match=r"still lacks: binding x -> missing \('#'\)"):
                apply_definitions(deployment.ctl, document, verify_timeout=2)
        finally:
            deployment.ctl.delete_vhost("scratch")
        assert "scratch" not in deployment.ctl.list_vhosts()


# --------------------------------------------------------------------------------------
# What a portal cannot do


class TestPortalRefusals:
    def test_a_portal_cannot_publish_a_decision(self, deployment: Deployment) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(publish, channel, TOPOLOGY.decisions_exchange, "admin", b"{}") == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to exchange 'accessflow.in.decisions' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )

    @pytest.mark.parametrize("queue", ["credentials", "notifications", "requests", "decisions"])
    def test_a_portal_cannot_reach_a_work_queue_through_the_default_exchange(
        self, deployment: Deployment, queue: str
    ) -> None:
        before = depth(deployment, TOPOLOGY.queue(queue))
        with deployment.channel("portal-p1") as channel:
            assert refused(publish, channel, "", TOPOLOGY.queue(queue), b"{}") == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to exchange 'amq.default' in vhost 'accessflow' refused for user 'portal-p1'",
            )
        assert depth(deployment, TOPOLOGY.queue(queue)) == before

    @pytest.mark.parametrize("routing_key", ["p2", "p1.p2", "#", ""])
    def test_a_portal_cannot_submit_under_another_routing_key(
        self, deployment: Deployment, routing_key: str
    ) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(
                publish, channel, TOPOLOGY.submissions_exchange, routing_key, b"{}", user_id="portal-p1"
            ) == (
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - access to topic '{routing_key}' in exchange 'accessflow.in.submissions' "
                "in vhost 'accessflow' refused for user 'portal-p1'",
            )

    def test_a_publish_claiming_another_user_id_is_refused(self, deployment: Deployment) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(
                publish, channel, TOPOLOGY.submissions_exchange, "p1", b"{}", user_id="portal-p2"
            ) == (
                PRECONDITION_FAILED,
                "PRECONDITION_FAILED - user_id property set to 'portal-p2' but authenticated user was 'portal-p1'",
            )

    @pytest.mark.parametrize("binding_key", ["p2.#", "#", "*.approved", "p1"])
    def test_a_portal_cannot_bind_to_events_not_its_own(
        self, deployment: Deployment, binding_key: str
    ) -> None:
        queue = TOPOLOGY.portal_events_queue("p1")
        with deployment.channel("portal-p1") as channel:
            assert refused(
                channel.queue_bind, queue=queue, exchange=TOPOLOGY.events_exchange, routing_key=binding_key
            ) == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to queue 'accessflow.portal.p1.events' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )

    @pytest.mark.parametrize(
        ("exchange", "binding_key"),
        [("accessflow.out.events", "p1.#"), ("accessflow.in.submissions", "p1"), ("amq.topic", "#")],
    )
    def test_a_portal_cannot_bind_its_queue_even_to_its_own_events(
        self, deployment: Deployment, exchange: str, binding_key: str
    ) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(
                channel.queue_bind,
                queue=TOPOLOGY.portal_events_queue("p1"),
                exchange=exchange,
                routing_key=binding_key,
            ) == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to queue 'accessflow.portal.p1.events' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )

    def test_a_portal_cannot_unbind_its_queue(self, deployment: Deployment) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(
                channel.queue_unbind,
                queue=TOPOLOGY.portal_events_queue("p1"),
                exchange=TOPOLOGY.events_exchange,
                routing_key="p1.#",
            ) == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to queue 'accessflow.portal.p1.events' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )

    def test_a_portal_cannot_route_events_into_the_submissions_exchange(self, deployment: Deployment) -> None:
        # exchange.bind needs write on the destination (a portal has it on submissions) and
        # read on the source: the events, published by the workers, would reach the requests queue.
        with deployment.channel("portal-p1") as channel:
            assert refused(
                channel.exchange_bind,
                destination=TOPOLOGY.submissions_exchange,
                source=TOPOLOGY.events_exchange,
                routing_key="p1.#",
            ) == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to exchange 'accessflow.out.events' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )

    @pytest.mark.parametrize(
        "queue",
        [
            "accessflow.portal.p1.events",  # its own events queue, which already exists
            "accessflow.portal.p1.inbox",  # its own namespace
            "accessflow.portal.p2.events",
            "accessflow.requests",
            "mine",
        ],
    )
    def test_a_portal_cannot_declare_a_queue(self, deployment: Deployment, queue: str) -> None:
        existed = exists(deployment, queue)
        with deployment.channel("portal-p1") as channel:
            assert refused(
                channel.queue_declare, queue=queue, durable=True, arguments={"x-queue-type": "quorum"}
            ) == (
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - access to queue '{queue}' in vhost 'accessflow' refused for user 'portal-p1'",
            )
        assert exists(deployment, queue) == existed

    def test_a_portal_cannot_declare_a_server_named_queue(self, deployment: Deployment) -> None:
        with deployment.channel("portal-p1") as channel:
            code, text = refused(channel.queue_declare, queue="", exclusive=True)
        assert code == ACCESS_REFUSED
        assert re.fullmatch(
            r"ACCESS_REFUSED - access to queue 'amq\.gen-[\w-]+' in vhost 'accessflow' refused for user 'portal-p1'",
            text,
        ), text

    def test_a_portal_cannot_declare_a_queue_that_dead_letters_into_the_submissions_exchange(
        self, deployment: Deployment
    ) -> None:
        # The hole this closes: bound to p1's events (published by the workers) with a TTL of 0,
        # this queue would put them on the requests queue under routing key p2, with the
        # workers' user-id. RabbitMQ asks the declarer for configure and read on the queue and
        # write on the dead-letter exchange (no topic check of the key); a portal has write only.
        queue = "accessflow.portal.p1.trap"
        arguments = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": TOPOLOGY.submissions_exchange,
            "x-dead-letter-routing-key": "p2",
            "x-message-ttl": 0,
        }
        with deployment.channel("portal-p1") as channel:
            assert refused(channel.queue_declare, queue=queue, durable=True, arguments=arguments) == (
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - access to queue '{queue}' in vhost 'accessflow' refused for user 'portal-p1'",
            )
        assert not exists(deployment, queue)

    def test_a_portal_cannot_delete_its_events_queue(self, deployment: Deployment) -> None:
        queue = TOPOLOGY.portal_events_queue("p1")
        with deployment.channel("portal-p1") as channel:
            assert refused(channel.queue_delete, queue=queue) == (
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - access to queue '{queue}' in vhost 'accessflow' refused for user 'portal-p1'",
            )
        assert exists(deployment, queue)

    def test_a_portal_cannot_declare_an_exchange(self, deployment: Deployment) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(
                channel.exchange_declare, exchange="accessflow.portal.p1.x", exchange_type="fanout"
            ) == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to exchange 'accessflow.portal.p1.x' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )

    @pytest.mark.parametrize("portal_id", ["p2", "p3"])
    def test_a_portal_cannot_consume_another_portals_queue(
        self, deployment: Deployment, portal_id: str
    ) -> None:
        queue = TOPOLOGY.portal_events_queue(portal_id)
        expected = (
            ACCESS_REFUSED,
            f"ACCESS_REFUSED - access to queue '{queue}' in vhost 'accessflow' refused for user 'portal-p1'",
        )
        with deployment.channel("portal-p1") as channel:
            assert refused(channel.basic_consume, queue, lambda *_: None) == expected
        with deployment.channel("portal-p1") as channel:
            assert refused(channel.basic_get, queue, auto_ack=False) == expected

    def test_a_portal_cannot_publish_events(self, deployment: Deployment) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(publish, channel, TOPOLOGY.events_exchange, "p2.approved", b"{}") == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to exchange 'accessflow.out.events' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )

    def test_a_portal_cannot_declare_another_portals_queue(self, deployment: Deployment) -> None:
        with deployment.channel("portal-p1") as channel:
            assert refused(channel.queue_declare, queue=TOPOLOGY.portal_events_queue("p2"), durable=True) == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to queue 'accessflow.portal.p2.events' in vhost 'accessflow' "
                "refused for user 'portal-p1'",
            )


class TestAdminAndOpsRefusals:
    def test_the_admin_tool_cannot_publish_a_submission(self, deployment: Deployment) -> None:
        with deployment.channel(ADMIN) as channel:
            assert refused(publish, channel, TOPOLOGY.submissions_exchange, "p1", b"{}") == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to exchange 'accessflow.in.submissions' in vhost 'accessflow' "
                "refused for user 'af-admin'",
            )

    def test_the_admin_tool_cannot_read_a_portals_events(self, deployment: Deployment) -> None:
        queue = TOPOLOGY.portal_events_queue("p1")
        with deployment.channel(ADMIN) as channel:
            assert refused(channel.basic_get, queue, auto_ack=False) == (
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - access to queue '{queue}' in vhost 'accessflow' refused for user 'af-admin'",
            )

    def test_the_admin_tool_cannot_bind_its_queue_to_every_portals_events(
        self, deployment: Deployment
    ) -> None:
        # bound with "#", the admins' queue would hear every credential issued, sealed secrets and all
        with deployment.channel(ADMIN) as channel:
            code, text = refused(
                channel.queue_bind,
                queue=TOPOLOGY.admin_events_queue,
                exchange=TOPOLOGY.events_exchange,
                routing_key="#",
            )
        assert code == ACCESS_REFUSED and text.endswith("refused for user 'af-admin'"), text

    def test_a_portal_cannot_read_the_admins_events(self, deployment: Deployment) -> None:
        queue = TOPOLOGY.admin_events_queue
        expected = (
            ACCESS_REFUSED,
            f"ACCESS_REFUSED - access to queue '{queue}' in vhost 'accessflow' refused for user 'portal-p1'",
        )
        with deployment.channel("portal-p1") as channel:
            assert refused(channel.basic_get, queue, auto_ack=False) == expected
        with deployment.channel("portal-p1") as channel:
            assert refused(channel.basic_consume, queue, lambda *_: None) == expected

    def test_ops_cannot_take_work_from_a_work_queue(self, deployment: Deployment) -> None:
        with deployment.channel(OPS) as channel:
            assert refused(channel.basic_get, TOPOLOGY.queue("credentials"), auto_ack=False) == (
                ACCESS_REFUSED,
                "ACCESS_REFUSED - access to queue 'accessflow.credentials' in vhost 'accessflow' refused for user 'af-ops'",
            )


# --------------------------------------------------------------------------------------
# What goes through


class TestAllowedPaths:
    def test_a_portal_submission_under_its_own_id_lands_on_the_requests_queue(
        self, deployment: Deployment
    ) -> None:
        marker, body = marked_body()
        with deployment.channel("portal-p1") as channel:
            publish(
                channel, TOPOLOGY.submissions_exchange, "p1", body, user_id="portal-p1"
            )  # confirmed, routed
        properties = take(deployment, WORKERS, TOPOLOGY.queue("requests"), marker)
        assert properties.user_id == "portal-p1"

    def test_an_admin_decision_lands_on_the_decisions_queue(self, deployment: Deployment) -> None:
        marker, body = marked_body()
        with deployment.channel(ADMIN) as channel:
            publish(channel, TOPOLOGY.decisions_exchange, "admin-7", body, user_id=ADMIN)
        assert take(deployment, WORKERS, TOPOLOGY.queue("decisions"), marker).user_id == ADMIN

    def test_setup_made_each_portals_events_queue_and_its_binding(self, deployment: Deployment) -> None:
        bindings = {
            (b["source_name"], b["destination_name"], b["routing_key"])
            for b in deployment.ctl.list_bindings(VHOST)
        }
        queues = {q["name"]: q["arguments"] for q in deployment.ctl.list_queues(VHOST)}
        for portal_id in PORTAL_USERS:
            queue = TOPOLOGY.portal_events_queue(portal_id)
            assert queues[queue] == {"x-queue-type": "quorum"}
            assert (TOPOLOGY.events_exchange, queue, f"{portal_id}.#") in bindings
        # And the admins' queue, under the routing word no portal may have
        assert queues[TOPOLOGY.admin_events_queue] == {"x-queue-type": "quorum"}
        assert (TOPOLOGY.events_exchange, TOPOLOGY.admin_events_queue, "admins.#") in bindings
        # Every binding from the events exchange is accessflow's: one portal's key to that portal's
        # queue, or the admins' key to theirs.
        for _source, destination, key in (b for b in bindings if b[0] == TOPOLOGY.events_exchange):
            if key == "admins.#":
                assert destination == TOPOLOGY.admin_events_queue
                continue
            portal_id = key.removesuffix(".#")
            assert destination == TOPOLOGY.portal_events_queue(portal_id), (destination, key)

    def test_a_portal_consumes_its_own_events_and_no_other_portals(self, deployment: Deployment) -> None:
        # Given an event for p2 published before one for p1 (each confirmed, so routed)
        p2_marker, p2_body = marked_body()
        p1_marker, p1_body = marked_body()
        with deployment.channel(WORKERS) as channel:
            publish(channel, TOPOLOGY.events_exchange, "p2.approved", p2_body, user_id=WORKERS)
            publish(channel, TOPOLOGY.events_exchange, "p1.approved", p1_body, user_id=WORKERS)
        # When p1 consumes the queue setup made for it, up to its own event
        with deployment.channel("portal-p1") as channel:
            seen = consume_until(channel, TOPOLOGY.portal_events_queue("p1"), p1_marker)
        # Then p2's event, which would have come first, was never in it; it is in p2's queue
        assert p2_marker not in seen
        assert take(deployment, "portal-p2", TOPOLOGY.portal_events_queue("p2"), p2_marker).user_id == WORKERS

    def test_the_admin_tool_reads_the_admins_events_and_no_portal_hears_them(
        self, deployment: Deployment
    ) -> None:
        marker, body = marked_body()
        with deployment.channel(WORKERS) as channel:
            publish(
                channel, TOPOLOGY.events_exchange, "admins.access_request.bulk_decided", body, user_id=WORKERS
            )
        assert take(deployment, ADMIN, TOPOLOGY.admin_events_queue, marker).user_id == WORKERS
        # routed to the admins' queue alone: not kept as unrouted, in no portal's queue
        for queue in (TOPOLOGY.unrouted_queue, *(TOPOLOGY.portal_events_queue(p) for p in PORTAL_USERS)):
            assert marker not in markers_in(deployment, queue), queue

    def test_declare_at_worker_boot_gives_a_portal_registered_later_its_queue(
        self, deployment: Deployment
    ) -> None:
        # p4 is in no definitions: registered after the last setup, known to the workers from the database.
        queue = TOPOLOGY.portal_events_queue("p4")
        assert not exists(deployment, queue)
        with deployment.channel(WORKERS) as channel:
            declare(channel, TOPOLOGY, portal_ids=["p1", "p4"])
            declare(channel, TOPOLOGY, portal_ids=["p1", "p4"])  # idempotent
        marker, body = marked_body()
        with deployment.channel(WORKERS) as channel:
            publish(channel, TOPOLOGY.events_exchange, "p4.approved", body, user_id=WORKERS)
        take(deployment, WORKERS, queue, marker)

    def test_an_event_for_a_portal_without_a_queue_is_kept_in_the_unrouted_queue(
        self, deployment: Deployment
    ) -> None:
        assert not exists(deployment, TOPOLOGY.portal_events_queue("p9"))  # p9 is in no definitions
        marker, body = marked_body()
        with deployment.channel(WORKERS) as channel:
            publish(channel, TOPOLOGY.events_exchange, "p9.approved", body)  # mandatory: not returned
        take(deployment, WORKERS, TOPOLOGY.unrouted_queue, marker)

    def test_ops_count_a_work_queue_read_dead_letters_and_replay_them(self, deployment: Deployment) -> None:
        marker, body = marked_body()
        dead_letters = TOPOLOGY.dead_letter_queue("notifications")
        with deployment.channel(WORKERS) as channel:
            publish(channel, "", dead_letters, body)
        with deployment.channel(OPS) as channel:
            channel.queue_declare(queue=TOPOLOGY.queue("notifications"), passive=True)  # depth: no permission
            wait_until(lambda: channel.queue_declare(queue=dead_letters, passive=True).method.message_count)
            method, _properties, got = channel.basic_get(dead_letters, auto_ack=False)
            assert method is not None and json.loads(got)["marker"] == marker
            publish(channel, "", TOPOLOGY.queue("notifications"), got)  # replay onto the work queue
            channel.basic_ack(method.delivery_tag)
        take(deployment, WORKERS, TOPOLOGY.queue("notifications"), marker)
