"""The wire contracts, their generated JSON Schemas and the AsyncAPI document that publishes them.

Outside parties publish contract v2 (the current one); v1 (the legacy one) is still read off
the wire by the payload's ``version``, so the document and the schemas describe both. The
events accessflow sends portals have a schema of their own, without dramatiq's envelope.

A queue may carry more than one route: admin decisions and credential operations share the
decisions queue and the decisions exchange. A channel therefore stands for the routes of its
queue (or of its exchange), and each message on it for one of them, by its ``actor_name``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import dramatiq
import pytest
import yaml
from pydantic import BaseModel, ValidationError

import messages
from domain.events import BulkDecisionSettled
from domain.model import CredentialOperationKind, OperationTarget
from infra.credentials.signing import verify
from infra.messaging.topology import QueueArguments, Topology
from messages import export, routes, v1, v2, validation
from messages.canonical import canonical_bytes
from messages.events import AdminEvent, EventName, RequestEvent
from tests import signing_doc

MESSAGES_DIR = Path(messages.__file__).resolve().parent
ASYNCAPI = MESSAGES_DIR / "asyncapi.yaml"
PREFIX = "accessflow"
ENVELOPE_FIELDS = frozenset(field.name for field in dataclasses.fields(dramatiq.Message))
#: The events accessflow sends, by their message's name: each body is the event itself, in no envelope.
EVENTS: dict[str, type[RequestEvent | AdminEvent]] = {"portal.event": RequestEvent, "admin.event": AdminEvent}
TOPOLOGY = Topology(PREFIX)
#: Where outside parties publish each external route's messages: an exchange, never the queue.
EXCHANGE_OF = {
    routes.SUBMIT.actor_name: TOPOLOGY.submissions_exchange,
    routes.DECIDE.actor_name: TOPOLOGY.decisions_exchange,
    routes.OPERATE.actor_name: TOPOLOGY.decisions_exchange,
    routes.DECIDE_BULK.actor_name: TOPOLOGY.decisions_exchange,
}


# --- generated schemas -----------------------------------------------------------------------------


def test_schema_files_on_disk_are_up_to_date() -> None:
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in export.SCHEMA_DIR.glob("*.json")}
    assert on_disk == export.render_schemas(), "messages/schemas is out of date: run `make schemas`"


def test_one_schema_file_per_contract_plus_the_envelope() -> None:
    assert sorted(export.render_schemas()) == sorted(
        [
            "access_request.submitted.v2.json",
            "access_request.submitted.v1.json",
            "access_request.decided.v2.json",
            "access_request.decided.v1.json",
            "credentials.operate.v2.json",
            "access_request.bulk_decided.v2.json",
            "credentials.issue.v1.json",
            "notification.send.v1.json",
            "gateway.push.v1.json",
            "portal.event.v1.json",
            "admin.event.v1.json",
            "envelope.json",
        ]
    )


def test_the_schema_files_are_named_after_each_contracts_type_and_version() -> None:
    assert export.contract_filename(v2.AccessRequestSubmitted) == "access_request.submitted.v2.json"
    assert export.contract_filename(v1.AccessRequestSubmitted) == "access_request.submitted.v1.json"
    assert export.contract_filename(v2.AdminDecision) == "access_request.decided.v2.json"
    assert export.contract_filename(v1.AdminDecision) == "access_request.decided.v1.json"
    assert export.contract_filename(v2.CredentialOperation) == "credentials.operate.v2.json"
    assert export.contract_filename(RequestEvent) == "portal.event.v1.json"
    assert export.contract_filename(AdminEvent) == "admin.event.v1.json"


def test_the_current_contract_of_each_external_route_is_v2_and_v1_its_legacy_if_it_had_one() -> None:
    assert {route.actor_name for route in routes.ROUTES if route.external} == {
        routes.SUBMIT.actor_name,
        routes.DECIDE.actor_name,
        routes.OPERATE.actor_name,
        routes.DECIDE_BULK.actor_name,
    }
    assert (routes.SUBMIT.contract, dict(routes.SUBMIT.legacy)) == (
        v2.AccessRequestSubmitted,
        {1: v1.AccessRequestSubmitted},
    )
    assert (routes.DECIDE.contract, dict(routes.DECIDE.legacy)) == (v2.AdminDecision, {1: v1.AdminDecision})
    # born in v2: no v1 to read, so a payload of any other version is refused by v2 itself
    assert (routes.OPERATE.contract, dict(routes.OPERATE.legacy)) == (v2.CredentialOperation, {})
    assert routes.OPERATE.contract_for({"version": 1}) is v2.CredentialOperation
    assert (routes.DECIDE_BULK.contract, dict(routes.DECIDE_BULK.legacy)) == (v2.BulkDecision, {})
    assert not routes.ISSUE.legacy and not routes.NOTIFY.legacy


def test_credential_operations_share_the_decisions_queue_which_is_listed_once() -> None:
    assert routes.OPERATE.queue == routes.DECIDE.queue == "decisions"
    assert routes.OPERATE.actor_name != routes.DECIDE.actor_name  # the envelope's actor_name tells them apart
    assert routes.QUEUES == ("requests", "decisions", "credentials", "notifications", "gateway")
    assert routes.QUEUE_ROUTES == (routes.SUBMIT, routes.DECIDE, routes.ISSUE, routes.NOTIFY, routes.PUSH)
    assert {route.queue for route in routes.ROUTES} == set(routes.QUEUES)


def test_rendered_schemas_are_deterministic_json() -> None:
    first, second = export.render_schemas(), export.render_schemas()
    assert first == second
    for name, text in first.items():
        assert text.endswith("}\n"), name
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", name


def test_check_flag_reports_missing_changed_and_stale_files(tmp_path: Path) -> None:
    assert export.main(["--check"], directory=tmp_path) == 1  # nothing written yet

    assert export.main([], directory=tmp_path) == 0
    assert export.main(["--check"], directory=tmp_path) == 0

    changed = tmp_path / "envelope.json"
    changed.write_text(changed.read_text(encoding="utf-8") + " ", encoding="utf-8")
    assert export.differences(tmp_path) == ["envelope.json"]
    assert export.main(["--check"], directory=tmp_path) == 1

    (tmp_path / "old.v0.json").write_text("{}\n", encoding="utf-8")
    assert export.differences(tmp_path) == ["envelope.json", "old.v0.json"]

    assert export.main([], directory=tmp_path) == 0
    assert not (tmp_path / "old.v0.json").exists()
    assert export.main(["--check"], directory=tmp_path) == 0


def test_the_committed_schemas_pass_the_check() -> None:
    assert export.main(["--check"]) == 0


# --- asyncapi.yaml ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    document = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                assert isinstance(value, str)
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def _binding(channel: dict[str, Any]) -> dict[str, Any]:
    binding: dict[str, Any] = channel["bindings"]["amqp"]
    return binding


def _amqp_name(channel: dict[str, Any]) -> str:
    """The queue or the exchange the channel stands for."""
    binding = _binding(channel)
    assert binding["is"] in {"queue", "routingKey"}, binding
    return str(binding["queue"]["name"] if binding["is"] == "queue" else binding["exchange"]["name"])


def _is_events(channel: dict[str, Any]) -> bool:
    """A channel of events accessflow sends (to a portal, or to the admin tools): the events exchange."""
    return _binding(channel)["is"] == "routingKey" and _amqp_name(channel) == TOPOLOGY.events_exchange


def _routes_of(channel: dict[str, Any]) -> tuple[routes.Route, ...]:
    """The routes of a queue's channel, or of the exchange outside parties publish their messages to:
    one or more, in the order of :data:`routes.ROUTES`."""
    if _binding(channel)["is"] == "routingKey":
        matching = tuple(
            route for route in routes.ROUTES if EXCHANGE_OF.get(route.actor_name) == _amqp_name(channel)
        )
        assert matching, f"no route for exchange {_amqp_name(channel)}"
        return matching
    matching = tuple(route for route in routes.ROUTES if route.queue_name(PREFIX) == channel["address"])
    assert matching, f"no route for channel address {channel['address']}"
    return matching


def _messages(document: dict[str, Any], channel: dict[str, Any]) -> list[dict[str, Any]]:
    return [_resolve(document, message_ref["$ref"]) for message_ref in channel["messages"].values()]


def _actor_of(message: dict[str, Any]) -> str:
    """The ``actor_name`` a message's envelope must carry."""
    _, specific = message["payload"]["allOf"]
    return str(specific["properties"]["actor_name"]["const"])


def _route_of_message(channel: dict[str, Any], message: dict[str, Any]) -> routes.Route:
    """The one route of the channel the message is for, by its envelope's actor_name."""
    matching = [route for route in _routes_of(channel) if route.actor_name == _actor_of(message)]
    assert len(matching) == 1, f"{message['name']}: actor {_actor_of(message)} is no route of its channel"
    return matching[0]


def _route_channels(document: dict[str, Any]) -> Iterator[tuple[dict[str, Any], tuple[routes.Route, ...]]]:
    """Every channel but the events', with its routes: each of them must have one or more."""
    for channel in document["channels"].values():
        if not _is_events(channel):
            yield channel, _routes_of(channel)


def _contract_files(route: routes.Route) -> set[str]:
    """The schema files of the contracts the route reads: the current one and the legacy ones."""
    return {f"schemas/{export.contract_filename(c)}" for c in (route.contract, *route.legacy.values())}


def _examples(document: dict[str, Any]) -> Iterator[tuple[str, routes.Route, dict[str, Any]]]:
    """Every example of every message on a route's channel, with the route of its message."""
    for channel, _ in _route_channels(document):
        for message in _messages(document, channel):
            route = _route_of_message(channel, message)
            for example in message.get("examples", []):
                yield example["name"], route, example["payload"]


def test_asyncapi_version_and_info(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["info"]["title"] == "accessflow"
    assert asyncapi["info"]["version"] == "2.0.0"  # the version of the current contracts
    assert {server["host"] for server in asyncapi["servers"].values()} >= {"127.0.0.1:5672"}
    assert {server["protocol"] for server in asyncapi["servers"].values()} == {"amqp"}


def test_one_channel_per_queue_and_per_exchange_outside_parties_use(asyncapi: dict[str, Any]) -> None:
    channels = list(asyncapi["channels"].values())
    queues = [channel for channel in channels if _binding(channel)["is"] == "queue"]
    exchanges = [channel for channel in channels if _binding(channel)["is"] == "routingKey"]
    assert len(queues) + len(exchanges) == len(channels)
    assert len(queues) == len(routes.QUEUES)
    assert sorted(channel["address"] for channel in queues) == sorted(
        f"{PREFIX}.{queue}" for queue in routes.QUEUES
    )
    assert sorted(_amqp_name(channel) for channel in exchanges if not _is_events(channel)) == sorted(
        set(EXCHANGE_OF.values())
    )
    # the events exchange twice: a portal's events under its id, the admin tools' under ``admins``
    assert sorted(channel["address"] for channel in exchanges if _is_events(channel)) == [
        "admins.{event}",
        "{portalId}.{event}",
    ]
    assert set(EXCHANGE_OF) == {route.actor_name for route in routes.ROUTES if route.external}


def test_every_route_has_a_message_on_its_queue_and_its_exchange(asyncapi: dict[str, Any]) -> None:
    on_queues: set[str] = set()
    on_exchanges: set[str] = set()
    for channel, _ in _route_channels(asyncapi):
        for message in _messages(asyncapi, channel):
            route = _route_of_message(channel, message)
            if _binding(channel)["is"] == "queue":
                on_queues.add(route.actor_name)
            else:
                assert EXCHANGE_OF[route.actor_name] == _amqp_name(channel)
                on_exchanges.add(route.actor_name)
    assert on_queues == {route.actor_name for route in routes.ROUTES}
    assert on_exchanges == set(EXCHANGE_OF)
    # the decisions queue and exchange carry both the decisions and the credential operations
    decisions = {
        _amqp_name(channel): {_actor_of(message) for message in _messages(asyncapi, channel)}
        for channel, _ in _route_channels(asyncapi)
        if routes.OPERATE in _routes_of(channel)
    }
    both = {routes.DECIDE.actor_name, routes.OPERATE.actor_name, routes.DECIDE_BULK.actor_name}
    assert decisions == {routes.DECIDE.queue_name(PREFIX): both, TOPOLOGY.decisions_exchange: both}


def test_channel_bindings_describe_accessflows_queues_and_exchanges(asyncapi: dict[str, Any]) -> None:
    exchange_types = {name: kind for name, kind, _ in TOPOLOGY.exchanges()}
    queue_arguments = QueueArguments.defaults()
    for channel in asyncapi["channels"].values():
        binding = _binding(channel)
        if binding["is"] == "queue":
            assert binding["queue"]["name"] == channel["address"]
            assert binding["queue"]["durable"] is True
            # what the workers declare the queue with, dead-lettering to <queue>.XQ included
            assert binding["x-queue-arguments"] == dict(queue_arguments.work(channel["address"]))
            assert binding["x-queue-arguments"]["x-dead-letter-routing-key"] == f"{channel['address']}.XQ"
        else:
            assert binding["exchange"]["type"] == exchange_types[binding["exchange"]["name"]]
            assert binding["exchange"]["durable"] is True


def test_portals_send_to_exchanges_and_accessflow_receives_from_its_queues(asyncapi: dict[str, Any]) -> None:
    actions: dict[str | tuple[str, str], str] = {}
    for operation in asyncapi["operations"].values():
        channel = _resolve(asyncapi, operation["channel"]["$ref"])
        for message_ref in operation["messages"]:
            assert message_ref["$ref"].startswith(operation["channel"]["$ref"] + "/messages/")
        # one operation per queue or exchange, so it lists every message of its channel: both
        # the decisions and the credential operations on the decisions queue and exchange
        assert sorted(ref["$ref"].rsplit("/", 1)[1] for ref in operation["messages"]) == sorted(
            channel["messages"]
        ), operation["title"]
        outside = _binding(channel)["is"] == "routingKey"
        assert [tag["name"] for tag in operation["tags"]] == ["external" if outside else "internal"]
        # the events exchange has two channels, told apart by their routing keys
        name = (_amqp_name(channel), channel["address"]) if _is_events(channel) else _amqp_name(channel)
        assert name not in actions, f"two operations on {name}"
        actions[name] = operation["action"]
    assert actions == {
        TOPOLOGY.submissions_exchange: "send",
        TOPOLOGY.decisions_exchange: "send",
        (TOPOLOGY.events_exchange, "{portalId}.{event}"): "receive",
        (TOPOLOGY.events_exchange, "admins.{event}"): "receive",
        routes.SUBMIT.queue_name(PREFIX): "receive",
        routes.DECIDE.queue_name(PREFIX): "receive",  # and routes.OPERATE's: the same queue
        routes.ISSUE.queue_name(PREFIX): "receive",
        routes.NOTIFY.queue_name(PREFIX): "receive",
        routes.PUSH.queue_name(PREFIX): "receive",
    }
    # outside parties send what the external routes read, and nobody sends to a queue directly
    assert {name for name, action in actions.items() if action == "send"} == {
        EXCHANGE_OF[route.actor_name] for route in routes.ROUTES if route.external
    }


def test_every_local_reference_resolves(asyncapi: dict[str, Any]) -> None:
    local = [ref for ref in _refs(asyncapi) if ref.startswith("#")]
    assert local
    for ref in local:
        _resolve(asyncapi, ref)


def test_every_schema_file_reference_points_to_an_existing_file(asyncapi: dict[str, Any]) -> None:
    files = {ref.split("#", 1)[0] for ref in _refs(asyncapi) if not ref.startswith("#")}
    assert files, "asyncapi.yaml refers to no schema file"
    for path in files:
        assert path.startswith("schemas/"), f"unexpected external reference {path}"
        assert (MESSAGES_DIR / path).is_file(), f"{path} does not exist: run `make schemas`"
    missing = sorted({f"schemas/{name}" for name in export.render_schemas()} - files)
    assert not missing, f"every schema is referenced, current, legacy and the events; not {missing}"
    assert files == {f"schemas/{name}" for name in export.render_schemas()}


def test_each_payload_refers_to_the_envelope_and_its_contract(asyncapi: dict[str, Any]) -> None:
    for channel in asyncapi["channels"].values():
        if _is_events(channel):
            for message in _messages(asyncapi, channel):
                schema = f"schemas/{export.contract_filename(EVENTS[message['name']])}"
                assert message["payload"] == {"$ref": schema}, "an event is the body itself"
            continue
        contracts: dict[str, set[str]] = {route.actor_name: set() for route in _routes_of(channel)}
        for message in _messages(asyncapi, channel):
            envelope, specific = message["payload"]["allOf"]
            assert envelope == {"$ref": "schemas/envelope.json"}
            route = _route_of_message(channel, message)
            assert specific["properties"]["actor_name"] == {"const": route.actor_name}
            contracts[route.actor_name].add(specific["properties"]["args"]["items"]["$ref"])
        for route in _routes_of(channel):
            current = f"schemas/{export.contract_filename(route.contract)}"
            if _binding(channel)["is"] == "queue":
                # the current contract, and each legacy one the route still reads
                assert contracts[route.actor_name] == _contract_files(route), channel["address"]
            else:
                # what outside parties publish: the current contract, perhaps a legacy one as well
                assert current in contracts[route.actor_name] <= _contract_files(route), _amqp_name(channel)


def test_event_examples_are_events_accessflow_sends(asyncapi: dict[str, Any]) -> None:
    examples = [
        (message["name"], example["payload"])
        for channel in asyncapi["channels"].values()
        if _is_events(channel)
        for message in _messages(asyncapi, channel)
        for example in message.get("examples", [])
    ]
    assert {name for name, _ in examples} == set(EVENTS)
    for name, example in examples:
        EVENTS[name].model_validate(example)


def test_each_events_channel_is_addressed_by_the_routing_key_its_events_carry(
    asyncapi: dict[str, Any],
) -> None:
    for channel in asyncapi["channels"].values():
        if not _is_events(channel):
            continue
        parameters = {"{portalId}": "[A-Za-z0-9_-]+", "{event}": "[a-z_]+[.][a-z_]+"}
        pattern = re.escape(channel["address"])
        for parameter, matching in parameters.items():
            pattern = pattern.replace(re.escape(parameter), matching)
        for message in _messages(asyncapi, channel):
            for example in message.get("examples", []):
                event = EVENTS[message["name"]].model_validate(example["payload"])
                assert re.fullmatch(pattern, event.routing_key()), (channel["address"], event.routing_key())


def test_every_external_message_has_an_example(asyncapi: dict[str, Any]) -> None:
    exemplified = {route.actor_name for _, route, _ in _examples(asyncapi)}
    assert exemplified == {route.actor_name for route in routes.ROUTES if route.external}
    assert exemplified == {
        routes.SUBMIT.actor_name,
        routes.DECIDE.actor_name,
        routes.OPERATE.actor_name,
        routes.DECIDE_BULK.actor_name,
    }


def test_every_external_route_has_an_example_of_its_current_contract(asyncapi: dict[str, Any]) -> None:
    current = {
        route.actor_name
        for _, route, envelope in _examples(asyncapi)
        if route.contract_for(envelope["args"][0]) is route.contract
    }
    assert current == {
        routes.SUBMIT.actor_name,
        routes.DECIDE.actor_name,
        routes.OPERATE.actor_name,
        routes.DECIDE_BULK.actor_name,
    }


def test_examples_are_complete_envelopes_that_accessflow_accepts(asyncapi: dict[str, Any]) -> None:
    examples = list(_examples(asyncapi))
    assert len(examples) >= 3
    for name, route, envelope in examples:
        assert set(envelope) == ENVELOPE_FIELDS, name
        export.Envelope.model_validate(envelope)
        assert envelope["actor_name"] == route.actor_name, name
        assert envelope["queue_name"] == route.queue_name(PREFIX), name
        assert envelope["kwargs"] == {} and envelope["options"] == {}, name
        body = json.dumps(envelope).encode("utf-8")
        decoded = dramatiq.Message.decode(body)  # what the consumer does with the body
        contract = validation.decode(route, decoded.args, decoded.kwargs)
        # the contract of the example's version: the current one, or a legacy one the route still reads
        assert type(contract) is route.contract_for(envelope["args"][0]), name


def test_signed_examples_verify_with_the_worked_examples_key(asyncapi: dict[str, Any]) -> None:
    # Given the key of the worked example under "Signing admin decisions", which every signed example uses
    key = signing_doc.worked_example().public_key_text
    signed = [
        (name, validation.decode(route, tuple(envelope["args"]), envelope["kwargs"]))
        for name, route, envelope in _examples(asyncapi)
        if route in (routes.DECIDE, routes.OPERATE, routes.DECIDE_BULK)
    ]
    assert {type(message) for _, message in signed} == {
        v2.AdminDecision,
        v2.CredentialOperation,
        v2.BulkDecision,
    }
    for name, message in signed:
        # Then each verifies over the bytes a worker rebuilds from it, as the handler checks it
        assert isinstance(message, v2.AdminDecision | v2.CredentialOperation | v2.BulkDecision)
        assert verify(key, message.signature.value, message.signed_bytes()), name


def test_example_credential_operations_revoke_an_app_and_rotate_with_grace(asyncapi: dict[str, Any]) -> None:
    operations = [
        v2.CredentialOperation.model_validate(envelope["args"][0])
        for _, route, envelope in _examples(asyncapi)
        if route is routes.OPERATE
    ]
    assert {(o.operation, o.target) for o in operations} >= {("revoke", "app"), ("rotate", "credential")}
    assert any(o.grace_seconds for o in operations if o.operation == "rotate")


def test_the_stated_signed_bytes_of_the_example_revoke_are_its_signed_bytes(asyncapi: dict[str, Any]) -> None:
    # Given the section "Operating on credentials", which shows the signed bytes of its revoke
    description = asyncapi["info"]["description"]
    section = description[description.index("## Operating on credentials") : description.index("## Signing")]
    [stated] = re.findall(r"```text\n(.*?)\n```", section, flags=re.DOTALL)
    length = re.search(r"The signed bytes of the revoke, (\d+) bytes:", section)
    # (each example shows on the exchange's channel and on the queue's: the same message)
    [revoke] = {
        envelope["message_id"]: v2.CredentialOperation.model_validate(envelope["args"][0])
        for _, route, envelope in _examples(asyncapi)
        if route is routes.OPERATE and envelope["args"][0]["operation"] == "revoke"
    }.values()

    # Then they are the bytes a worker rebuilds, of the length stated
    assert stated.encode("utf-8") == revoke.signed_bytes()
    assert length is not None and int(length.group(1)) == len(revoke.signed_bytes())


def test_a_credentials_rotated_example_carries_the_new_secret_sealed(asyncapi: dict[str, Any]) -> None:
    events = [
        RequestEvent.model_validate(example["payload"])
        for channel in asyncapi["channels"].values()
        if _is_events(channel)
        for message in _messages(asyncapi, channel)
        if message["name"] == "portal.event"
        for example in message.get("examples", [])
    ]
    [rotated] = [event for event in events if event.event == "credentials.rotated"]
    assert rotated.credential is not None and rotated.sealed_secret is not None
    assert rotated.status == rotated.credential.status == "active"
    assert rotated.credential.revision == 2
    assert rotated.credential.previous_valid_until is not None and rotated.credential.previous_public_id
    # after the credentials.issued example of the same request, in its sequence
    [issued] = [event for event in events if event.event == "credentials.issued"]
    assert (rotated.request_id, rotated.sequence) == (issued.request_id, issued.sequence + 1)


def test_the_portal_events_message_names_every_event(asyncapi: dict[str, Any]) -> None:
    text = asyncapi["components"]["messages"]["portalEvent"]["description"]
    for name in get_args(EventName):
        event = name.split(".", 1)[1]
        assert f"`{name}`" in text or f"`.{event}`" in text, name


def test_example_requests_cover_an_existing_and_a_new_app(asyncapi: dict[str, Any]) -> None:
    # in the current contract, which portals copy
    requests = [
        v2.AccessRequestSubmitted.model_validate(envelope["args"][0])
        for _, route, envelope in _examples(asyncapi)
        if route is routes.SUBMIT and route.contract_for(envelope["args"][0]) is v2.AccessRequestSubmitted
    ]
    assert any(r.app_id is not None for r in requests)
    assert any(r.new_app is not None for r in requests)
    for _, route, envelope in _examples(asyncapi):
        if route is routes.SUBMIT:
            assert envelope["args"][0]["submitted_at"].endswith("Z")


def test_the_python_snippet_in_the_description_is_valid_python(asyncapi: dict[str, Any]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", asyncapi["info"]["description"], flags=re.DOTALL)
    assert len(blocks) == 1
    ast.parse(blocks[0])
    assert "delivery_mode=2" in blocks[0]
    assert 'content_type="application/json"' in blocks[0]
    # a v2 submission, published to the submissions exchange as the portal's own AMQP user
    assert '"version": 2' in blocks[0] and '"portal_id"' in blocks[0]
    assert f'exchange="{TOPOLOGY.submissions_exchange}"' in blocks[0]
    assert "user_id=" in blocks[0]


# --- the contracts themselves ----------------------------------------------------------------------

#: Leave the field out of the payload.
_DROP = object()


def _request(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "request_id": "6f1c2b9e-4d3a-4e8f-9b21-7a5c0d3e8f14",
        "consumer": {"id": "acme", "email": "dev@acme.example", "name": "Acme Developers"},
        "app_id": "acme-checkout",
        "product_ids": ["payments", "ledger"],
        "plan_id": "starter",
        "justification": "Card payments for the new checkout.",
        "submitted_at": "2026-11-26T10:00:00Z",
    }
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not _DROP}


def _decision(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "decision_id": "5e3b8a2c-6d14-4f70-9a1e-3c8b7d2f6a05",
        "request_id": "6f1c2b9e-4d3a-4e8f-9b21-7a5c0d3e8f14",
        "decision": "approve",
        "admin": {"id": "dana", "email": "dana@accessflow.example"},
        "reason": "Partner contract signed.",
        "decided_at": "2026-11-26T14:30:00+01:00",
    }
    payload.update(changes)
    return payload


def _v2_request(**changes: Any) -> dict[str, Any]:
    """A v2 submission: the v1 one plus its version and the registered portal that sends it."""
    return _request(**{"version": 2, "portal_id": "acme-portal", **changes})


def _v2_decision(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "version": 2,
        "type": "access_request.decided",
        "decision_id": "5e3b8a2c-6d14-4f70-9a1e-3c8b7d2f6a05",
        "request_id": "6f1c2b9e-4d3a-4e8f-9b21-7a5c0d3e8f14",
        "decision": "approve",
        "admin_id": "dana",
        "reason": "Partner contract signed.",
        "decided_at": "2026-11-26T13:30:00Z",
        "audience": "accessflow",
        # Not a signature of anything: the contract checks its form, the handler verifies it.
        "signature": {"key_id": "dana-2026-11", "algorithm": "ed25519", "value": "c2lnbmF0dXJl"},
    }
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not _DROP}


#: The current submission contract and the legacy one, each with a builder of a valid payload.
SUBMISSION_CONTRACTS = [
    pytest.param(v2.AccessRequestSubmitted, _v2_request, id="v2"),
    pytest.param(v1.AccessRequestSubmitted, _request, id="v1"),
]
RequestBuilder = Callable[..., dict[str, Any]]


def _failures(contract: type[BaseModel], payload: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as raised:
        contract.model_validate(payload)
    return [(".".join(str(p) for p in error["loc"]), error["msg"]) for error in raised.value.errors()]


@pytest.mark.parametrize(("contract", "build"), SUBMISSION_CONTRACTS)
def test_a_valid_request_passes(contract: type[v1.AccessRequestSubmitted], build: RequestBuilder) -> None:
    message = contract.model_validate(build())
    assert type(message) is contract
    assert message.type == "access_request.submitted"
    assert message.version == (2 if contract is v2.AccessRequestSubmitted else 1)
    assert message.submitted_at.utcoffset() is not None
    assert message.submitted_at.isoformat() == "2026-11-26T10:00:00+00:00"


def test_a_valid_v2_request_names_its_portal() -> None:
    message = v2.AccessRequestSubmitted.model_validate(_v2_request())
    assert message.portal_id == "acme-portal"
    command = message.to_command("portal-acme")
    assert (command.portal_id, command.sender) == ("acme-portal", "portal-acme")


def test_a_v1_request_names_no_portal() -> None:
    command = v1.AccessRequestSubmitted.model_validate(_request()).to_command("portal-acme")
    assert (command.portal_id, command.sender) == (None, "portal-acme")


def test_a_v2_request_without_its_portal_fails() -> None:
    failures = _failures(v2.AccessRequestSubmitted, _v2_request(portal_id=_DROP))
    assert [loc for loc, _ in failures] == ["portal_id"]


@pytest.mark.parametrize(("contract", "build"), SUBMISSION_CONTRACTS)
def test_a_valid_request_for_a_new_app_passes(
    contract: type[v1.AccessRequestSubmitted], build: RequestBuilder
) -> None:
    message = contract.model_validate(
        build(app_id=_DROP, new_app={"name": "Globex Identity Bridge", "description": "SSO."})
    )
    assert message.new_app is not None and message.app_id is None


@pytest.mark.parametrize(("contract", "build"), SUBMISSION_CONTRACTS)
def test_a_request_without_an_app_fails(contract: type[BaseModel], build: RequestBuilder) -> None:
    failures = _failures(contract, build(app_id=_DROP))
    assert any("exactly one of app_id and new_app" in msg for _, msg in failures)


@pytest.mark.parametrize(("contract", "build"), SUBMISSION_CONTRACTS)
def test_a_request_with_both_app_id_and_new_app_fails(
    contract: type[BaseModel], build: RequestBuilder
) -> None:
    failures = _failures(contract, build(new_app={"name": "Another App"}))
    assert any("exactly one of app_id and new_app" in msg for _, msg in failures)


@pytest.mark.parametrize(("contract", "build"), SUBMISSION_CONTRACTS)
def test_a_request_without_products_fails(contract: type[BaseModel], build: RequestBuilder) -> None:
    failures = _failures(contract, build(product_ids=[]))
    assert [loc for loc, _ in failures] == ["product_ids"]


@pytest.mark.parametrize(("contract", "build"), SUBMISSION_CONTRACTS)
@pytest.mark.parametrize(
    "name", ["Acme\nBcc: victim@example.com", "Acme\r\nX-Evil: 1", "Acme\u2028Developers"]
)
def test_a_line_break_in_the_consumer_name_fails(
    contract: type[BaseModel], build: RequestBuilder, name: str
) -> None:
    consumer = {"id": "acme", "email": "dev@acme.example", "name": name}
    failures = _failures(contract, build(consumer=consumer))
    assert [loc for loc, _ in failures] == ["consumer.name"]


@pytest.mark.parametrize(("contract", "build"), SUBMISSION_CONTRACTS)
@pytest.mark.parametrize("submitted_at", ["2026-11-26T10:00:00", datetime(2026, 11, 26, 10, 0)])
def test_a_naive_timestamp_fails(
    contract: type[BaseModel], build: RequestBuilder, submitted_at: object
) -> None:
    failures = _failures(contract, build(submitted_at=submitted_at))
    assert [loc for loc, _ in failures] == ["submitted_at"]
    assert "timezone offset" in failures[0][1]


@pytest.mark.parametrize(
    ("contract", "payload"),
    [
        pytest.param(v1.AccessRequestSubmitted, _request(version=2), id="v1-claiming-2"),
        pytest.param(v2.AccessRequestSubmitted, _v2_request(version=1), id="v2-claiming-1"),
        pytest.param(v2.AccessRequestSubmitted, _v2_request(version=3), id="v2-claiming-3"),
        pytest.param(v1.AdminDecision, _decision(version=2), id="v1-decision-claiming-2"),
        pytest.param(v2.AdminDecision, _v2_decision(version=1), id="v2-decision-claiming-1"),
    ],
)
def test_another_version_fails(contract: type[BaseModel], payload: dict[str, Any]) -> None:
    failures = _failures(contract, payload)
    assert [loc for loc, _ in failures] == ["version"]


@pytest.mark.parametrize(
    "payload",
    [
        _v2_request(priority="high"),
        _v2_request(consumer={"id": "acme", "email": "dev@acme.example", "name": "Acme", "role": "admin"}),
        _request(priority="high"),
        _request(consumer={"id": "acme", "email": "dev@acme.example", "name": "Acme", "role": "admin"}),
    ],
    ids=["top-level", "nested", "top-level-v1", "nested-v1"],
)
def test_an_extra_field_fails(payload: dict[str, Any]) -> None:
    contract = routes.SUBMIT.contract_for(payload)
    failures = _failures(contract, payload)
    assert len(failures) == 1 and failures[0][0] in {"priority", "consumer.role"}


def test_a_valid_v2_decision_passes_as_it_was_signed() -> None:
    payload = _v2_decision()
    decision = v2.AdminDecision.model_validate(payload)
    assert decision.decided_at == "2026-11-26T13:30:00Z"  # a string, exactly as signed
    assert decision.signed_bytes() == canonical_bytes(payload)
    command = decision.to_command()
    assert command.approve is True
    assert command.decided_at.isoformat() == "2026-11-26T13:30:00+00:00"
    assert command.signature is not None
    assert command.signature.signed_bytes == canonical_bytes(payload)
    assert (command.signature.key_id, command.signature.audience) == ("dana-2026-11", "accessflow")


def test_a_valid_v1_decision_passes_unsigned() -> None:
    decision = v1.AdminDecision.model_validate(_decision())
    assert decision.decided_at.isoformat() == "2026-11-26T13:30:00+00:00"
    command = decision.to_command()
    assert command.approve is True
    assert command.signature is None  # recorded and refused by the handler


@pytest.mark.parametrize(
    ("contract", "payload"),
    [
        pytest.param(v2.AdminDecision, _v2_decision(reason=""), id="v2"),
        pytest.param(v1.AdminDecision, _decision(reason=""), id="v1"),
    ],
)
def test_a_decision_with_an_empty_reason_fails(contract: type[BaseModel], payload: dict[str, Any]) -> None:
    failures = _failures(contract, payload)
    assert [loc for loc, _ in failures] == ["reason"]


@pytest.mark.parametrize(
    ("changes", "location"),
    [
        ({"version": _DROP}, "version"),
        ({"type": _DROP}, "type"),
        ({"decided_at": "2026-11-26T14:30:00+01:00"}, "decided_at"),
        ({"decided_at": "2026-02-30T10:00:00Z"}, "decided_at"),
        ({"decision_id": "5E3B8A2C-6D14-4F70-9A1E-3C8B7D2F6A05"}, "decision_id"),
        ({"request_id": "6f1c2b9e4d3a4e8f9b217a5c0d3e8f14"}, "request_id"),
        ({"audience": _DROP}, "audience"),
        ({"signature": _DROP}, "signature"),
        (
            {"signature": {"key_id": "dana-2026-11", "algorithm": "rsa", "value": "c2ln"}},
            "signature.algorithm",
        ),
        ({"admin": {"id": "dana", "email": "dana@accessflow.example"}}, "admin"),
    ],
    ids=[
        "no-version",
        "no-type",
        "offset-not-z",
        "no-such-day",
        "upper-case-uuid",
        "uuid-without-dashes",
        "no-audience",
        "unsigned",
        "not-ed25519",
        "v1-admin",
    ],
)
def test_a_v2_decision_not_in_the_signed_form_fails(changes: dict[str, Any], location: str) -> None:
    # Signed fields are kept as sent, so they must be sent in the one form the signature covers
    failures = _failures(v2.AdminDecision, _v2_decision(**changes))
    assert [loc for loc, _ in failures] == [location]


# --- header injection through names (issue 6, point 6) --------------------------------------------

#: A name that would add ``Bcc: evil@x`` to an email, literally or as an RFC 2047 encoded word.
HEADER_INJECTIONS = {
    "crlf": "\r\nBcc: evil@x",
    "q-encoded-word": "=?utf-8?q?x=0D=0ABcc:_evil@x?=",
    "b-encoded-word": "=?UTF-8?B?eA0KQmNjOiBldmlsQHg=?=",  # base64 of "x\r\nBcc: evil@x"
    "encoded-word-inside": "Shop =?utf-8?q?x=0D=0ABcc:_evil@x?= Pro",
}


@pytest.mark.parametrize("name", HEADER_INJECTIONS.values(), ids=HEADER_INJECTIONS.keys())
def test_a_header_injection_in_the_consumer_name_fails(name: str) -> None:
    consumer = {"id": "acme", "email": "dev@acme.example", "name": name}
    failures = _failures(v1.AccessRequestSubmitted, _request(consumer=consumer))
    assert [loc for loc, _ in failures] == ["consumer.name"]
    assert re.search(r"line breaks|encoded word", failures[0][1])


@pytest.mark.parametrize("name", HEADER_INJECTIONS.values(), ids=HEADER_INJECTIONS.keys())
def test_a_header_injection_in_a_new_app_name_fails(name: str) -> None:
    failures = _failures(v1.AccessRequestSubmitted, _request(app_id=_DROP, new_app={"name": name}))
    assert [loc for loc, _ in failures] == ["new_app.name"]
    assert re.search(r"line breaks|encoded word", failures[0][1])


def test_an_encoded_word_in_a_name_is_refused_with_the_reason() -> None:
    consumer = {"id": "acme", "email": "dev@acme.example", "name": HEADER_INJECTIONS["q-encoded-word"]}
    [(_, message)] = _failures(v1.AccessRequestSubmitted, _request(consumer=consumer))
    assert "must not contain '=?'" in message and "RFC 2047 encoded word" in message


def test_an_encoded_word_in_an_email_address_fails() -> None:
    consumer = {"id": "acme", "email": "=?utf-8?q?x?=@acme.example", "name": "Acme"}
    failures = _failures(v1.AccessRequestSubmitted, _request(consumer=consumer))
    assert [loc for loc, _ in failures] == ["consumer.email"]
    assert "encoded word" in failures[0][1]


def test_markup_in_a_name_passes_because_the_html_part_escapes_it() -> None:
    consumer = {"id": "acme", "email": "dev@acme.example", "name": "<script>alert(1)</script>"}
    message = v1.AccessRequestSubmitted.model_validate(_request(consumer=consumer))
    assert message.consumer.name == "<script>alert(1)</script>"


# --- credential operations -------------------------------------------------------------------------


def _operation(**changes: Any) -> dict[str, Any]:
    """A valid revoke of one credential, changed as asked; ``_DROP`` leaves a member out."""
    payload: dict[str, Any] = {
        "version": 2,
        "type": "credentials.operate",
        "operation_id": "f3a92c15-7d4e-4b08-9e61-2a5c8d0b7e34",
        "operation": "revoke",
        "target": "credential",
        "target_id": "7e2b9c41-5d3a-5f86-a0c4-1b8e6d2f9a57",
        "admin_id": "dana",
        "reason": "The keys leaked.",
        "issued_at": "2026-11-27T12:00:00Z",
        "audience": "accessflow",
        # Not a signature of anything: the contract checks its form, the handler verifies it.
        "signature": {"key_id": "dana-2026-11", "algorithm": "ed25519", "value": "c2lnbmF0dXJl"},
    }
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not _DROP}


VALID_OPERATIONS = {
    "rotate": _operation(operation="rotate", grace_seconds=86400),
    "rotate-without-grace": _operation(operation="rotate"),
    "rotate-with-the-longest-grace": _operation(operation="rotate", grace_seconds=v2.MAX_GRACE_SECONDS),
    "revoke-credential": _operation(),
    "revoke-app": _operation(target="app", target_id="acme-checkout"),
    "revoke-consumer": _operation(target="consumer", target_id="acme"),
    "suspend-app": _operation(operation="suspend", target="app", target_id="acme-checkout"),
    "resume-consumer": _operation(operation="resume", target="consumer", target_id="acme"),
    "set-expiry": _operation(operation="set_expiry", expires_at="2027-01-31T00:00:00Z"),
    "set-no-expiry": _operation(operation="set_expiry"),
    "change-plan": _operation(operation="change_plan", plan_id="partner"),
}


@pytest.mark.parametrize("payload", VALID_OPERATIONS.values(), ids=VALID_OPERATIONS.keys())
def test_a_valid_credential_operation_passes_as_it_was_signed(payload: dict[str, Any]) -> None:
    operation = v2.CredentialOperation.model_validate(payload)
    # decoded off the decisions queue by the operate route, not the decide one
    assert validation.decode(routes.OPERATE, (payload,), {}) == operation
    # nothing is normalised, and only what was sent is signed
    assert operation.signed_bytes() == canonical_bytes(payload)
    assert operation.model_dump(mode="json", exclude_none=True) == payload


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"operation": "rotate", "target": "app"}, "rotate names one credential"),
        ({"operation": "rotate", "target": "consumer"}, "rotate names one credential"),
        ({"operation": "set_expiry", "target": "app"}, "set_expiry names one credential"),
        ({"operation": "change_plan", "target": "consumer", "plan_id": "x"}, "change_plan names one"),
        ({"operation": "change_plan"}, "plan_id is given with change_plan, and only with it"),
        ({"plan_id": "partner"}, "plan_id is given with change_plan, and only with it"),
        ({"operation": "rotate", "plan_id": "partner"}, "plan_id is given with change_plan"),
        ({"grace_seconds": 3600}, "grace_seconds is given with rotate only"),
        ({"operation": "suspend", "grace_seconds": 0}, "grace_seconds is given with rotate only"),
        ({"operation": "set_expiry", "grace_seconds": 60}, "grace_seconds is given with rotate only"),
        ({"expires_at": "2027-01-31T00:00:00Z"}, "expires_at is given with set_expiry only"),
        (
            {"operation": "rotate", "expires_at": "2027-01-31T00:00:00Z"},
            "expires_at is given with set_expiry only",
        ),
    ],
    ids=[
        "rotate-an-app",
        "rotate-a-consumer",
        "set-expiry-of-an-app",
        "change-plan-of-a-consumer",
        "change-plan-without-plan",
        "plan-on-revoke",
        "plan-on-rotate",
        "grace-on-revoke",
        "grace-on-suspend",
        "grace-on-set-expiry",
        "expiry-on-revoke",
        "expiry-on-rotate",
    ],
)
def test_a_credential_operation_with_members_its_operation_does_not_take_fails(
    changes: dict[str, Any], complaint: str
) -> None:
    failures = _failures(v2.CredentialOperation, _operation(**changes))
    assert [loc for loc, _ in failures] == [""]  # a rule across members, named in its message
    assert complaint in failures[0][1]


@pytest.mark.parametrize(
    ("changes", "location"),
    [
        ({"operation": "rotate", "grace_seconds": v2.MAX_GRACE_SECONDS + 1}, "grace_seconds"),
        ({"operation": "rotate", "grace_seconds": -1}, "grace_seconds"),
        # signed as sent: anything but a JSON integer would be signed as something else
        ({"operation": "rotate", "grace_seconds": "86400"}, "grace_seconds"),
        ({"operation": "rotate", "grace_seconds": 86400.0}, "grace_seconds"),
        ({"operation": "rotate", "grace_seconds": True}, "grace_seconds"),
        ({"operation": "set_expiry", "expires_at": "2027-01-31T01:00:00+01:00"}, "expires_at"),
        ({"operation": "set_expiry", "expires_at": "2027-02-30T00:00:00Z"}, "expires_at"),
        ({"issued_at": "2026-11-27T13:00:00+01:00"}, "issued_at"),
        ({"operation_id": "F3A92C15-7D4E-4B08-9E61-2A5C8D0B7E34"}, "operation_id"),
        ({"operation": "delete"}, "operation"),
        ({"target": "portal"}, "target"),
        ({"reason": ""}, "reason"),
        ({"audience": _DROP}, "audience"),
        ({"signature": _DROP}, "signature"),
        ({"version": 1}, "version"),
        ({"version": _DROP}, "version"),
        ({"type": "access_request.decided"}, "type"),
        ({"request_id": "6f1c2b9e-4d3a-4e8f-9b21-7a5c0d3e8f14"}, "request_id"),
    ],
    ids=[
        "grace-beyond-30-days",
        "negative-grace",
        "grace-as-a-string",
        "grace-as-a-float",
        "grace-as-a-boolean",
        "expiry-not-z",
        "expiry-no-such-day",
        "issued-at-not-z",
        "upper-case-uuid",
        "unknown-operation",
        "unknown-target",
        "empty-reason",
        "no-audience",
        "unsigned",
        "v1",
        "no-version",
        "a-decision",
        "unknown-member",
    ],
)
def test_a_credential_operation_not_in_the_signed_form_fails(changes: dict[str, Any], location: str) -> None:
    failures = _failures(v2.CredentialOperation, _operation(**changes))
    assert [loc for loc, _ in failures] == [location]


def test_the_signed_bytes_of_an_operation_leave_out_what_is_absent_and_the_signature() -> None:
    # Given a rotation, and the same rotation with the members it does not take sent as null
    payload = _operation(operation="rotate", grace_seconds=3600)
    with_nulls = {**payload, "plan_id": None, "expires_at": None}

    # When each is read
    operation = v2.CredentialOperation.model_validate(payload)
    nulled = v2.CredentialOperation.model_validate(with_nulls)

    # Then both sign the members sent, but the signature and the nulls: null reads as left out
    signed = json.loads(operation.signed_bytes())
    assert set(signed) == set(payload) - {"signature"}
    assert signed["grace_seconds"] == 3600
    assert nulled.signed_bytes() == operation.signed_bytes() == canonical_bytes(payload)
    # ... and no member left out is signed as null, which canonical_bytes could not even write
    revoke = v2.CredentialOperation.model_validate(_operation())
    assert not {"grace_seconds", "plan_id", "expires_at", "signature"} & set(
        json.loads(revoke.signed_bytes())
    )
    assert b"null" not in revoke.signed_bytes()


def test_a_change_to_any_signed_member_changes_the_signed_bytes() -> None:
    payload = _operation(operation="rotate", grace_seconds=3600)
    signed = v2.CredentialOperation.model_validate(payload).signed_bytes()
    for changes in (
        {"grace_seconds": 3601},
        {"grace_seconds": _DROP},
        {"target_id": "another"},
        {"audience": "staging"},
        {"issued_at": "2026-11-27T12:00:01Z"},
    ):
        other = v2.CredentialOperation.model_validate(_operation(**{**payload, **changes}))
        assert other.signed_bytes() != signed, changes
    # the signature is not signed: another one leaves the bytes as they were
    resigned = {**payload, "signature": {"key_id": "dana-2027-01", "algorithm": "ed25519", "value": "eA=="}}
    assert v2.CredentialOperation.model_validate(resigned).signed_bytes() == signed


def test_to_command_of_a_rotation() -> None:
    operation = v2.CredentialOperation.model_validate(_operation(operation="rotate", grace_seconds=86400))
    command = operation.to_command("accessflow-admin")
    assert command.operation_id == "f3a92c15-7d4e-4b08-9e61-2a5c8d0b7e34"
    assert command.operation is CredentialOperationKind.ROTATE
    assert command.target is OperationTarget.CREDENTIAL
    assert command.target_id == "7e2b9c41-5d3a-5f86-a0c4-1b8e6d2f9a57"
    assert (command.admin_id, command.reason) == ("dana", "The keys leaked.")
    assert command.issued_at == datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert command.grace == timedelta(days=1)
    assert (command.plan_id, command.expires_at) == (None, None)
    assert command.sender == "accessflow-admin"
    assert command.signature is not None
    assert command.signature.signed_bytes == operation.signed_bytes()
    assert (command.signature.key_id, command.signature.value, command.signature.audience) == (
        "dana-2026-11",
        "c2lnbmF0dXJl",
        "accessflow",
    )


def test_to_command_of_the_other_operations() -> None:
    revoke = v2.CredentialOperation.model_validate(_operation(target="app", target_id="acme-checkout"))
    command = revoke.to_command()
    assert (command.operation, command.target, command.target_id) == (
        CredentialOperationKind.REVOKE,
        OperationTarget.APP,
        "acme-checkout",
    )
    assert command.grace == timedelta(0) and command.sender is None

    expiry = v2.CredentialOperation.model_validate(
        _operation(operation="set_expiry", expires_at="2027-01-31T00:00:00.5Z")
    ).to_command()
    assert expiry.operation is CredentialOperationKind.SET_EXPIRY
    assert expiry.expires_at == datetime(2027, 1, 31, 0, 0, 0, 500000, tzinfo=UTC)
    never = v2.CredentialOperation.model_validate(_operation(operation="set_expiry")).to_command()
    assert never.expires_at is None

    plan = v2.CredentialOperation.model_validate(
        _operation(operation="change_plan", plan_id="partner")
    ).to_command()
    assert (plan.operation, plan.plan_id) == (CredentialOperationKind.CHANGE_PLAN, "partner")
    assert {kind.value for kind in CredentialOperationKind} == {
        "rotate",
        "revoke",
        "suspend",
        "resume",
        "set_expiry",
        "change_plan",
    }


# --- bulk decisions --------------------------------------------------------------------------------


def _bulk(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "version": 2,
        "type": "access_request.bulk_decided",
        "bulk_id": "5c0e7a93-2b4f-4d18-9a6e-3f1b8c2d7e40",
        "decision": "approve",
        "admin_id": "dana",
        "reason": "backlog",
        "decided_at": "2026-11-27T12:30:00Z",
        "audience": "accessflow",
        "request_ids": "1b4e28ba-2fa1-41d2-883f-0016d3cca427,6fa459ea-ee8a-4ca4-894e-db77e160355e",
        "signature": {"key_id": "dana-2026-11", "algorithm": "ed25519", "value": "c2ln"},
    }
    payload.update(changes)
    return {name: value for name, value in payload.items() if value is not None}


class TestABulkDecisionContract:
    def test_names_ids_or_a_filter_but_not_both_nor_neither(self) -> None:
        assert _failures(v2.BulkDecision, _bulk(plan_id="gold")) == [
            ("", "Value error, a bulk decision names request_ids or a filter, not both")
        ]
        assert _failures(v2.BulkDecision, _bulk(request_ids=None))
        assert (
            v2.BulkDecision.model_validate(_bulk(request_ids=None, consumer_id="acme")).consumer_id == "acme"
        )

    @pytest.mark.parametrize(
        "request_ids",
        [
            "1B4E28BA-2FA1-41D2-883F-0016D3CCA427",
            "1b4e28ba-2fa1-41d2-883f-0016d3cca427, 6fa459ea-ee8a-4ca4-894e-db77e160355e",
            "1b4e28ba-2fa1-41d2-883f-0016d3cca427,",
            "",
            ",".join([str(uuid.UUID(int=n)) for n in range(201)]),
        ],
        ids=["upper-case", "space", "trailing-comma", "empty", "201-ids"],
    )
    def test_request_ids_are_canonical_uuids_joined_by_commas_at_most_200(self, request_ids: str) -> None:
        assert _failures(v2.BulkDecision, _bulk(request_ids=request_ids))

    def test_two_hundred_ids_are_taken(self) -> None:
        ids = ",".join(str(uuid.UUID(int=n)) for n in range(200))
        command = v2.BulkDecision.model_validate(_bulk(request_ids=ids)).to_command()
        assert len(command.request_ids) == 200

    def test_signed_bytes_are_the_members_sent_but_the_signature(self) -> None:
        payload = _bulk(request_ids=None, plan_id="gold", submitted_before="2026-11-20T00:00:00Z")
        bulk = v2.BulkDecision.model_validate(payload)
        assert bulk.signed_bytes() == canonical_bytes({k: v for k, v in payload.items() if k != "signature"})
        assert b"request_ids" not in bulk.signed_bytes() and b"consumer_id" not in bulk.signed_bytes()

    def test_to_command_splits_the_ids_and_reads_the_times(self) -> None:
        command = v2.BulkDecision.model_validate(_bulk()).to_command("admin-tool")
        assert command.request_ids == (
            "1b4e28ba-2fa1-41d2-883f-0016d3cca427",
            "6fa459ea-ee8a-4ca4-894e-db77e160355e",
        )
        assert command.approve and command.sender == "admin-tool"
        assert command.signature is not None and command.signature.audience == "accessflow"
        filtered = v2.BulkDecision.model_validate(
            _bulk(request_ids=None, submitted_before="2026-11-20T00:00:00Z", decision="reject")
        ).to_command()
        assert filtered.request_ids == () and not filtered.approve
        assert filtered.submitted_before == datetime(2026, 11, 20, tzinfo=UTC)


def test_a_bulk_decisions_results_go_to_the_admins_under_a_stable_id() -> None:
    settled = BulkDecisionSettled(
        bulk_id="5b2e9c41-7d3a-4f86-b1e0-9c4d2a7f3e15",
        admin_id="alice",
        approve=False,
        selection="plan_id=gold",
        outcome="applied",
        outcome_reason="",
        results=(("r1", "applied"), ("r2", "already_decided")),
        occurred_at=datetime(2026, 11, 27, 10, 5, tzinfo=UTC),
    )
    event = AdminEvent.of(settled)
    assert event.routing_key() == "admins.access_request.bulk_decided"
    assert event.event_id == AdminEvent.of(settled).event_id  # the same on every delivery
    assert event.decision == "reject"
    assert [(item.request_id, item.result) for item in event.results] == list(settled.results)
