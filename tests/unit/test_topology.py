"""The broker boundary on paper: names, the definitions document, its regexes, and the shipped file.

The regexes are checked with Python's ``re``, which agrees with RabbitMQ's PCRE on the
plain syntax used here (anchors, alternation, escaped dots); the fault suite
(tests/faults/test_broker_boundary.py) checks the same rules on a real node.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from infra.cli.broker import make_group, read_passwords, vhost_of
from infra.messaging.broker import QuorumRabbitmqBroker
from infra.messaging.topology import (
    HASHING_ALGORITHM,
    SHIPPED_DEFINITIONS,
    WORK_QUEUES,
    Accounts,
    QueueArguments,
    Topology,
    declare,
    definitions,
    hash_password,
    main,
    render,
    shipped_definitions,
    verify_password,
)
from infra.settings import Settings

TOPOLOGY = Topology("accessflow")
ACCOUNTS = Accounts(
    workers="af-workers", admin_tool="af-admin", ops="af-ops", portals={"p1": "portal-p1", "p2": "portal-p2"}
)


def document(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "vhost": "accessflow",
        "accounts": ACCOUNTS,
        "passwords": {},
        "queue_arguments": QueueArguments.defaults(),
    }
    return definitions(TOPOLOGY, **{**arguments, **overrides})


def permission_of(doc: dict[str, Any], user: str) -> dict[str, str]:
    [found] = [p for p in doc["permissions"] if p["user"] == user]
    return dict(found)


def topic_permission_of(doc: dict[str, Any], user: str, exchange: str) -> dict[str, str]:
    [found] = [t for t in doc["topic_permissions"] if t["user"] == user and t["exchange"] == exchange]
    return dict(found)


def matches(pattern: str, name: str) -> bool:
    """RabbitMQ's test: the regex matches somewhere in the name (ours are anchored)."""
    return re.search(pattern, name) is not None


class TestNames:
    def test_every_name_is_under_the_prefix(self) -> None:
        assert TOPOLOGY.submissions_exchange == "accessflow.in.submissions"
        assert TOPOLOGY.decisions_exchange == "accessflow.in.decisions"
        assert TOPOLOGY.events_exchange == "accessflow.out.events"
        assert TOPOLOGY.unrouted_exchange == "accessflow.out.unrouted"
        assert TOPOLOGY.unrouted_queue == "accessflow.events.unrouted"
        assert [TOPOLOGY.queue(name) for name in WORK_QUEUES] == [
            "accessflow.requests",
            "accessflow.decisions",
            "accessflow.credentials",
            "accessflow.notifications",
            "accessflow.gateway",
        ]
        assert TOPOLOGY.dead_letter_queue("requests") == "accessflow.requests.XQ"
        assert TOPOLOGY.portal_events_queue("p1") == "accessflow.portal.p1.events"
        assert TOPOLOGY.admin_events_queue == "accessflow.admin.events"

    def test_the_work_queues_are_the_routes_queues(self) -> None:
        from messages.routes import ROUTES

        assert set(WORK_QUEUES) == {route.queue for route in ROUTES}

    def test_an_unknown_work_queue_is_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown work queue"):
            TOPOLOGY.queue("events")

    @pytest.mark.parametrize("portal_id", ["p1.x", "p#", "*", "", "p 1", "p1$", "(p1)"])
    def test_a_portal_id_that_could_widen_a_routing_key_or_regex_is_refused(self, portal_id: str) -> None:
        with pytest.raises(ValueError, match="invalid portal id"):
            TOPOLOGY.portal_events_queue(portal_id)
        with pytest.raises(ValueError, match="invalid portal id"):
            Accounts("w", "a", "o", {portal_id: "u"})

    def test_no_portal_may_be_called_admins_its_queue_would_hear_the_admins_events(self) -> None:
        with pytest.raises(ValueError, match="reserved for the admins' events"):
            TOPOLOGY.portal_events_queue("admins")
        with pytest.raises(ValueError, match="reserved for the admins' events"):
            Accounts.defaults(TOPOLOGY, {"admins": "portal-admins"})
        assert TOPOLOGY.portal_events_queue("admins2") == "accessflow.portal.admins2.events"

    def test_a_prefix_with_regex_or_routing_syntax_is_refused(self) -> None:
        with pytest.raises(ValueError, match="invalid queue prefix"):
            Topology("accessflow#")


class TestAccounts:
    def test_one_user_in_two_roles_is_refused(self) -> None:
        with pytest.raises(ValueError, match="used twice: shared"):
            Accounts(workers="shared", admin_tool="a", ops="o", portals={"p1": "shared"})

    def test_defaults_follow_the_prefix(self) -> None:
        accounts = Accounts.defaults(Topology("acme"), {"p1": "portal-p1"})
        assert accounts.users() == ["acme-workers", "acme-admin", "acme-ops", "portal-p1"]


class TestUsersAndPasswords:
    def test_every_user_is_listed_without_tags(self) -> None:
        users = document()["users"]
        assert [u["name"] for u in users] == ["af-workers", "af-admin", "af-ops", "portal-p1", "portal-p2"]
        assert all(u["tags"] == [] and u["hashing_algorithm"] == HASHING_ALGORITHM for u in users)

    def test_a_user_without_a_password_gets_an_empty_hash(self) -> None:
        users = {u["name"]: u for u in document(passwords={"portal-p1": "s3cret"})["users"]}
        assert users["portal-p2"]["password_hash"] == ""
        assert users["portal-p1"]["password_hash"] != ""

    def test_the_hash_is_rabbitmqs_salted_sha256_of_the_password(self) -> None:
        users = {u["name"]: u for u in document(passwords={"portal-p1": "s3cret é"})["users"]}
        raw = base64.b64decode(users["portal-p1"]["password_hash"])
        salt, digest = raw[:4], raw[4:]
        assert digest == hashlib.sha256(salt + "s3cret é".encode()).digest()
        assert verify_password("s3cret é", users["portal-p1"]["password_hash"])
        assert not verify_password("s3cret e", users["portal-p1"]["password_hash"])

    def test_the_salt_is_random(self) -> None:
        assert hash_password("same") != hash_password("same")

    def test_a_known_vector(self) -> None:
        # salt 908D C60A, password "test12" (RabbitMQ's passwords guide)
        assert (
            hash_password("test12", salt=bytes.fromhex("908DC60A"))
            == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
        )

    def test_the_password_itself_is_nowhere_in_the_document(self) -> None:
        assert "s3cret-password" not in json.dumps(document(passwords={"af-ops": "s3cret-password"}))

    def test_a_password_for_a_user_without_a_role_is_refused(self) -> None:
        with pytest.raises(ValueError, match="no role: stranger"):
            document(passwords={"stranger": "x"})


class TestPermissions:
    def test_the_admin_tool_may_only_publish_decisions_and_read_the_admins_events(self) -> None:
        p = permission_of(document(), "af-admin")
        assert p["configure"] == "^$"
        assert matches(p["read"], "accessflow.admin.events")
        for other in (
            "accessflow.portal.p1.events",
            "accessflow.events.unrouted",
            "accessflow.decisions",
            "accessflow.decisions.XQ",
            "accessflow.out.events",
            "accessflow.admin.eventsX",
        ):
            assert not matches(p["read"], other), other
        assert matches(p["write"], "accessflow.in.decisions")
        for other in (
            "accessflow.in.submissions",
            "amq.default",
            "accessflow.decisions",
            "accessflow.in.decisionsX",
        ):
            assert not matches(p["write"], other), other

    def test_a_portal_writes_the_submissions_exchange_only(self) -> None:
        p = permission_of(document(), "portal-p1")
        assert p["write"] == r"^(accessflow\.in\.submissions)$"
        assert matches(p["write"], "accessflow.in.submissions")
        for refused in (
            "amq.default",
            "accessflow.requests",
            "accessflow.credentials",
            "accessflow.in.decisions",
            "accessflow.out.events",
            "accessflow.in.submissionsX",
            # No write on a queue, even its own: queue.bind needs it, and binding is accessflow's.
            "accessflow.portal.p1.events",
            "accessflow.portal.p1.trap",
            "accessflow.portal.p2.events",
        ):
            assert not matches(p["write"], refused), refused

    def test_a_portal_reads_its_own_events_queue_only(self) -> None:
        p = permission_of(document(), "portal-p1")
        assert p["read"] == r"^(accessflow\.portal\.p1\.events)$"
        for refused in (
            # No read on an exchange: queue.bind and exchange.bind need it on their source.
            "accessflow.out.events",
            "accessflow.in.submissions",
            "accessflow.portal.p1.eventsX",
            "accessflow.portal.p1.trap",
            "accessflow.portal.p2.events",
            "accessflow.portal.p10.events",
            "accessflow.requests",
            "accessflow.events.unrouted",
        ):
            assert not matches(p["read"], refused), refused

    def test_a_portal_configures_nothing(self) -> None:
        # Declaring a queue means choosing its x-dead-letter-exchange: see infra/messaging/topology.py.
        p = permission_of(document(), "portal-p1")
        assert p["configure"] == "^$"
        for refused in (
            "accessflow.portal.p1.events",
            "accessflow.portal.p1.trap",
            "accessflow.portal.p2.events",
            "accessflow.requests",
            "amq.gen-x",
        ):
            assert not matches(p["configure"], refused), refused

    def test_every_portal_gets_the_same_rules_for_its_own_names(self) -> None:
        doc = document()
        for portal_id in ("p1", "p2"):
            p = permission_of(doc, f"portal-{portal_id}")
            assert matches(p["read"], f"accessflow.portal.{portal_id}.events")
            assert p["configure"] == "^$"

    def test_workers_reach_everything_of_the_prefix_and_the_default_exchange(self) -> None:
        p = permission_of(document(), "af-workers")
        for name in ("accessflow.requests", "accessflow.requests.DQ", "accessflow.out.events"):
            assert all(matches(p[kind], name) for kind in ("configure", "write", "read")), name
        assert matches(p["write"], "amq.default")
        assert not matches(p["configure"], "amq.default")
        assert not matches(p["read"], "other.requests")

    def test_ops_read_dead_letters_and_write_the_default_exchange_only(self) -> None:
        p = permission_of(document(), "af-ops")
        assert p["configure"] == "^$"
        assert matches(p["write"], "amq.default")
        assert not matches(p["write"], "accessflow.in.submissions")
        for name in WORK_QUEUES:
            assert matches(p["read"], f"accessflow.{name}.XQ")
            assert not matches(p["read"], f"accessflow.{name}"), name

    def test_the_prefix_is_escaped(self) -> None:
        doc = definitions(
            Topology("a.b"), vhost="v", accounts=Accounts("w", "a", "o"), passwords={}, queue_arguments=None
        )
        workers = permission_of(doc, "w")
        assert matches(workers["configure"], "a.b.requests")
        assert not matches(workers["configure"], "aXb.requests")


class TestTopicPermissions:
    def test_a_portal_submits_only_under_its_own_id(self) -> None:
        t = topic_permission_of(document(), "portal-p1", "accessflow.in.submissions")
        assert matches(t["write"], "p1")
        for refused in ("p2", "p1.x", "p10", "", "#"):
            assert not matches(t["write"], refused), refused
        assert t["read"] == "^$"

    def test_a_portal_has_no_topic_permission_on_the_events_exchange(self) -> None:
        # It may neither publish to nor bind from that exchange: the vhost permissions refuse first.
        doc = document()
        for user in ("portal-p1", "portal-p2"):
            assert [t["exchange"] for t in doc["topic_permissions"] if t["user"] == user] == [
                "accessflow.in.submissions"
            ]

    def test_workers_publish_events_with_any_key_and_the_admin_tool_has_none(self) -> None:
        doc = document()
        assert topic_permission_of(doc, "af-workers", "accessflow.out.events")["write"] == ".*"
        assert not [t for t in doc["topic_permissions"] if t["user"] == "af-admin"]

    def test_workers_bind_portal_events_queues_with_one_portals_key_only(self) -> None:
        t = topic_permission_of(document(), "af-workers", "accessflow.out.events")
        for allowed in ("p1.#", "p-10_x.#"):
            assert matches(t["read"], allowed), allowed
        for refused in ("#", "*.#", "*.approved", "p1.approved", "p1.*", "p1", "p1.x.#", ".#"):
            assert not matches(t["read"], refused), refused
        for portal_id in ("p1", "p2"):
            assert matches(t["read"], TOPOLOGY.portal_events_binding(portal_id)[2])


class TestTopology:
    def test_exchanges_are_durable_and_the_events_exchange_keeps_what_nobody_wants(self) -> None:
        exchanges = {e["name"]: e for e in document()["exchanges"]}
        assert {n: e["type"] for n, e in exchanges.items()} == {
            "accessflow.in.submissions": "topic",
            "accessflow.in.decisions": "topic",
            "accessflow.out.events": "topic",
            "accessflow.out.unrouted": "fanout",
        }
        assert all(e["durable"] and not e["auto_delete"] and not e["internal"] for e in exchanges.values())
        assert exchanges["accessflow.out.events"]["arguments"] == {
            "alternate-exchange": "accessflow.out.unrouted"
        }

    def test_bindings(self) -> None:
        assert sorted((b["source"], b["destination"], b["routing_key"]) for b in document()["bindings"]) == [
            ("accessflow.in.decisions", "accessflow.decisions", "#"),
            ("accessflow.in.submissions", "accessflow.requests", "#"),
            ("accessflow.out.events", "accessflow.admin.events", "admins.#"),
            ("accessflow.out.events", "accessflow.portal.p1.events", "p1.#"),
            ("accessflow.out.events", "accessflow.portal.p2.events", "p2.#"),
            ("accessflow.out.unrouted", "accessflow.events.unrouted", ""),
        ]

    def test_each_portal_gets_its_events_queue_made_by_accessflow(self) -> None:
        queues = {q["name"]: q for q in document()["queues"]}
        for portal_id in ("p1", "p2"):
            queue = queues[f"accessflow.portal.{portal_id}.events"]
            assert queue["arguments"] == {"x-queue-type": "quorum"}  # no dead-lettering of anyone's choosing
            assert queue["durable"] and not queue["auto_delete"]

    def test_without_portals_there_is_no_portal_queue_or_binding(self) -> None:
        doc = document(accounts=Accounts("w", "a", "o"))
        assert not [q for q in doc["queues"] if ".portal." in q["name"]]
        assert [b["destination"] for b in doc["bindings"] if b["source"] == "accessflow.out.events"] == [
            "accessflow.admin.events"
        ]

    def test_work_queues_carry_exactly_the_workers_arguments(self) -> None:
        settings = Settings.model_construct(max_deliveries=3, dead_letter_ttl_days=2)
        arguments = QueueArguments.from_settings(settings)
        queues = {q["name"]: q for q in document(queue_arguments=arguments)["queues"]}
        assert queues["accessflow.requests"]["arguments"] == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 12,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "accessflow.requests.XQ",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        assert queues["accessflow.requests.XQ"]["arguments"] == {
            "x-queue-type": "quorum",
            "x-message-ttl": 2 * 86_400_000,
        }
        assert queues["accessflow.events.unrouted"]["arguments"] == {"x-queue-type": "quorum"}
        assert sorted(queues) == sorted(
            [
                "accessflow.events.unrouted",
                "accessflow.admin.events",
                "accessflow.portal.p1.events",
                "accessflow.portal.p2.events",
            ]
            + [f"accessflow.{n}" for n in WORK_QUEUES]
            + [f"accessflow.{n}.XQ" for n in WORK_QUEUES]
        )

    @pytest.mark.parametrize("ttl_ms", [None, 86_400_000])
    def test_dead_letter_arguments_are_what_the_workers_broker_declares(self, ttl_ms: int | None) -> None:
        broker = QuorumRabbitmqBroker(url="amqp://127.0.0.1/", delivery_limit=20, dead_letter_ttl_ms=ttl_ms)
        channel = RecordingChannel()
        broker.state.channel = channel  # the broker declares on its thread's channel: ours
        broker._declare_xq_queue("accessflow.requests")
        broker._declare_queue("accessflow.requests")  # type: ignore[no-untyped-call]
        arguments = QueueArguments.from_broker(broker)
        assert channel.queues == {
            "accessflow.requests.XQ": dict(arguments.dead_letter("accessflow.requests")),
            "accessflow.requests": dict(arguments.work("accessflow.requests")),
        }


class RecordingChannel:
    """Records what is declared and bound, as a pika channel would carry it to the broker."""

    def __init__(self) -> None:
        self.exchanges: dict[str, tuple[str, bool, dict[str, Any]]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: list[tuple[str, str, str]] = []

    def exchange_declare(
        self, *, exchange: str, exchange_type: str, durable: bool, arguments: dict[str, Any]
    ) -> None:
        self.exchanges[exchange] = (exchange_type, durable, arguments)

    def queue_declare(self, *, queue: str, durable: bool, arguments: dict[str, Any]) -> None:
        assert durable
        self.queues[queue] = arguments

    def queue_bind(self, *, queue: str, exchange: str, routing_key: str) -> None:
        self.bindings.append((exchange, queue, routing_key))


class TestDeclare:
    def test_declares_what_the_definitions_hold(self) -> None:
        channel = RecordingChannel()
        declare(channel, TOPOLOGY)
        doc = document(accounts=Accounts("w", "a", "o"))
        assert channel.exchanges == {e["name"]: (e["type"], True, e["arguments"]) for e in doc["exchanges"]}
        assert channel.queues == {
            "accessflow.events.unrouted": {"x-queue-type": "quorum"},
            "accessflow.admin.events": {"x-queue-type": "quorum"},
        }
        assert sorted(channel.bindings) == sorted(
            (b["source"], b["destination"], b["routing_key"]) for b in doc["bindings"]
        )

    def test_with_portal_ids_it_declares_their_queues_and_bindings_as_the_definitions_do(self) -> None:
        channel = RecordingChannel()
        declare(channel, TOPOLOGY, portal_ids=["p2", "p1", "p2"])
        doc = document()  # portals p1 and p2
        portal_queues = {q["name"]: q["arguments"] for q in doc["queues"] if ".portal." in q["name"]}
        assert {n: a for n, a in channel.queues.items() if ".portal." in n} == portal_queues
        assert sorted(channel.bindings) == sorted(
            (b["source"], b["destination"], b["routing_key"]) for b in doc["bindings"]
        )  # each binding once, p2 given twice

    def test_a_portal_queue_is_declared_before_it_is_bound(self) -> None:
        calls: list[str] = []

        class OrderChannel(RecordingChannel):
            def queue_declare(self, *, queue: str, durable: bool, arguments: dict[str, Any]) -> None:
                calls.append(f"declare {queue}")

            def queue_bind(self, *, queue: str, exchange: str, routing_key: str) -> None:
                calls.append(f"bind {queue}")

        declare(OrderChannel(), TOPOLOGY, portal_ids=["p1"])
        assert calls.index("declare accessflow.portal.p1.events") < calls.index(
            "bind accessflow.portal.p1.events"
        )

    def test_an_invalid_portal_id_is_refused_before_anything_is_declared(self) -> None:
        channel = RecordingChannel()
        with pytest.raises(ValueError, match="invalid portal id"):
            declare(channel, TOPOLOGY, portal_ids=["p1", "p1.#"])
        assert (channel.exchanges, channel.queues, channel.bindings) == ({}, {}, [])

    def test_with_queue_arguments_it_declares_the_bound_work_queues_first(self) -> None:
        channel = RecordingChannel()
        arguments = QueueArguments.defaults()
        declare(channel, TOPOLOGY, queue_arguments=arguments)
        doc_queues = {q["name"]: q["arguments"] for q in document()["queues"]}
        for name in (
            "accessflow.requests",
            "accessflow.requests.XQ",
            "accessflow.decisions",
            "accessflow.decisions.XQ",
        ):
            assert channel.queues[name] == doc_queues[name]
        assert "accessflow.credentials" not in channel.queues


class TestShippedFile:
    def test_deploy_rabbitmq_definitions_json_is_current(self) -> None:
        assert SHIPPED_DEFINITIONS.read_text(encoding="utf-8") == shipped_definitions(), (
            "deploy/rabbitmq/definitions.json is out of date: run python -m infra.messaging.topology"
        )

    def test_it_holds_no_password(self) -> None:
        shipped = json.loads(SHIPPED_DEFINITIONS.read_text(encoding="utf-8"))
        assert {u["password_hash"] for u in shipped["users"]} == {""}
        assert [v["name"] for v in shipped["vhosts"]] == ["accessflow"]

    def test_check_reports_a_stale_file(self, tmp_path: Path) -> None:
        target = tmp_path / "definitions.json"
        assert main(["--check"], target=target) == 1
        assert main([], target=target) == 0
        assert main(["--check"], target=target) == 0
        target.write_text("{}\n")
        assert main(["--check"], target=target) == 1

    def test_rendering_is_deterministic(self) -> None:
        assert render(document()) == render(document())


class TestCli:
    def test_definitions_prints_the_document_for_the_settings_prefix_and_the_given_portals(self) -> None:
        result = CliRunner().invoke(
            make_group(),
            ["definitions", "--vhost", "v1", "--portal", "p1=portal-p1", "--ops-user", "operators"],
            env={"ACCESSFLOW_QUEUE_PREFIX": "acme"},
        )
        assert result.exit_code == 0, result.output
        printed = json.loads(result.output)
        assert [u["name"] for u in printed["users"]] == [
            "acme-workers",
            "acme-admin",
            "operators",
            "portal-p1",
        ]
        assert {p["vhost"] for p in printed["permissions"]} == {"v1"}
        assert printed["exchanges"][0]["name"].startswith("acme.")

    def test_definitions_refuses_a_bad_portal_option(self) -> None:
        result = CliRunner().invoke(make_group(), ["definitions", "--portal", "p1"])
        assert result.exit_code == 2
        assert "is not ID=USER" in result.output

    @pytest.mark.parametrize(
        ("url", "vhost"),
        [
            ("amqp://guest:guest@127.0.0.1:5672/%2F", "/"),
            ("amqp://u:p@host/accessflow", "accessflow"),
            ("amqp://u:p@host", "/"),
            ("amqps://u:p@host:5671/a%2Fb?heartbeat=30", "a/b"),
        ],
    )
    def test_the_vhost_comes_from_the_broker_url(self, url: str, vhost: str) -> None:
        assert vhost_of(url) == vhost

    def test_a_passwords_file_is_yaml_or_json_and_its_content_is_never_echoed(self, tmp_path: Path) -> None:
        good = tmp_path / "passwords.yaml"
        good.write_text("portal-p1: 'pw: 1'\naf-ops: two\n")
        good.chmod(stat.S_IRUSR | stat.S_IWUSR)
        assert read_passwords(good) == {"portal-p1": "pw: 1", "af-ops": "two"}
        bad = tmp_path / "bad.yaml"
        bad.write_text("[hunter2, x\n")
        bad.chmod(stat.S_IRUSR | stat.S_IWUSR)
        with pytest.raises(Exception, match="is not YAML or JSON") as refused:
            read_passwords(bad)
        assert "hunter2" not in str(refused.value)
        listed = tmp_path / "list.json"
        listed.write_text('["hunter2"]')
        listed.chmod(stat.S_IRUSR | stat.S_IWUSR)
        with pytest.raises(Exception, match="must map each user") as refused:
            read_passwords(listed)
        assert "hunter2" not in str(refused.value)
