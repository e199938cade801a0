"""The review-deadline sweep on real PostgreSQL: replica-safe (where it runs: test_sweep_placement.py).

Requests are parked by the real router under the test catalogue's ``timed`` plan (48 hours);
the sweep runs with the clock injected at or past their deadline, so no test waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from domain.model import REVIEW_SWEEP, AccessRequest, Status
from infra.bootstrap import Services
from infra.db import orm
from infra.messaging.lifecycle import sweep_review_deadlines
from tests.integration.test_persistence import routed

pytestmark = pytest.mark.integration


def request(services: Services, request_id: str) -> AccessRequest:
    with services.uow() as uow:
        found = uow.requests.get(request_id)
    assert found is not None
    return found


def parked(services: Services) -> tuple[str, datetime]:
    """A request parked under the ``timed`` plan: its id and its review deadline."""
    request_id = routed(services, plan_id="timed")
    deadline = request(services, request_id).review_deadline_at
    assert deadline is not None
    return request_id, deadline


def sweep_until_done(services: Services, now: Callable[[], datetime]) -> None:
    """Sweep as the pools' ticks would, until a sweep finds nothing left to do.

    One sweep takes at most 100 rows, soonest deadline first, and the session's database holds
    other tests' pending requests: one look need not reach this test's.
    """
    for _ in range(100):
        if sweep_review_deadlines(services, now=now) == (0, 0, 0):
            return
    raise AssertionError("the sweep still found work after 100 rounds")


def expiry_emails(services: Services, request_id: str) -> list[dict[str, object]]:
    """The consumer's expiry emails queued in the outbox for the request."""
    with services.engine.connect() as connection:
        payloads = connection.execute(sa.select(orm.outbox.c.payload)).scalars().all()
    return [p for p in payloads if p.get("request_id") == request_id and p.get("kind") == "review_expired"]


class TestTheReviewDeadlineSweep:
    def test_stores_the_deadline_on_parking_and_expires_at_it(self, services: Services) -> None:
        # Given a request parked under a plan with 48 hours to decide
        request_id, deadline = parked(services)
        assert deadline - request(services, request_id).updated_at == timedelta(hours=48)

        # When the sweep runs a second before the deadline, and then at it
        sweep_until_done(services, now=lambda: deadline - timedelta(seconds=1))
        assert request(services, request_id).status is Status.PENDING_REVIEW
        sweep_until_done(services, now=lambda: deadline)

        # Then it is expired by the sweep, and its consumer's email is queued once
        expired = request(services, request_id)
        assert expired.status is Status.EXPIRED
        assert expired.history[-1].actor_id == REVIEW_SWEEP
        assert len(expiry_emails(services, request_id)) == 1

    def test_skips_what_another_transaction_holds_instead_of_waiting(self, services: Services) -> None:
        # Given another replica (or a decision being applied) holding the pending request
        request_id, deadline = parked(services)
        with services.uow() as other:
            held = other.requests.get(request_id, for_update=True)
            assert held is not None

            # When this replica's sweep runs meanwhile
            sweep_until_done(services, now=lambda: deadline)

            # Then it did not wait, and left that request alone
            assert expiry_emails(services, request_id) == []

        # And once the other is gone without committing, the next sweep takes it
        sweep_until_done(services, now=lambda: deadline)
        assert request(services, request_id).status is Status.EXPIRED

    def test_two_sweeps_at_once_expire_each_request_once(self, services: Services) -> None:
        # Given several requests past their deadline
        parked_ones = [parked(services) for _ in range(6)]
        moment = max(deadline for _, deadline in parked_ones)

        # When two replicas sweep at the same moment, round after round
        for _ in range(3):
            together = threading.Barrier(2)
            failures: list[BaseException] = []

            def sweep(
                together: threading.Barrier = together, failures: list[BaseException] = failures
            ) -> None:
                together.wait(timeout=30)
                try:
                    sweep_until_done(services, now=lambda: moment)
                except BaseException as failure:  # reported by the test thread
                    failures.append(failure)

            threads = [threading.Thread(target=sweep) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert failures == []

        # Then each request expired once: one audit row into expired, one email queued
        for request_id, _ in parked_ones:
            expired = request(services, request_id)
            assert [e.to_status for e in expired.history].count(Status.EXPIRED) == 1
            assert len(expiry_emails(services, request_id)) == 1
