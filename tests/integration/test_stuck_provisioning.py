"""Requests stuck in ``approved`` are re-driven through the outbox, and given up on after a while (issue 8).

A request whose IssueCredentials was dead-lettered (a transient failure outlasted its retries)
or lost stayed ``approved`` for ever, with no credential. The requests here are approved by
the real router, their command dropped from the outbox as if dead-lettered, and their last
change dated an hour back, as such a request leaves it; no test waits for the stale time.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from domain import commands, handlers
from domain.model import AccessRequest, ActorKind, Status, utcnow
from infra.bootstrap import Services
from infra.db import orm
from infra.messaging.lifecycle import sweep_stuck_provisioning
from tests.integration.test_persistence import routed

pytestmark = pytest.mark.integration

#: The actor the re-driven commands are for.
ISSUE_ACTOR = "credentials.issue"


def forget_commands(services: Services, request_id: str) -> None:
    """Drop the request's queued commands from the outbox, as if they were delivered and dead-lettered."""
    with services.engine.begin() as connection:
        rows = connection.execute(sa.select(orm.outbox.c.id, orm.outbox.c.payload)).all()
        gone = [row.id for row in rows if row.payload.get("request_id") == request_id]
        connection.execute(orm.outbox.delete().where(orm.outbox.c.id.in_(gone)))


def age(services: Services, request_id: str, by: timedelta = timedelta(hours=1)) -> None:
    """Date the request's last change (or re-drive) ``by`` ago."""
    with services.engine.begin() as connection:
        connection.execute(
            orm.access_requests.update()
            .where(orm.access_requests.c.id == request_id)
            .values(updated_at=utcnow() - by)
        )


def stuck_approved(services: Services) -> str:
    """An auto-approved request whose IssueCredentials is gone, approved an hour ago; its id."""
    request_id = routed(services, plan_id="starter")
    forget_commands(services, request_id)
    age(services, request_id)
    return request_id


def request(services: Services, request_id: str) -> AccessRequest:
    with services.uow() as uow:
        found = uow.requests.get(request_id)
    assert found is not None
    return found


def queued_again(services: Services, request_id: str) -> list[dict[str, object]]:
    """The IssueCredentials commands for ``request_id`` in the outbox."""
    with services.engine.connect() as connection:
        payloads = connection.execute(
            sa.select(orm.outbox.c.payload).where(orm.outbox.c.actor_name == ISSUE_ACTOR)
        ).scalars()
        return [p for p in payloads if p.get("request_id") == request_id]


def issue(services: Services, request_id: str) -> object:
    return handlers.issue_credentials(
        commands.IssueCredentials(request_id),
        uow=services.uow(),
        issuer=services.issuer,
        sealer=services.sealer(),
        portal_sealer=services.portal_sealer,
    )


class TestTheProvisioningSweep:
    def test_re_drives_a_request_parked_in_approved_and_it_gets_its_credentials(
        self, services: Services
    ) -> None:
        # Given an approved request whose IssueCredentials is gone, approved an hour ago
        request_id = stuck_approved(services)
        assert queued_again(services, request_id) == []

        # When the sweep runs
        redriven, failed = sweep_stuck_provisioning(services)

        # Then its command is queued again, committed in the outbox, with the re-drive counted
        assert redriven >= 1 and failed == 0
        [command] = queued_again(services, request_id)
        assert command["request_id"] == request_id
        again = request(services, request_id)
        assert (again.status, again.provision_attempts) == (Status.APPROVED, 1)

        # And the next sweep leaves it alone: it is not stale again yet
        sweep_stuck_provisioning(services)
        assert len(queued_again(services, request_id)) == 1

        # And the re-driven command issues its credential
        assert issue(services, request_id) is not None
        assert request(services, request_id).status is Status.PROVISIONED

    def test_leaves_alone_a_request_approved_a_moment_ago(self, services: Services) -> None:
        request_id = routed(services, plan_id="starter")
        forget_commands(services, request_id)

        sweep_stuck_provisioning(services)

        assert queued_again(services, request_id) == []
        assert request(services, request_id).provision_attempts == 0

    def test_ends_provisioning_failed_with_the_reason_when_issuing_keeps_failing(
        self, services: Services
    ) -> None:
        # Given an approved request whose issuing keeps failing: each re-driven command is
        # dead-lettered in turn (here: never run), and the request stays approved
        max_attempts = services.settings.provisioning_max_attempts
        request_id = stuck_approved(services)
        for attempt in range(1, max_attempts + 1):
            sweep_stuck_provisioning(services)
            assert request(services, request_id).provision_attempts == attempt
            forget_commands(services, request_id)
            age(services, request_id)

        # When the sweep finds it stuck once more, its re-drives spent
        sweep_stuck_provisioning(services)

        # Then it ends provisioning_failed, with the sweep and the reason in its audit trail
        given_up = request(services, request_id)
        assert given_up.status is Status.PROVISIONING_FAILED
        last = given_up.history[-1]
        assert (last.from_status, last.to_status) == (Status.APPROVED, Status.PROVISIONING_FAILED)
        assert (last.actor_kind, last.actor_id) == (ActorKind.SYSTEM, "provisioning-sweep")
        assert last.reason.startswith(
            f"gave up: still approved with no credential after {max_attempts} re-drive(s)"
        )
        assert given_up.status_reason == last.reason
        # And no command was queued for it, and no later sweep touches it
        assert queued_again(services, request_id) == []
        age(services, request_id)
        sweep_stuck_provisioning(services)
        assert request(services, request_id).status is Status.PROVISIONING_FAILED
        assert queued_again(services, request_id) == []

        # And an operator's retry starts the count again
        handlers.retry_provisioning(
            commands.RetryProvisioning(request_id, operator="ops", reason="issuer fixed"), uow=services.uow()
        )
        retried = request(services, request_id)
        assert (retried.status, retried.provision_attempts) == (Status.APPROVED, 0)

    def test_skips_what_another_sweep_holds_instead_of_waiting_or_emitting_it_twice(
        self, services: Services
    ) -> None:
        # Given another replica's sweep, holding a stuck request in its open transaction
        request_id = stuck_approved(services)
        with services.uow() as other:
            held = other.requests.stuck_approved(before=utcnow(), limit=1000)
            assert request_id in {r.id for r in held}

            # When this replica's sweep runs meanwhile
            sweep_stuck_provisioning(services)

            # Then it did not wait, and left that request to the other
            assert queued_again(services, request_id) == []

        # And once the other is gone without committing, the next sweep takes it
        sweep_stuck_provisioning(services)
        assert len(queued_again(services, request_id)) == 1

    def test_two_sweeps_at_once_emit_each_command_once(self, services: Services) -> None:
        # Given several stuck requests
        request_ids = [stuck_approved(services) for _ in range(6)]

        # When two replicas sweep at the same moment, round after round
        for _ in range(5):
            together = threading.Barrier(2)
            failures: list[BaseException] = []

            def sweep(
                together: threading.Barrier = together, failures: list[BaseException] = failures
            ) -> None:
                together.wait(timeout=30)
                try:
                    sweep_stuck_provisioning(services)
                except BaseException as failure:  # reported by the test thread
                    failures.append(failure)

            threads = [threading.Thread(target=sweep) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert failures == []

        # Then each request's command was queued once, and its re-drive counted once
        for request_id in request_ids:
            assert len(queued_again(services, request_id)) == 1, request_id
            assert request(services, request_id).provision_attempts == 1
