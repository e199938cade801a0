"""``infra.messaging.envelope.read_envelope``: what a delivered body may say, and who may say it.

Every case here is a body as it arrives from RabbitMQ, before dramatiq sees it. Refusals
must carry a precise reason that is safe to store and log; accepted messages keep only
the options accessflow itself writes, and only when accessflow's own user published them.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

import pytest

from infra.messaging import envelope as envelope_module
from infra.messaging.envelope import (
    EXCERPT_CHARS,
    MAX_DEPTH,
    MAX_ENVELOPE_BYTES,
    MAX_RETRIES_OPTION,
    Accepted,
    Refused,
    nesting_depth,
    read_envelope,
)

PREFIX = "af"
REQUESTS, DECISIONS = f"{PREFIX}.requests", f"{PREFIX}.decisions"
CREDENTIALS, NOTIFICATIONS = f"{PREFIX}.credentials", f"{PREFIX}.notifications"
ACTORS = {
    "access_request.route": REQUESTS,
    "access_request.decide": DECISIONS,
    "credentials.issue": CREDENTIALS,
    "notifications.send": NOTIFICATIONS,
}
WORKERS = "accessflow-workers"
PORTAL = "portal-acme"
NOW_MS = 1_800_000_000_000
MAX_DELAY_MS = 65_000

#: What must never reach a log line or a database column unescaped.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: Every option dramatiq or its middleware would act on, and one nobody knows.
FOREIGN_OPTIONS: dict[str, Any] = {
    "eta": NOW_MS + 10**9,
    "max_retries": 10**6,
    "min_backoff": 1,
    "max_backoff": 10**12,
    "retry_when": "anything",
    "throws": "Exception",
    "time_limit": 10**9,
    "pipe_target": {"queue_name": CREDENTIALS, "actor_name": "credentials.issue"},
    "pipe_ignore": True,
    "on_success": "credentials.issue",
    "on_failure": "credentials.issue",
    "on_retry_exhausted": "credentials.issue",
    "callbacks": ["credentials.issue"],
    "broker_priority": 255,
    "traceback": "Traceback (most recent call last): secret=hunter2",
    "requeue_timestamp": NOW_MS,
    "whatever_else": {"x": 1},
}


def fields(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "queue_name": REQUESTS,
        "actor_name": "access_request.route",
        "args": [{"request_id": str(uuid.uuid4())}],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": NOW_MS,
    }
    document.update(overrides)
    return document


def body_of(**overrides: Any) -> bytes:
    return json.dumps(fields(**overrides)).encode()


def read(body: bytes, **overrides: Any) -> Accepted | Refused:
    arguments: dict[str, Any] = {
        "delivered_on": REQUESTS,
        "actors": ACTORS,
        "user_id": None,
        "internal_senders": frozenset({WORKERS}),
        "external_queues": frozenset({REQUESTS, DECISIONS}),
        "now_ms": NOW_MS,
        "max_delay_ms": MAX_DELAY_MS,
    }
    arguments.update(overrides)
    return read_envelope(body, **arguments)


def accepted(body: bytes, **overrides: Any) -> Accepted:
    verdict = read(body, **overrides)
    assert isinstance(verdict, Accepted), verdict
    return verdict


def refused(body: bytes, **overrides: Any) -> Refused:
    verdict = read(body, **overrides)
    assert isinstance(verdict, Refused), verdict
    assert_safe(verdict)
    return verdict


def assert_safe(verdict: Refused) -> None:
    """Every text of a refusal can go to PostgreSQL and to a log line as it is."""
    for text in (verdict.reason, verdict.message_id, verdict.actor_name, verdict.body_excerpt):
        text.encode("utf-8")  # no lone surrogate
        assert "\x00" not in text
    assert not CONTROL.search(verdict.reason), verdict.reason
    assert len(verdict.body_excerpt) <= EXCERPT_CHARS
    assert verdict.kind in ("malformed", "forged")


class TestAWellFormedEnvelope:
    def test_from_a_portal_becomes_the_message_with_no_options(self) -> None:
        # Given a portal's envelope, published without user_id
        document = fields()
        verdict = accepted(json.dumps(document).encode())

        # Then dramatiq gets exactly its fields, on the queue it was delivered on
        message = verdict.message
        assert verdict.message_id == document["message_id"] == message.message_id
        assert message.queue_name == REQUESTS
        assert message.actor_name == "access_request.route"
        assert message.args == tuple(document["args"])
        assert message.kwargs == {}
        assert message.options == {}
        assert message.message_timestamp == NOW_MS

    def test_from_a_portal_that_set_user_id_carries_it_as_origin(self) -> None:
        verdict = accepted(body_of(), user_id=PORTAL)
        assert verdict.message.options == {"origin": PORTAL}

    def test_from_accessflow_may_go_to_an_internal_queue(self) -> None:
        body = body_of(queue_name=CREDENTIALS, actor_name="credentials.issue")
        verdict = accepted(body, delivered_on=CREDENTIALS, user_id=WORKERS)
        assert verdict.message.queue_name == CREDENTIALS

    def test_on_a_delay_queue_names_the_delay_queue(self) -> None:
        # dramatiq acks through consumers[message.queue_name]: the delay queue's consumer
        body = body_of(queue_name=f"{REQUESTS}.DQ")
        verdict = accepted(body, delivered_on=f"{REQUESTS}.DQ", user_id=WORKERS)
        assert verdict.message.queue_name == f"{REQUESTS}.DQ"

    @pytest.mark.parametrize(
        "message_id",
        [str(uuid.uuid4()), uuid.uuid4().hex, "a", "A" * 128, "sha256:abc", "outbox.row-1_2:3"],
    )
    def test_accepts_every_bounded_id(self, message_id: str) -> None:
        assert accepted(body_of(message_id=message_id)).message_id == message_id

    def test_accepts_paired_surrogate_escapes_which_are_one_character(self) -> None:
        body = body_of(args=[{"justification": "\U0001f600"}])  # json.dumps writes \ud83d\ude00
        assert b"\\ud83d\\ude00" in body
        assert accepted(body).message.args == ({"justification": "\U0001f600"},)


class TestUnreadableBodies:
    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"", "not JSON"),
            (b"\x00this is not json{", "not JSON"),
            (b'{"queue_name": ', "not JSON"),
            (b"\xff\xfe{}", "not UTF-8"),
            (b'{"a": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate encoded in UTF-8
            (b"[" * 100_000, "more than"),
            (b"[" * 40 + b"]" * 40, f"more than {MAX_DEPTH} deep"),
            (b'{"a": NaN}', "NaN is not a JSON number"),
            (b'{"a": Infinity}', "Infinity is not a JSON number"),
            (b'{"a": 1, "a": 2}', 'duplicate key "a"'),
            (b'{"a": ' + b"9" * 5000 + b"}", "not strict JSON"),
            (b'["\\ud800"]', "lone UTF-16 surrogate"),
            (b'{"\\udfff": 1}', "lone UTF-16 surrogate"),
            (b"[]", "not an array"),
            (b'"text"', "not a string"),
            (b"null", "not null"),
            (b"5", "not a number"),
        ],
    )
    def test_are_refused_with_the_reason(self, body: bytes, reason: str) -> None:
        verdict = refused(body)
        assert reason in verdict.reason
        assert verdict.kind == "malformed"

    def test_a_body_over_the_size_limit_is_refused_unread(self) -> None:
        body = body_of(args=[{"justification": "x" * MAX_ENVELOPE_BYTES}])
        verdict = refused(body)
        assert f"more than the {MAX_ENVELOPE_BYTES} allowed" in verdict.reason

    def test_deep_nesting_inside_a_valid_envelope_is_refused(self) -> None:
        nested: Any = "leaf"
        for _ in range(MAX_DEPTH + 5):
            nested = [nested]
        verdict = refused(body_of(args=[{"deep": nested}]))
        assert f"more than {MAX_DEPTH} deep" in verdict.reason

    def test_a_lone_surrogate_inside_the_contract_is_refused(self) -> None:
        verdict = refused(body_of(args=[{"justification": "a\ud800b"}]))
        assert "lone UTF-16 surrogate" in verdict.reason

    def test_recursion_in_the_parser_never_escapes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given the cheap depth scan switched off, so the parser itself meets 30,000 levels
        monkeypatch.setattr(envelope_module, "MAX_DEPTH", 10**9)
        verdict = refused(b"[" * 30_000 + b"]" * 30_000)
        assert "nests too deeply" in verdict.reason


class TestTheDepthScan:
    @pytest.mark.parametrize(
        ("body", "depth"),
        [
            (b"{}", 1),
            (b'{"a": [1, {"b": []}]}', 4),
            (b'{"a": "[[[[{{{{"}', 1),
            (b'{"a": "\\"[[[["}', 1),
            (b'{"a\\\\": ["]]]"]}', 2),
            (b"1", 0),
        ],
    )
    def test_counts_only_brackets_outside_strings(self, body: bytes, depth: int) -> None:
        assert nesting_depth(body) == depth


class TestEnvelopeFields:
    @pytest.mark.parametrize(
        ("overrides", "reason"),
        [
            ({"queue_name": 5}, "queue_name must be a string, not a number"),
            ({"queue_name": None}, "queue_name must be a string, not null"),
            ({"queue_name": ""}, 'queue_name "" is not the queue it was delivered on (af.requests)'),
            ({"queue_name": f"{REQUESTS}.XQ"}, 'queue_name "af.requests.XQ" is not the queue'),
            ({"queue_name": f"{REQUESTS}.DQ"}, 'queue_name "af.requests.DQ" is not the queue'),
            ({"queue_name": DECISIONS}, 'queue_name "af.decisions" is not the queue'),
            ({"queue_name": "af.requests\n"}, 'queue_name "af.requests\\n" is not the queue'),
            ({"actor_name": ["access_request.route"]}, "actor_name must be a string, not an array"),
            ({"actor_name": 1}, "actor_name must be a string, not a number"),
            ({"actor_name": "no.such.actor"}, 'no actor is named "no.such.actor"'),
            ({"actor_name": "route\x00"}, 'no actor is named "route\\u0000"'),
            (
                {"actor_name": "access_request.decide"},
                'actor "access_request.decide" consumes af.decisions, not af.requests',
            ),
            ({"actor_name": "credentials.issue"}, "consumes af.credentials, not af.requests"),
            ({"message_id": 5}, "message_id must be 1 to 128 characters"),
            ({"message_id": ""}, "message_id must be"),
            ({"message_id": "-leading-dash"}, "message_id must be"),
            ({"message_id": "A" * 129}, "message_id must be"),
            ({"message_id": "has space"}, "message_id must be"),
            ({"message_id": "nul\x00"}, "message_id must be"),
            ({"message_id": "caf\u00e9"}, "message_id must be"),
            ({"args": {"request_id": "x"}}, "args must be an array, not an object"),
            ({"args": "x"}, "args must be an array, not a string"),
            ({"kwargs": []}, "kwargs must be an object, not an array"),
            ({"options": []}, "options must be an object, not an array"),
            ({"options": None}, "options must be an object, not null"),
            ({"message_timestamp": "1"}, "message_timestamp must be an integer (milliseconds), not a string"),
            ({"message_timestamp": 1.5}, "message_timestamp must be an integer (milliseconds), not a number"),
            (
                {"message_timestamp": True},
                "message_timestamp must be an integer (milliseconds), not a boolean",
            ),
            ({"message_timestamp": -1}, "message_timestamp is out of range"),
            ({"message_timestamp": 2**64}, "message_timestamp is out of range"),
        ],
    )
    def test_each_wrong_field_is_refused_with_a_precise_reason(
        self, overrides: dict[str, Any], reason: str
    ) -> None:
        verdict = refused(body_of(**overrides))
        assert reason in verdict.reason
        assert verdict.kind == "malformed"

    def test_a_missing_field_is_named(self) -> None:
        document = fields()
        del document["kwargs"], document["options"]
        verdict = refused(json.dumps(document).encode())
        assert "missing kwargs, options" in verdict.reason

    def test_an_unknown_field_is_named_escaped(self) -> None:
        verdict = refused(body_of(**{"extra\u2028": 1}))
        assert 'unknown "extra\\u2028"' in verdict.reason

    def test_echoed_input_is_escaped_and_short(self) -> None:
        verdict = refused(body_of(actor_name="\u202e" + "x" * 500 + "\n"))
        assert verdict.reason.isascii() and len(verdict.reason) < 200
        assert "\\u202e" in verdict.reason


class TestRefusalIdentity:
    def test_names_the_envelope_id_when_the_envelope_has_one(self) -> None:
        verdict = refused(body_of(message_id="m-1", actor_name="nobody"), amqp_message_id="amqp-1")
        assert verdict.message_id == "m-1"
        assert verdict.actor_name == "nobody"

    def test_falls_back_to_the_amqp_message_id(self) -> None:
        verdict = refused(b"not json", amqp_message_id="amqp-1")
        assert verdict.message_id == "amqp-1"

    @pytest.mark.parametrize("amqp_message_id", [None, "", "bad id", "x" * 129])
    def test_falls_back_to_the_body_digest(self, amqp_message_id: str | None) -> None:
        body = b"not json"
        first = refused(body, amqp_message_id=amqp_message_id)
        again = refused(body, amqp_message_id=amqp_message_id)
        assert first.message_id == again.message_id == "sha256:" + hashlib.sha256(body).hexdigest()
        assert first.actor_name == ""

    def test_keeps_a_storable_excerpt_of_any_body(self) -> None:
        body = b"\x00\xff" + '"\ud800"'.encode("utf-8", "surrogatepass") + b"x" * 10_000
        verdict = refused(body)
        assert verdict.body_excerpt.startswith("\\x00\\xff")
        assert len(verdict.body_excerpt) == EXCERPT_CHARS

    def test_names_an_actor_only_when_it_is_a_string(self) -> None:
        assert refused(body_of(actor_name=["a"])).actor_name == ""


class TestInternalQueues:
    @pytest.mark.parametrize(
        "queue", [CREDENTIALS, NOTIFICATIONS, f"{REQUESTS}.DQ", f"{DECISIONS}.DQ", f"{CREDENTIALS}.DQ"]
    )
    @pytest.mark.parametrize("user_id", [None, PORTAL, ""])
    def test_refuse_what_accessflow_did_not_publish(self, queue: str, user_id: str | None) -> None:
        actor = {CREDENTIALS: "credentials.issue", NOTIFICATIONS: "notifications.send"}.get(
            queue.removesuffix(".DQ"), "access_request.route"
        )
        body = body_of(queue_name=queue, actor_name=actor)
        verdict = refused(body, delivered_on=queue, user_id=user_id)
        assert verdict.kind == "forged"
        assert verdict.reason.startswith(f"{queue} accepts only accessflow's own messages; published by ")
        expected = "a sender that did not set user_id" if user_id is None else json.dumps(user_id)
        assert verdict.reason.endswith(expected)

    def test_refuse_garbage_from_outsiders_as_forged_too(self) -> None:
        verdict = refused(b"[[[", delivered_on=CREDENTIALS, user_id=PORTAL)
        assert verdict.kind == "forged" and PORTAL in verdict.reason


class TestOptionsFromOutsiders:
    @pytest.mark.parametrize("name", [*sorted(FOREIGN_OPTIONS), "retries", "origin"])
    @pytest.mark.parametrize("user_id", [None, PORTAL])
    def test_every_option_is_dropped(self, name: str, user_id: str | None) -> None:
        value = FOREIGN_OPTIONS.get(name, {"retries": 0, "origin": WORKERS}.get(name))
        verdict = accepted(body_of(options={name: value}), user_id=user_id)
        assert verdict.message.options == ({} if user_id is None else {"origin": PORTAL})

    def test_all_of_them_at_once_leave_only_the_origin(self) -> None:
        options = {**FOREIGN_OPTIONS, "retries": 0, "origin": WORKERS}
        verdict = accepted(body_of(options=options), user_id=PORTAL)
        assert verdict.message.options == {"origin": PORTAL}

    def test_a_decision_is_read_the_same_way(self) -> None:
        body = body_of(queue_name=DECISIONS, actor_name="access_request.decide", options=FOREIGN_OPTIONS)
        assert accepted(body, delivered_on=DECISIONS).message.options == {}


class TestOptionsFromAccessflow:
    @pytest.mark.parametrize("name", sorted(FOREIGN_OPTIONS))
    @pytest.mark.parametrize("queue", [REQUESTS, f"{REQUESTS}.DQ"])
    def test_only_its_bookkeeping_survives(self, name: str, queue: str) -> None:
        body = body_of(queue_name=queue, options={name: FOREIGN_OPTIONS[name]})
        options = accepted(body, delivered_on=queue, user_id=WORKERS).message.options
        # The sender stands as the origin of a message that brings none (see below).
        if name == "eta" and queue.endswith(".DQ"):
            assert options == {"eta": NOW_MS + MAX_DELAY_MS, "origin": WORKERS}  # kept, clamped
        else:
            assert options == {"origin": WORKERS}

    def test_retries_and_origin_are_kept(self) -> None:
        body = body_of(options={"retries": 3, "origin": PORTAL, "traceback": "secret"})
        options = accepted(body, user_id=WORKERS).message.options
        assert options == {"retries": 3, "origin": PORTAL}

    @pytest.mark.parametrize(
        ("retries", "kept"),
        [(0, 0), (7, 7), (10**12, MAX_RETRIES_OPTION), (-1, None), (True, None), ("3", None), (1.0, None)],
    )
    def test_retries_must_be_a_non_negative_integer_and_are_capped(
        self, retries: object, kept: int | None
    ) -> None:
        options = accepted(body_of(options={"retries": retries}), user_id=WORKERS).message.options
        assert options.get("retries") == kept

    @pytest.mark.parametrize(
        ("origin", "kept"),
        [(PORTAL, PORTAL), ("p" * 200, "p" * 200), ("p" * 201, WORKERS), ("", WORKERS), (5, WORKERS)],
    )
    def test_origin_must_be_a_short_string_or_the_sender_stands_as_it(
        self, origin: object, kept: str
    ) -> None:
        options = accepted(body_of(options={"origin": origin}), user_id=WORKERS).message.options
        assert options.get("origin") == kept

    def test_a_message_an_internal_user_published_first_is_its_own_origin(self) -> None:
        # On a one-user development broker, that user is the portal's sender too; in production no
        # portal is registered under an internal user, so its submissions are refused as forged.
        options = accepted(body_of(options={}), user_id=WORKERS).message.options
        assert options == {"origin": WORKERS}

    def test_eta_on_a_work_queue_is_dropped(self) -> None:
        options = accepted(body_of(options={"eta": NOW_MS + 1000}), user_id=WORKERS).message.options
        assert "eta" not in options

    @pytest.mark.parametrize(
        ("eta", "kept"),
        [
            (NOW_MS - 5, NOW_MS - 5),
            (NOW_MS + 1000, NOW_MS + 1000),
            (NOW_MS + MAX_DELAY_MS, NOW_MS + MAX_DELAY_MS),
            (NOW_MS + MAX_DELAY_MS + 1, NOW_MS + MAX_DELAY_MS),
            (10**30, NOW_MS + MAX_DELAY_MS),
            (True, None),
            ("soon", None),
            (1.5, None),
            (None, None),
        ],
    )
    def test_eta_on_a_delay_queue_is_kept_within_the_longest_backoff(
        self, eta: object, kept: int | None
    ) -> None:
        queue = f"{REQUESTS}.DQ"
        body = body_of(queue_name=queue, options={"eta": eta})
        options = accepted(body, delivered_on=queue, user_id=WORKERS).message.options
        assert options.get("eta") == kept
