"""A message id accessflow never gives is refused at the edge, with its reason: real pools, raw publishes.

The delivery guard keys its counters and dead letters by message id, in columns of 200
characters. An id that does not fit, or is not an id at all, must be refused where the
delivery is read, recorded with the reason under a name that fits, and acknowledged; it
must never reach the guard, and never stop the messages behind it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.model import Status
from infra.bootstrap import Services
from infra.messaging.envelope import MESSAGE_ID_RULE
from infra.settings import Settings
from messages.routes import SUBMIT
from tests import services as svc
from tests.e2e.conftest import PortalClient, request_payload, status_of, wait_for_status
from tests.e2e.test_wire_options import WorkerLogs, all_queues_drained, publish_request, reason_of, recorded
from tests.services import envelope

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]

#: What the worker logs showed when an over-long id reached the guard and the message ran unguarded.
FAIL_OPEN_SIGNS = ("Unexpected failure", "delivery_guard.failed")

BAD_IDS: dict[str, Any] = {
    "201 characters, one over the column": "a" * 201,
    "129 characters, one over the limit": "b" * 129,
    "10,000 characters": "c" * 10_000,
    "a newline": "id\nnext-line",
    "a NUL": "id\x00",
    "a space": "two words",
    "non-ASCII": "ïd-ünïcode",
    "empty": "",
    "a number": 12345,
    "null": None,
}


@pytest.fixture
def worker_logs(worker_pools: Path) -> Iterator[WorkerLogs]:
    logs = WorkerLogs(worker_pools)
    yield logs
    assert logs.crash_signs() == []
    assert logs.lines_with(FAIL_OPEN_SIGNS) == []


class TestAMessageIdAccessflowNeverGives:
    def test_is_refused_with_its_reason_and_loses_nothing_behind_it(
        self, portal: PortalClient, settings: Settings, services: Services, worker_logs: WorkerLogs
    ) -> None:
        # Given submissions from a portal whose envelopes carry ids that do not fit, or are no ids;
        # each names itself by a good AMQP message_id, as a portal sets it
        requests = SUBMIT.queue_name(settings.queue_prefix)
        refused: dict[str, str] = {}  # AMQP message_id -> the request id it carried
        for bad_id in BAD_IDS.values():
            payload = {"version": 2, "portal_id": portal.party.id, **request_payload()}
            body = json.loads(envelope(requests, SUBMIT.actor_name, payload))
            body["message_id"] = bad_id
            amqp_id = str(uuid.uuid4())
            portal.publish(json.dumps(body).encode(), message_id=amqp_id)
            refused[amqp_id] = str(payload["request_id"])
        # And valid submissions behind them
        after = [publish_request(portal) for _ in range(3)]

        # Then each bad one is recorded once, as malformed, from the portal, with the rule it broke
        for amqp_id in refused:
            assert reason_of(services, amqp_id) == MESSAGE_ID_RULE
            [row] = recorded(services, amqp_id)
            assert (row.kind, row.sender, row.actor_name) == ("malformed", portal.user, SUBMIT.actor_name)
        # And the requests behind them complete, every queue drains, and no bad one made a request
        for request_id in after:
            wait_for_status(services, request_id, Status.PROVISIONED)
        svc.wait_until(lambda: all_queues_drained(settings), what="every queue to drain")
        assert [status_of(services, request_id) for request_id in refused.values()] == [None] * len(refused)
