"""A fuzz through the real broker: hostile bodies, raw with pika, into the real worker pools.

hypothesis is the data generator here: contract instances drawn from the JSON Schemas in
``messages/schemas`` (plus realistic requests with drawn text), then mutated into what a
careless or hostile producer sends: not JSON, truncated, nested deep, wrong types, wrong
``queue_name`` or ``actor_name``, odd Unicode and lone surrogates, huge strings, producer
options, and messages for internal queues. A valid request goes out every
:data:`VALID_EVERY` bodies. Every delivery carries an AMQP ``message_id`` (the envelope's
too, where the body has a valid one), so each can be traced to its end:

- every valid request is provisioned;
- every body ends somewhere with a reason: a ``malformed_messages`` row, a ``dead_letters``
  row, or, for a body that happened to be a valid contract, an ``access_requests`` or
  ``decisions`` row;
- no worker thread died, no consumer restarted, no pool was restarted (the worker logs);
- every queue drains.

``ACCESSFLOW_FUZZ_BODIES`` sets how many bodies (default 2000; ``make fuzz`` sends 10000),
``ACCESSFLOW_FUZZ_SEED`` the seed.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pika
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

import messages
from domain.model import Status
from infra.bootstrap import Services
from infra.db import orm
from infra.messaging.envelope import MAX_DEPTH, is_message_id
from infra.messaging.topology import Topology
from infra.settings import Settings
from messages.routes import DECIDE, ISSUE, NOTIFY, QUEUE_ROUTES, SUBMIT
from tests import services as svc
from tests.conftest import ADMIN_ID, Boundary
from tests.e2e.conftest import PortalClient
from tests.e2e.test_wire_options import POOL_FAILURE_SIGNS, WorkerLogs, all_queues_drained, publish_request

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]

BODIES = int(os.environ.get("ACCESSFLOW_FUZZ_BODIES", "2000"))
SEED = int(os.environ.get("ACCESSFLOW_FUZZ_SEED", "20261127"))
#: A valid request goes out after this many hostile bodies.
VALID_EVERY = 20
#: Contract instances drawn from each schema (and realistic requests), to mutate.
POOL_SIZE = 60
#: Bodies drawn per hypothesis example: far fewer examples, the same bodies, ten times faster.
BATCH = 10
SCHEMAS = Path(messages.__file__).resolve().parent / "schemas"

#: Options a producer might set to reach around an actor.
OPTION_NAMES = (
    "eta",
    "retries",
    "max_retries",
    "min_backoff",
    "max_backoff",
    "retry_when",
    "throws",
    "time_limit",
    "pipe_target",
    "pipe_ignore",
    "on_success",
    "on_failure",
    "on_retry_exhausted",
    "callbacks",
    "broker_priority",
    "traceback",
    "origin",
    "requeue_timestamp",
)
#: A traceback's last line: ``module.ExceptionName: (cause.Name) message``.
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Violation|Exit|Interrupt)): ?(\([\w.]+\))?")
FIELDS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
#: Text a producer in another language might send: controls, format characters, line and
#: paragraph separators, private use, and lone surrogates (written as JSON escapes).
ODD_TEXT = st.text(
    st.characters(codec=None, categories=("Cc", "Cf", "Cs", "Co", "Zl", "Zp", "Mn", "Lo", "So")),
    min_size=1,
    max_size=40,
)


@dataclass(frozen=True)
class Body:
    """One delivery: where it goes, its bytes, its AMQP id, and where a row would be if it ran."""

    queue: str
    data: bytes
    amqp_id: str
    mutation: str
    request_id: str | None


# --- contract instances --------------------------------------------------------------------------


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = root["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node


def from_contract_schema(node: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    # hypothesis-jsonschema 0.23.1 cannot draw objects with this hypothesis (its object strategy
    # calls a removed API), so objects are assembled here and only leaves come from from_schema.
    node = _resolve(node, root)
    if node.get("type") == "object":
        properties: dict[str, Any] = node["properties"]
        required = node.get("required", [])
        return st.fixed_dictionaries(
            {name: from_contract_schema(properties[name], root) for name in required},
            optional={n: from_contract_schema(s, root) for n, s in properties.items() if n not in required},
        )
    branches = node.get("anyOf", [])
    if any(_resolve(branch, root).get("type") == "object" for branch in branches):
        return st.one_of([from_contract_schema(branch, root) for branch in branches])
    return from_schema(node)


TIMES = st.datetimes(
    min_value=datetime(1970, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=13, minutes=45))]
    ),
).map(datetime.isoformat)


def schema(name: str) -> st.SearchStrategy[Any]:
    loaded = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return from_contract_schema(loaded, loaded)


@st.composite
def realistic_request(draw: st.DrawFn, portal_id: str) -> dict[str, Any]:
    """A request of this portal for the test catalogue, with drawn text: often valid, sometimes refused."""
    return {
        "version": 2,
        "portal_id": portal_id,
        "request_id": str(draw(st.uuids())),
        "consumer": {
            "id": "acme",
            "email": "dev@acme.example",
            "name": draw(st.text(min_size=1, max_size=30)),
        },
        "app_id": "acme-checkout",
        "product_ids": draw(
            st.lists(st.sampled_from(["payments", "ledger", "ghost"]), min_size=1, max_size=3)
        ),
        "plan_id": draw(st.sampled_from(["starter", "partner", "ghost"])),
        "justification": draw(st.text(max_size=60)),
        "submitted_at": draw(TIMES),
    }


@st.composite
def unsigned_decision(draw: st.DrawFn) -> dict[str, Any]:
    """A decision as a careless admin tool would send it: right shape, no valid signature."""
    return {
        "version": draw(st.sampled_from([1, 2])),
        "decision_id": str(draw(st.uuids())),
        "request_id": str(draw(st.uuids())),
        "decision": draw(st.sampled_from(["approve", "reject"])),
        "admin": {"id": ADMIN_ID, "email": "admin@accessflow.example"},
        "admin_id": ADMIN_ID,
        "reason": draw(st.text(min_size=1, max_size=40)),
        "decided_at": draw(TIMES),
    }


def draw_many(strategy: st.SearchStrategy[Any], count: int, salt: int) -> list[Any]:
    """``count`` examples of ``strategy``, seeded: hypothesis as a generator, not a test runner."""
    drawn: list[Any] = []

    @seed(SEED + salt)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn[:count]


# --- hostile bodies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pools:
    prefix: str
    submissions: list[dict[str, Any]]
    decisions: list[dict[str, Any]]


def envelope_for(prefix: str, queue: str, payload: Any) -> dict[str, Any]:
    route = {"requests": SUBMIT, "decisions": DECIDE, "credentials": ISSUE, "notifications": NOTIFY}[
        queue.removesuffix(".DQ")
    ]
    return {
        "queue_name": f"{prefix}.{queue}",
        "actor_name": route.actor_name,
        "args": [payload],
        "kwargs": {},
        "options": {},
        "message_id": "to-be-set",
        "message_timestamp": int(time.time() * 1000),
    }


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaf_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*path, i))]
    return [path] if isinstance(value, str) else []


def _set(document: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


@st.composite
def hostile_body(draw: st.DrawFn, pools: Pools) -> tuple[str, str, dict[str, Any] | bytes, bool]:
    """(queue, mutation, envelope or raw bytes, whether a lone surrogate goes out as raw bytes)."""
    queue = draw(
        st.sampled_from(
            ["requests"] * 12 + ["decisions"] * 6 + ["credentials", "notifications", "requests.DQ"]
        )
    )
    payload = json.loads(
        json.dumps(draw(st.sampled_from(pools.decisions if queue == "decisions" else pools.submissions)))
    )
    env = envelope_for(pools.prefix, queue, payload)
    mutation = draw(
        st.sampled_from(
            [
                "as_is",
                "options",
                "not_json",
                "truncated",
                "deep",
                "wrong_type",
                "wrong_queue",
                "wrong_actor",
                "missing_or_extra",
                "odd_unicode",
                "raw_surrogate",
                "huge",
                "bad_message_id",
                "top_level",
                "wrong_arguments",
            ]
        )
    )
    raw_surrogate = False
    match mutation:
        case "options":
            env["options"] = draw(st.dictionaries(st.sampled_from(OPTION_NAMES), JSON, min_size=1))
            if draw(st.booleans()):
                env["options"]["eta"] = 4_102_444_800_000
        case "not_json":
            return queue, mutation, draw(st.binary(max_size=300)), False
        case "truncated":
            text = json.dumps(env).encode()
            return queue, mutation, text[: draw(st.integers(0, len(text) - 1))], False
        case "deep":
            depth = draw(st.integers(MAX_DEPTH + 1, 100_000))
            shape = draw(st.sampled_from(["open", "closed", "in_args"]))
            if shape == "open":
                return queue, mutation, b"[" * depth, False
            if shape == "closed":
                return queue, mutation, b"{" * min(depth, 30_000) + b"}" * min(depth, 30_000), False
            env["args"] = [{"deep": nested(min(depth, 500))}]
        case "wrong_type":
            env[draw(st.sampled_from(FIELDS))] = draw(JSON)
        case "wrong_queue":
            env["queue_name"] = draw(
                st.sampled_from(
                    [
                        5,
                        "",
                        None,
                        [env["queue_name"]],
                        f"{env['queue_name']}.XQ",
                        f"{env['queue_name']}.DQ",
                        f"{pools.prefix}.decisions" if queue == "requests" else f"{pools.prefix}.requests",
                        f"{pools.prefix}.credentials",
                    ]
                )
                | st.text(max_size=30)
            )
        case "wrong_actor":
            env["actor_name"] = draw(
                st.sampled_from(
                    [[env["actor_name"]], None, 5, "", "no.such.actor", DECIDE.actor_name, ISSUE.actor_name]
                )
                | st.text(max_size=30)
            )
        case "missing_or_extra":
            if draw(st.booleans()):
                del env[draw(st.sampled_from(FIELDS))]
            else:
                env[draw(st.text(max_size=10).filter(lambda k: k not in FIELDS))] = draw(JSON)
        case "odd_unicode" | "raw_surrogate":
            paths = _leaf_paths(env["args"])
            if paths:
                _set(env["args"], draw(st.sampled_from(paths)), draw(ODD_TEXT))
            else:
                env["args"] = [draw(ODD_TEXT)]
            raw_surrogate = mutation == "raw_surrogate"
            if raw_surrogate:
                env["args"].append("\ud800")
        case "huge":
            size = draw(st.integers(20_000, 200_000))
            if isinstance(payload, dict) and draw(st.booleans()):
                payload["justification" if queue != "decisions" else "reason"] = "x" * size
            else:
                payload[draw(st.text(max_size=3)) + "k" * size] = 1
        case "bad_message_id":
            env["message_id"] = draw(
                st.sampled_from([5, None, "", " leading", "-dash", "a" * 129, "caf\u00e9", "nul\x00", ["x"]])
                | st.text(max_size=40)
            )
        case "top_level":
            return queue, mutation, json.dumps(draw(JSON)).encode(), False
        case "wrong_arguments":
            other = pools.submissions if queue == "decisions" else pools.decisions
            env["args"], env["kwargs"] = draw(
                st.sampled_from(
                    [
                        ([draw(st.sampled_from(other))], {}),
                        ([], {}),
                        ([payload, payload], {}),
                        ([payload], {"extra": 1}),
                        ([json.dumps(payload)], {}),
                    ]
                )
            )
    return queue, mutation, env, raw_surrogate


def finish(queue: str, mutation: str, document: dict[str, Any] | bytes, raw_surrogate: bool) -> Body:
    """Give the body its AMQP id, and the envelope the same id where it holds a valid one."""
    amqp_id = str(uuid.uuid4())
    request_id = None
    if isinstance(document, bytes):
        return Body(queue, document, amqp_id, mutation, None)
    if is_message_id(document.get("message_id")):
        document["message_id"] = amqp_id
    args = document.get("args")
    if isinstance(args, list) and args and isinstance(args[0], dict):
        request_id = _uuid_or_none(args[0].get("request_id"))
    if raw_surrogate:
        data = json.dumps(document, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    else:
        data = json.dumps(document).encode()
    return Body(queue, data, amqp_id, mutation, request_id)


def _uuid_or_none(value: object) -> str | None:
    # A contract reads request ids as UUIDs and stores them in canonical form.
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def generate(prefix: str, portal_id: str, count: int) -> list[Body]:
    submissions = draw_many(schema("access_request.submitted.v2.json"), POOL_SIZE, salt=1)
    submissions += draw_many(realistic_request(portal_id), POOL_SIZE * 2, salt=2)
    decisions = draw_many(schema("access_request.decided.v2.json"), POOL_SIZE, salt=3)
    decisions += draw_many(unsigned_decision(), POOL_SIZE // 3, salt=4)
    pools = Pools(prefix, submissions, decisions)
    batches = draw_many(
        st.lists(hostile_body(pools), min_size=BATCH, max_size=BATCH), -(-count // BATCH), salt=5
    )
    return [finish(*drawn) for batch in batches for drawn in batch][:count]


# --- publishing and accounting -------------------------------------------------------------------


class RawPublisher:
    """One connection as one AMQP user, persistent messages, publisher confirms: a producer in another language."""

    def __init__(self, broker_url: str, exchange: str, routing_key: str | None, user_id: str | None) -> None:
        self.exchange, self.routing_key, self.user_id = exchange, routing_key, user_id
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def publish(self, queue: str, body: bytes, message_id: str, *, with_user_id: bool = True) -> None:
        properties = pika.BasicProperties(
            delivery_mode=2,
            content_type="application/json",
            message_id=message_id,
            user_id=self.user_id if with_user_id else None,
        )
        routing_key = self.routing_key if self.routing_key is not None else queue
        self.channel.basic_publish(self.exchange, routing_key, body, properties, mandatory=True)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class Producers:
    """Who sends what, as the boundary allows: a portal submits, the admin tool decides, and a
    user the (misconfigured) broker lets write anywhere puts messages on the internal queues."""

    def __init__(self, portal: PortalClient, boundary: Boundary, prefix: str) -> None:
        topology = Topology(prefix)
        admin = boundary.accounts.admin_tool
        self.by_queue = {
            "requests": RawPublisher(portal.url, topology.submissions_exchange, portal.party.id, portal.user),
            "decisions": RawPublisher(boundary.url(admin), topology.decisions_exchange, ADMIN_ID, admin),
            "internal": RawPublisher(boundary.url(boundary.intruder), "", None, boundary.intruder),
        }

    def publish(self, prefix: str, body: Body) -> None:
        publisher = self.by_queue.get(body.queue, self.by_queue["internal"])
        # One in five goes without user_id: RabbitMQ lets a publisher leave it out.
        with_user_id = int(body.amqp_id[:2], 16) % 5 != 0
        publisher.publish(f"{prefix}.{body.queue}", body.data, body.amqp_id, with_user_id=with_user_id)

    def close(self) -> None:
        for publisher in self.by_queue.values():
            publisher.close()


def chunks(values: list[str], size: int = 1000) -> Iterable[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def found(services: Services, column: sa.Column[Any], values: list[str]) -> set[str]:
    seen: set[str] = set()
    with services.engine.connect() as connection:
        for chunk in chunks(values):
            seen.update(connection.execute(sa.select(column).where(column.in_(chunk))).scalars())
    return seen


def statuses(services: Services, request_ids: list[str]) -> Counter[str]:
    counted: Counter[str] = Counter()
    with services.engine.connect() as connection:
        for chunk in chunks(request_ids):
            rows = connection.execute(
                sa.select(orm.access_requests.c.status).where(orm.access_requests.c.id.in_(chunk))
            ).scalars()
            counted.update(str(getattr(status, "value", status)) for status in rows)
    return counted


def outcomes(services: Services, bodies: list[Body]) -> dict[str, str]:
    """Where each body ended: its AMQP id -> malformed | forged | dead_letter | request | decision."""
    ids = [b.amqp_id for b in bodies]
    kinds: dict[str, str] = {}
    with services.engine.connect() as connection:
        for chunk in chunks(ids):
            rows = connection.execute(
                sa.select(
                    orm.malformed_messages.c.message_id,
                    orm.malformed_messages.c.kind,
                    orm.malformed_messages.c.reason,
                ).where(orm.malformed_messages.c.message_id.in_(chunk))
            )
            for message_id, kind, reason in rows:
                assert reason, f"{message_id} was recorded without a reason"
                kinds[message_id] = kind
    for message_id in found(services, orm.dead_letters.c.message_id, [i for i in ids if i not in kinds]):
        kinds.setdefault(message_id, "dead_letter")
    rest = [b for b in bodies if b.amqp_id not in kinds and b.request_id is not None]
    request_ids = [str(b.request_id) for b in rest]
    requests = found(services, orm.access_requests.c.id, request_ids)
    decided = found(services, orm.decisions.c.request_id, request_ids)
    for body in rest:
        if body.queue.removesuffix(".DQ") == "requests" and body.request_id in requests:
            kinds[body.amqp_id] = "request"
        elif body.queue == "decisions" and body.request_id in decided:
            kinds[body.amqp_id] = "decision"
    return kinds


def handler_failures(logs: WorkerLogs) -> dict[str, int]:
    """Each exception type an actor raised, and how often: findings to report, not pool failures."""
    failures: Counter[str] = Counter()
    for line in logs.lines_with(("with unhandled exception",)):
        try:
            exception = str(json.loads(line).get("exception", ""))
        except ValueError:
            exception = ""
        # The last line naming an exception, and its cause in parentheses (as SQLAlchemy writes it)
        named = [m for m in map(EXCEPTION_LINE.match, exception.splitlines()) if m]
        failures[" ".join(filter(None, named[-1].groups())) if named else "?"] += 1
    return dict(failures)


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    return svc.wait_until(condition, timeout=timeout, interval=0.5, what=what)


class TestHostileBodiesThroughTheRealBroker:
    def test_never_stop_a_pool_and_each_ends_recorded(
        self,
        portal: PortalClient,
        boundary: Boundary,
        settings: Settings,
        services: Services,
        worker_pools: Path,
    ) -> None:
        logs = WorkerLogs(worker_pools)
        started = time.monotonic()
        bodies = generate(settings.queue_prefix, portal.party.id, BODIES)
        generated = time.monotonic()

        # When they go out raw, a valid request after every VALID_EVERY of them
        producers = Producers(portal, boundary, settings.queue_prefix)
        valid: list[str] = []
        try:
            for n, body in enumerate(bodies, start=1):
                producers.publish(settings.queue_prefix, body)
                if n % VALID_EVERY == 0:
                    valid.append(publish_request(portal))
        finally:
            producers.close()
        published = time.monotonic()

        # Then every valid request is provisioned
        deadline = 120 + BODIES / 20
        wait_for(
            lambda: statuses(services, valid)[Status.PROVISIONED.value] == len(valid),
            timeout=deadline,
            what=f"{len(valid)} valid requests to be provisioned",
        )
        # And every hostile body ended somewhere, with a reason
        ended: dict[str, str] = {}

        def all_ended() -> bool:
            ended.update(outcomes(services, [b for b in bodies if b.amqp_id not in ended]))
            return len(ended) == len(bodies)

        try:
            wait_for(all_ended, timeout=deadline, what="every hostile body to end recorded")
        except BaseException:
            lost = [b for b in bodies if b.amqp_id not in ended][:10]
            print("\nunaccounted:", *(f"{b.mutation} {b.queue} {b.data[:200]!r}" for b in lost), sep="\n  ")
            raise
        # And every queue drained
        wait_for(lambda: all_queues_drained(settings), timeout=deadline, what="every queue to drain")
        delay_queues = [f"{route.queue_name(settings.queue_prefix)}.DQ" for route in QUEUE_ROUTES]
        wait_for(
            lambda: all(svc.queue_depth(settings.broker_url, q) == 0 for q in delay_queues),
            timeout=60,
            what="every delay queue to drain",
        )
        finished = time.monotonic()

        by_outcome = Counter(ended.values())
        by_mutation = Counter(f"{b.mutation}->{ended[b.amqp_id]}" for b in bodies)
        elapsed = finished - published
        print(
            f"\nfuzz: {len(bodies)} hostile bodies + {len(valid)} valid requests, seed {SEED}",
            f"outcomes: {dict(sorted(by_outcome.items()))}",
            f"by mutation: {dict(sorted(by_mutation.items()))}",
            f"generated in {generated - started:.1f}s, published in {published - generated:.1f}s, "
            f"all settled {elapsed:.1f}s later; {len(bodies) / (finished - generated):.0f} bodies/s end to end",
            f"actor runs that raised (retried, dead-lettered if they kept failing): {handler_failures(logs)}",
            "dead-letter queues: "
            + str(
                {
                    r.queue: svc.queue_depth(settings.broker_url, f"{r.queue_name(settings.queue_prefix)}.XQ")
                    for r in QUEUE_ROUTES
                }
            ),
            sep="\n",
        )
        # And no worker thread died, no consumer restarted, no pool was restarted
        crashes = logs.lines_with(POOL_FAILURE_SIGNS)
        assert crashes == [], f"{len(crashes)} crash lines, first: {crashes[0][:500]}"
        for route in QUEUE_ROUTES:
            assert svc.consumers_on(settings.broker_url, route.queue_name(settings.queue_prefix)) > 0
