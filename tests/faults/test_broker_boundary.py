"""The broker is a boundary: what each AMQP user may and may not do, on a real node.

One private RabbitMQ node (never the shared one) serves the whole module. ``accessflow
broker setup`` (the CLI, as a subprocess) applies the definitions with passwords for the
workers, the admin tool, ops and two portals (p1, p2), and a third portal (p3) without
one; the workers' dramatiq broker then declares the work queues as the workers would,
and :func:`infra.topology.declare` runs on top, as at worker boot.

Every refusal is its own test and asserts RabbitMQ's exact error: an over-permissive
setup would let the operation through and the test would fail.
"""

from __future__ import annotations

import json
import os
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

from infra.broker import QuorumRabbitmqBroker, make_broker
from infra.broker_admin import MASK, BrokerAdminError, Rabbitmqctl, apply_definitions
from infra.settings import Settings
from infra.topology import HASHING_ALGORITHM, WORK_QUEUES, QueueArguments, Topology, declare
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
ACCESS_REFUSED, PRECONDITION_FAILED = 403, 406


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
        argv = [sys.executable, "-m", "infra.cli_broker", "setup", "--node", self.node.node]
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
        declare(broker.channel, TOPOLOGY, queue_arguments=QueueArguments.from_settings(settings))
        declare(broker.channel, TOPOLOGY)  # idempotent
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


def depth(deployment: Deployment, queue: str) -> int:
    with deployment.channel(WORKERS) as channel:
        return int(channel.queue_declare(queue=queue, passive=True).method.message_count)


def bind_portal_queue(deployment: Deployment, portal_id: str, routing_key: str) -> str:
    """As the portal: declare its events queue and bind it to the events exchange."""
    queue = TOPOLOGY.portal_events_queue(portal_id)
    with deployment.channel(PORTAL_USERS[portal_id]) as channel:
        channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(queue=queue, exchange=TOPOLOGY.events_exchange, routing_key=routing_key)
    return queue


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
            channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})
            assert refused(
                channel.queue_bind, queue=queue, exchange=TOPOLOGY.events_exchange, routing_key=binding_key
            ) == (
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - access to topic '{binding_key}' in exchange 'accessflow.out.events' "
                "in vhost 'accessflow' refused for user 'portal-p1'",
            )

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

    def test_an_event_reaches_the_portal_it_names_and_no_other(self, deployment: Deployment) -> None:
        p1_queue = bind_portal_queue(deployment, "p1", "p1.#")
        p2_queue = bind_portal_queue(deployment, "p2", "p2.#")
        p2_before = depth(deployment, p2_queue)
        marker, body = marked_body()
        with deployment.channel(WORKERS) as channel:
            publish(channel, TOPOLOGY.events_exchange, "p1.approved", body, user_id=WORKERS)
        assert take(deployment, "portal-p1", p1_queue, marker).user_id == WORKERS
        # The confirm came after every queue the event was routed to had it: p2's has nothing new.
        assert depth(deployment, p2_queue) == p2_before

    def test_an_event_for_a_portal_without_a_queue_is_kept_in_the_unrouted_queue(
        self, deployment: Deployment
    ) -> None:
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
