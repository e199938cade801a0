"""The same message delivered twice at the same moment is a duplicate, not an error (issue 8, point 6).

Both deliveries look for the other's row before either has committed, find none, and write their
own; the second is refused by the key. That raised UniqueViolation, logged an ERROR with a
traceback and retried the message (39 of 80 in one black-box run). Here two threads handle the
same decision (or submission) at once on real PostgreSQL, round after round, so that the race
is hit: each pair gives one INFO line about the duplicate (``decision.duplicate_ignored``,
``request.duplicate_ignored``), no exception and no ERROR.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import pytest
import structlog

from domain import commands, handlers
from domain.model import DecisionOutcome, Status
from infra.bootstrap import Services
from tests.conftest import PORTAL_ID, Parties
from tests.integration.test_persistence import decide, decision, routed

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: Pairs run per test: enough that, before the fix, some always raced (about half did).
ROUNDS = 20


def at_once(handle: Callable[[], T]) -> list[T | BaseException]:
    """Run ``handle`` in two threads released together; what each returned, or raised."""
    together = threading.Barrier(2)
    results: list[T | BaseException] = []

    def run() -> None:
        together.wait(timeout=30)
        try:
            results.append(handle())
        except BaseException as failure:  # reported by the test thread
            results.append(failure)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def submission(services: Services, request_id: str, *, new_app: bool) -> commands.RouteRequest:
    with services.uow() as uow:
        portal = uow.portals.get(PORTAL_ID)
    assert portal is not None
    return commands.RouteRequest(
        request_id=request_id,
        consumer_id="acme",
        consumer_email="dev@acme.example",
        consumer_name="Acme",
        plan_id="partner",
        product_ids=("payments",),
        app_id=None if new_app else "acme-checkout",
        new_app_name="Shop" if new_app else None,
        new_app_description=None,
        justification=None,
        submitted_at=datetime.now(UTC),
        portal_id=PORTAL_ID,
        sender=portal.broker_user,
    )


def lines(caplog: pytest.LogCaptureFixture, level: int, text: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def events(logged: list[dict[str, object]], name: str, level: str) -> list[dict[str, object]]:
    """The structured lines named ``name`` at ``level``."""
    return [line for line in logged if line["event"] == name and line["log_level"] == level]


class TestTheSameDecisionTwiceAtOnce:
    def test_applies_once_and_the_other_is_one_info_line_without_error(
        self, services: Services, parties: Parties, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        with structlog.testing.capture_logs() as logged:
            for _ in range(ROUNDS):
                # Given a pending request and one signed decision about it, delivered twice at once
                command = decision(parties, routed(services), approve=True)

                # When both deliveries are handled at the same moment
                outcomes = at_once(lambda command=command: decide(services, command))  # type: ignore[misc]

                # Then one applies it and the other ignores it, and neither raises
                assert sorted(map(str, outcomes)) == sorted(
                    map(str, [DecisionOutcome.APPLIED, DecisionOutcome.IGNORED])
                ), outcomes

        # And each duplicate is one INFO line, with no ERROR anywhere
        assert len(events(logged, "decision.duplicate_ignored", "info")) == ROUNDS
        assert [line for line in logged if line["log_level"] == "error"] == []
        assert lines(caplog, logging.ERROR) == []


class TestTheSameSubmissionTwiceAtOnce:
    @pytest.mark.parametrize("new_app", [False, True], ids=["existing app", "new app"])
    def test_routes_it_once_and_the_other_is_one_info_line_without_error(
        self, services: Services, caplog: pytest.LogCaptureFixture, new_app: bool
    ) -> None:
        caplog.set_level(logging.INFO)
        with structlog.testing.capture_logs() as logged:
            for _ in range(ROUNDS):
                command = submission(services, str(uuid.uuid4()), new_app=new_app)

                statuses = at_once(
                    lambda command=command: handlers.route_request(command, uow=services.uow())
                )  # type: ignore[misc]

                assert statuses == [Status.PENDING_REVIEW, Status.PENDING_REVIEW], statuses
                with services.uow() as uow:
                    request = uow.requests.get(command.request_id)
                assert request is not None
                assert [e.to_status for e in request.history] == [Status.SUBMITTED, Status.PENDING_REVIEW]

        assert len(events(logged, "request.duplicate_ignored", "info")) == ROUNDS
        assert len(events(logged, "request.routed", "info")) == ROUNDS
        assert [line for line in logged if line["log_level"] == "error"] == []
        assert lines(caplog, logging.ERROR) == []
