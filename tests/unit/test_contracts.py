"""The wire contracts, their generated JSON Schemas and the AsyncAPI document that publishes them."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import yaml
from pydantic import BaseModel, ValidationError

import messages
from messages import export, routes, v1
from workers import registry

MESSAGES_DIR = Path(messages.__file__).resolve().parent
ASYNCAPI = MESSAGES_DIR / "asyncapi.yaml"
PREFIX = "accessflow"
ENVELOPE_FIELDS = frozenset(field.name for field in dataclasses.fields(dramatiq.Message))


# --- generated schemas -----------------------------------------------------------------------------


def test_schema_files_on_disk_are_up_to_date() -> None:
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in export.SCHEMA_DIR.glob("*.json")}
    assert on_disk == export.render_schemas(), "messages/schemas is out of date: run `make schemas`"


def test_one_schema_file_per_contract_plus_the_envelope() -> None:
    assert sorted(export.render_schemas()) == sorted(
        [
            "access_request.submitted.v1.json",
            "access_request.decided.v1.json",
            "credentials.issue.v1.json",
            "notification.send.v1.json",
            "envelope.json",
        ]
    )


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


def _route_of(channel: dict[str, Any]) -> routes.Route:
    matching = [route for route in routes.ROUTES if route.queue_name(PREFIX) == channel["address"]]
    assert len(matching) == 1, f"no route for channel address {channel['address']}"
    return matching[0]


def _examples(document: dict[str, Any]) -> Iterator[tuple[str, routes.Route, dict[str, Any]]]:
    """Every example of every message, with the route of the channel that carries it."""
    for channel in document["channels"].values():
        route = _route_of(channel)
        for message_ref in channel["messages"].values():
            message = _resolve(document, message_ref["$ref"])
            for example in message.get("examples", []):
                yield example["name"], route, example["payload"]


def test_asyncapi_version_and_info(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["info"]["title"] == "accessflow"
    assert asyncapi["info"]["version"] == "1.0.0"
    assert {server["host"] for server in asyncapi["servers"].values()} >= {"127.0.0.1:5672"}
    assert {server["protocol"] for server in asyncapi["servers"].values()} == {"amqp"}


def test_one_channel_per_route(asyncapi: dict[str, Any]) -> None:
    channels = asyncapi["channels"]
    assert len(channels) == len(routes.ROUTES)
    assert sorted(channel["address"] for channel in channels.values()) == sorted(
        route.queue_name(PREFIX) for route in routes.ROUTES
    )


def test_channel_bindings_describe_accessflows_queues(asyncapi: dict[str, Any]) -> None:
    for channel in asyncapi["channels"].values():
        binding = channel["bindings"]["amqp"]
        assert binding["is"] == "queue"
        assert binding["queue"]["name"] == channel["address"]
        assert binding["queue"]["durable"] is True
        assert binding["x-queue-arguments"] == {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{channel['address']}.XQ",
        }


def test_portals_send_and_accessflow_receives_the_internal_messages(asyncapi: dict[str, Any]) -> None:
    actions: dict[str, str] = {}
    for operation in asyncapi["operations"].values():
        channel = _resolve(asyncapi, operation["channel"]["$ref"])
        actions[_route_of(channel).actor_name] = operation["action"]
        for message_ref in operation["messages"]:
            assert message_ref["$ref"].startswith(operation["channel"]["$ref"] + "/messages/")
    assert actions == {
        routes.SUBMIT.actor_name: "send",
        routes.DECIDE.actor_name: "send",
        routes.ISSUE.actor_name: "receive",
        routes.NOTIFY.actor_name: "receive",
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
    assert files == {f"schemas/{name}" for name in export.render_schemas()}, "every schema is referenced"


def test_each_payload_refers_to_the_envelope_and_its_contract(asyncapi: dict[str, Any]) -> None:
    for channel in asyncapi["channels"].values():
        route = _route_of(channel)
        for message_ref in channel["messages"].values():
            message = _resolve(asyncapi, message_ref["$ref"])
            envelope, specific = message["payload"]["allOf"]
            assert envelope == {"$ref": "schemas/envelope.json"}
            assert specific["properties"]["actor_name"] == {"const": route.actor_name}
            assert specific["properties"]["args"]["items"] == {
                "$ref": f"schemas/{export.contract_filename(route.contract)}"
            }


def test_every_external_message_has_an_example(asyncapi: dict[str, Any]) -> None:
    exemplified = {route.actor_name for _, route, _ in _examples(asyncapi)}
    assert exemplified == {routes.SUBMIT.actor_name, routes.DECIDE.actor_name}


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
        contract = registry.decode(route, decoded.args, decoded.kwargs)
        assert isinstance(contract, route.contract), name


def test_example_requests_cover_an_existing_and_a_new_app(asyncapi: dict[str, Any]) -> None:
    requests = [
        v1.AccessRequestSubmitted.model_validate(envelope["args"][0])
        for _, route, envelope in _examples(asyncapi)
        if route is routes.SUBMIT
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


def _failures(contract: type[BaseModel], payload: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as raised:
        contract.model_validate(payload)
    return [(".".join(str(p) for p in error["loc"]), error["msg"]) for error in raised.value.errors()]


def test_a_valid_request_passes() -> None:
    message = v1.AccessRequestSubmitted.model_validate(_request())
    assert message.type == "access_request.submitted"
    assert message.version == 1
    assert message.submitted_at.utcoffset() is not None
    assert message.submitted_at.isoformat() == "2026-11-26T10:00:00+00:00"


def test_a_valid_request_for_a_new_app_passes() -> None:
    message = v1.AccessRequestSubmitted.model_validate(
        _request(app_id=_DROP, new_app={"name": "Globex Identity Bridge", "description": "SSO."})
    )
    assert message.new_app is not None and message.app_id is None


def test_a_request_without_an_app_fails() -> None:
    failures = _failures(v1.AccessRequestSubmitted, _request(app_id=_DROP))
    assert any("exactly one of app_id and new_app" in msg for _, msg in failures)


def test_a_request_with_both_app_id_and_new_app_fails() -> None:
    failures = _failures(v1.AccessRequestSubmitted, _request(new_app={"name": "Another App"}))
    assert any("exactly one of app_id and new_app" in msg for _, msg in failures)


def test_a_request_without_products_fails() -> None:
    failures = _failures(v1.AccessRequestSubmitted, _request(product_ids=[]))
    assert [loc for loc, _ in failures] == ["product_ids"]


@pytest.mark.parametrize(
    "name", ["Acme\nBcc: victim@example.com", "Acme\r\nX-Evil: 1", "Acme\u2028Developers"]
)
def test_a_line_break_in_the_consumer_name_fails(name: str) -> None:
    consumer = {"id": "acme", "email": "dev@acme.example", "name": name}
    failures = _failures(v1.AccessRequestSubmitted, _request(consumer=consumer))
    assert [loc for loc, _ in failures] == ["consumer.name"]


@pytest.mark.parametrize("submitted_at", ["2026-11-26T10:00:00", datetime(2026, 11, 26, 10, 0)])
def test_a_naive_timestamp_fails(submitted_at: object) -> None:
    failures = _failures(v1.AccessRequestSubmitted, _request(submitted_at=submitted_at))
    assert [loc for loc, _ in failures] == ["submitted_at"]
    assert "timezone offset" in failures[0][1]


def test_version_2_fails() -> None:
    failures = _failures(v1.AccessRequestSubmitted, _request(version=2))
    assert [loc for loc, _ in failures] == ["version"]


@pytest.mark.parametrize(
    "payload",
    [
        _request(priority="high"),
        _request(consumer={"id": "acme", "email": "dev@acme.example", "name": "Acme", "role": "admin"}),
    ],
    ids=["top-level", "nested"],
)
def test_an_extra_field_fails(payload: dict[str, Any]) -> None:
    failures = _failures(v1.AccessRequestSubmitted, payload)
    assert len(failures) == 1 and failures[0][0] in {"priority", "consumer.role"}


def test_a_valid_decision_passes() -> None:
    decision = v1.AdminDecision.model_validate(_decision())
    assert decision.decided_at.isoformat() == "2026-11-26T13:30:00+00:00"
    assert decision.to_command().approve is True


def test_a_decision_with_an_empty_reason_fails() -> None:
    failures = _failures(v1.AdminDecision, _decision(reason=""))
    assert [loc for loc, _ in failures] == ["reason"]


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
