"""Nothing on the wire reaches around an actor, or stops a pool: real worker pools, raw publishes.

A producer's ``options`` (``eta``, ``pipe_target``, callbacks, retry and time limits) must
change nothing, and an envelope dramatiq cannot handle (a wrong ``queue_name``, an
``actor_name`` that is a list or names nobody) must be recorded with its reason and
acknowledged, without killing a worker thread or restarting a consumer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pytest
import sqlalchemy as sa

from domain.model import Status
from infra.bootstrap import Services
from infra.db import orm
from infra.messaging.topology import Topology
from infra.settings import Settings
from messages.routes import DECIDE, ISSUE, ROUTES, SUBMIT
from tests import services as svc
from tests.conftest import ADMIN_ID, Boundary
from tests.e2e.conftest import PortalClient, publish_raw, request_payload, wait_for_status
from tests.services import envelope

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]

#: Lines a worker log must never hold: a dead worker thread, a consumer that crashed or restarted,
#: a message dramatiq could not settle, a pool the supervisor had to restart.
POOL_FAILURE_SIGNS = (
    "Exception in thread",
    "Consumer encountered",
    "Restarting consumer",
    "not in known tags",
    "Failed to ack",
    "Failed to nack",
    "Unhandled error during post_process_message",
    "workers.died",
)
#: And, where every message is handled cleanly, no traceback at all.
CRASH_SIGNS = ("Traceback", *POOL_FAILURE_SIGNS)
#: 2100-01-01, in milliseconds: an eta no request should wait for.
FAR_FUTURE_MS = 4_102_444_800_000


def publish_request(portal: PortalClient, *, options: dict[str, Any] | None = None) -> str:
    """Publish one valid access request the way a portal does; return its request id.

    The one place that knows how a valid request is submitted (today: a v2 submission
    naming the portal, published by the portal's own AMQP user to the submissions
    exchange); when that changes, only this changes.
    """
    payload = {"version": 2, "portal_id": portal.party.id, **request_payload()}
    body = json.loads(envelope(SUBMIT.queue_name(portal.prefix), SUBMIT.actor_name, payload))
    body["options"] = options or {}
    portal.publish(json.dumps(body).encode(), message_id=body["message_id"])
    return str(payload["request_id"])


class WorkerLogs:
    """The worker pools' logs, read from where they stood when a test began."""

    def __init__(self, directory: Path) -> None:
        self.start = {path: path.stat().st_size for path in directory.glob("*.log")}

    def since_start(self) -> str:
        text = ""
        for path, offset in self.start.items():
            with path.open("rb") as log:
                log.seek(offset)
                text += log.read().decode("utf-8", errors="replace")
        return text

    def lines_with(self, signs: tuple[str, ...]) -> list[str]:
        return [line for line in self.since_start().splitlines() if any(s in line for s in signs)]

    def crash_signs(self) -> list[str]:
        return self.lines_with(CRASH_SIGNS)


@pytest.fixture
def worker_logs(worker_pools: Path) -> Iterator[WorkerLogs]:
    logs = WorkerLogs(worker_pools)
    yield logs
    assert logs.crash_signs() == []


def credentials_count(services: Services, request_id: str) -> int:
    with services.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(orm.credentials)
                .where(orm.credentials.c.request_id == request_id)
            ).scalar_one()
        )


def transitions(services: Services, request_id: str) -> list[tuple[str | None, str]]:
    with services.uow() as uow:
        request = uow.requests.get(request_id)
        assert request is not None
        return [(e.from_status and e.from_status.value, e.to_status.value) for e in request.history]


def malformed_since(services: Services, since: datetime) -> list[sa.Row[Any]]:
    with services.engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(orm.malformed_messages).where(orm.malformed_messages.c.received_at >= since)
            )
        )


def reason_of(services: Services, message_id: str) -> str:
    reason: str = svc.wait_until(
        lambda: next((row.reason for row in recorded(services, message_id)), None),
        what=f"a malformed_messages row for {message_id}",
    )
    return reason


def recorded(services: Services, message_id: str) -> list[sa.Row[Any]]:
    with services.engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(orm.malformed_messages).where(orm.malformed_messages.c.message_id == message_id)
            )
        )


def all_queues_drained(settings: Settings) -> bool:
    names = [route.queue_name(settings.queue_prefix) for route in ROUTES]
    return all(svc.queue_depth(settings.broker_url, n) == 0 for n in names)


class TestProducerOptions:
    def test_change_nothing_not_even_an_eta(
        self, portal: PortalClient, settings: Settings, services: Services, worker_logs: WorkerLogs
    ) -> None:
        # Given a queue where a followed pipe or callback would land
        probe = f"{settings.queue_prefix}.probe-{uuid.uuid4().hex[:6]}"
        connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        connection.channel().queue_declare(probe, durable=False, auto_delete=False)
        connection.close()
        began = datetime.now(UTC)
        pipe = {
            "queue_name": probe,
            "actor_name": ISSUE.actor_name,
            "args": [{"request_id": str(uuid.uuid4())}],
            "kwargs": {},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": 0,
        }
        hostile: list[dict[str, Any]] = [{"eta": FAR_FUTURE_MS} for _ in range(10)]
        hostile += [
            {"retries": 10**6},
            {"max_retries": 0, "retries": 99},
            {"time_limit": 1},
            {"pipe_target": pipe},
            {"on_success": ISSUE.actor_name},
            {"on_failure": ISSUE.actor_name},
            {"callbacks": [ISSUE.actor_name]},
            {"origin": "someone-else"},
        ]

        # When a portal publishes requests with those options, ten eta'd ones first, then plain ones
        with_options = [publish_request(portal, options=options) for options in hostile]
        plain = [publish_request(portal) for _ in range(5)]

        # Then every request is provisioned now, the eta'd ones too: none waits for 2100, and
        # none holds a prefetch slot that the plain ones behind it need
        for request_id in [*plain, *with_options]:
            wait_for_status(services, request_id, Status.PROVISIONED)
        # And each ran once: one credential, one pass through its states
        for request_id in [*plain, *with_options]:
            assert credentials_count(services, request_id) == 1
            assert transitions(services, request_id) == transitions(services, plain[0])
        # And nothing a pipe or callback would have sent arrived anywhere, and nothing was refused
        svc.wait_until(lambda: all_queues_drained(settings), what="every queue to drain")
        assert svc.queue_depth(settings.broker_url, probe) == 0
        assert [row.actor_name for row in malformed_since(services, began)] == []
        connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        connection.channel().queue_delete(probe)
        connection.close()


def bad_envelope(queue: str, actor: str, payload: dict[str, Any], /, **fields: Any) -> tuple[str, bytes]:
    """An envelope for ``queue`` with ``fields`` overridden, and its message id."""
    message_id = str(uuid.uuid4())
    body = json.loads(envelope(queue, actor, payload, message_id=message_id))
    body.update(fields)
    return message_id, json.dumps(body).encode()


class TestEnvelopesDramatiqCannotHandle:
    def test_are_recorded_with_their_reason_and_never_stop_the_pool(
        self,
        portal: PortalClient,
        boundary: Boundary,
        settings: Settings,
        services: Services,
        worker_logs: WorkerLogs,
    ) -> None:
        requests = SUBMIT.queue_name(settings.queue_prefix)
        decisions = DECIDE.queue_name(settings.queue_prefix)
        submission = {"version": 2, "portal_id": portal.party.id, **request_payload()}

        def submitted(**fields: Any) -> str:
            message_id, body = bad_envelope(requests, SUBMIT.actor_name, submission, **fields)
            portal.publish(body, message_id=message_id)
            return message_id

        def decided(**fields: Any) -> str:
            message_id, body = bad_envelope(decisions, DECIDE.actor_name, {"request_id": "r"}, **fields)
            admin_tool = boundary.accounts.admin_tool
            publish_raw(
                boundary.url(admin_tool),
                body,
                exchange=Topology(settings.queue_prefix).decisions_exchange,
                routing_key=ADMIN_ID,
                user_id=admin_tool,
                message_id=message_id,
            )
            return message_id

        # Given envelopes that used to kill a worker thread after the actor ran, leave a message
        # unacknowledged, or restart the consumer once a second
        expected = {
            submitted(queue_name=5): "queue_name must be a string, not a number",
            submitted(queue_name=""): 'queue_name "" is not the queue it was delivered on',
            submitted(queue_name=f"{requests}.XQ"): "is not the queue it was delivered on",
            submitted(queue_name=decisions): "is not the queue it was delivered on",
            submitted(actor_name=[SUBMIT.actor_name]): "actor_name must be a string, not an array",
            submitted(actor_name="no.such.actor"): 'no actor is named "no.such.actor"',
            submitted(actor_name=DECIDE.actor_name): f"consumes {decisions}, not {requests}",
            decided(queue_name=requests): "is not the queue it was delivered on",
            decided(actor_name={"a": 1}): "actor_name must be a string, not an object",
        }
        # And valid requests behind them
        after = [publish_request(portal) for _ in range(3)]

        # Then each bad one is recorded with its reason and its sender, once
        for message_id, reason in expected.items():
            assert reason in reason_of(services, message_id)
            [row] = recorded(services, message_id)
            assert row.kind == "malformed"
            assert row.sender in (portal.user, boundary.accounts.admin_tool)
        # And the requests behind them complete, and every queue drains: nothing stays held
        for request_id in after:
            wait_for_status(services, request_id, Status.PROVISIONED)
        svc.wait_until(lambda: all_queues_drained(settings), what="every queue to drain")
        for route in ROUTES:
            assert svc.consumers_on(settings.broker_url, route.queue_name(settings.queue_prefix)) > 0

    @pytest.mark.parametrize("queue", ["credentials", "notifications", "requests.DQ"])
    @pytest.mark.parametrize("with_user_id", [True, False])
    def test_a_message_for_an_internal_queue_from_outside_is_recorded_as_forged(
        self,
        boundary: Boundary,
        settings: Settings,
        services: Services,
        worker_logs: WorkerLogs,
        queue: str,
        with_user_id: bool,
    ) -> None:
        # Given a user the (misconfigured) broker lets write to any queue, eta and all
        name = f"{settings.queue_prefix}.{queue}"
        actor = {"credentials": ISSUE.actor_name, "notifications": "notifications.send"}.get(
            queue, SUBMIT.actor_name
        )
        request_id = str(uuid.uuid4())
        message_id, body = bad_envelope(
            name, actor, {"request_id": request_id, "kind": "approve"}, options={"eta": FAR_FUTURE_MS}
        )
        publish_raw(
            boundary.url(boundary.intruder),
            body,
            exchange="",
            routing_key=name,
            user_id=boundary.intruder if with_user_id else None,
            message_id=message_id,
        )

        # Then it is recorded as forged, with who sent it, and nothing runs for it
        reason = reason_of(services, message_id)
        assert reason.startswith(f"{name} accepts only accessflow's own messages; published by ")
        [row] = recorded(services, message_id)
        assert (row.kind, row.actor_name) == ("forged", actor)
        assert row.sender == (boundary.intruder if with_user_id else None)
        assert credentials_count(services, request_id) == 0
        svc.wait_until(lambda: svc.queue_depth(settings.broker_url, name) == 0, what=f"{name} to drain")
