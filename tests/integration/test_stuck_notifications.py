"""Emails stuck in ``sending`` are re-driven through the outbox, and given up on after a while (issue 8).

An email whose worker died mid-send, and whose message was then dead-lettered, stayed in
``sending`` for ever. The rows here are written with old lease times, as such an email leaves
them; no test waits for a lease to run out.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from domain import commands, handlers
from domain.model import DeliveryStatus, Notification, NotificationKind, utcnow
from infra.bootstrap import Services
from infra.db import orm
from infra.messaging.lifecycle import sweep_stuck_notifications
from tests.conftest import ADMIN
from tests.integration.test_persistence import routed

pytestmark = pytest.mark.integration


def stuck(services: Services, *, lease_ended_ago: timedelta | None, attempts: int = 1) -> str:
    """A review email in ``sending`` whose lease ended ``lease_ended_ago`` (None: never leased, created
    that long ago); its request's id."""
    request_id = routed(services)
    # Its message is gone: the one routing queued is dropped from the outbox, as if long delivered.
    with services.engine.begin() as connection:
        rows = connection.execute(sa.select(orm.outbox.c.id, orm.outbox.c.payload)).all()
        gone = [row.id for row in rows if row.payload.get("request_id") == request_id]
        connection.execute(orm.outbox.delete().where(orm.outbox.c.id.in_(gone)))
    now = utcnow()
    with services.uow() as uow:
        uow.notifications.add(
            Notification(
                request_id=request_id,
                kind=NotificationKind.REVIEW,
                message_id=handlers.email_message_id(request_id, NotificationKind.REVIEW, "accessflow.local"),
                attempts=attempts,
                last_error="SMTP unreachable: ConnectionResetError",
                created_at=now - timedelta(hours=2),
                lease_expires_at=None if lease_ended_ago is None else now - lease_ended_ago,
            )
        )
        uow.commit()
    return request_id


def notification(services: Services, request_id: str) -> Notification:
    with services.uow() as uow:
        found = uow.notifications.get(request_id, NotificationKind.REVIEW)
    assert found is not None
    return found


def queued_again(services: Services, request_id: str) -> list[dict[str, object]]:
    """The SendNotification commands for ``request_id`` in the outbox."""
    with services.engine.connect() as connection:
        payloads = connection.execute(
            sa.select(orm.outbox.c.payload).where(orm.outbox.c.actor_name == "notifications.send")
        ).scalars()
        return [p for p in payloads if p.get("request_id") == request_id]


class TestTheSweep:
    def test_re_drives_an_email_whose_lease_ended_long_ago_through_the_outbox(
        self, services: Services
    ) -> None:
        # Given an email whose lease ended an hour ago (stale after 15 minutes), and one never leased
        request_id = stuck(services, lease_ended_ago=timedelta(hours=1))
        never_leased = stuck(services, lease_ended_ago=None)

        # When the sweep runs
        redriven, failed = sweep_stuck_notifications(services)

        # Then each is queued again, committed in the outbox, with the attempt counted
        assert redriven >= 2 and failed == 0
        for rid in (request_id, never_leased):
            [command] = queued_again(services, rid)
            assert (command["request_id"], command["kind"]) == (rid, "review")
            again = notification(services, rid)
            assert (again.status, again.attempts) == (DeliveryStatus.SENDING, 2)

        # And the next sweep leaves them alone: they are not stale again yet
        sweep_stuck_notifications(services)
        assert len(queued_again(services, request_id)) == 1

        # And the re-driven command sends the email
        sink_status = handlers.send_notification(
            commands.SendNotification(request_id, NotificationKind.REVIEW),
            uow=services.uow(),
            mailer=services.mailer,
            admin_emails=(ADMIN,),
            message_id_domain="accessflow.local",
        )
        assert sink_status is DeliveryStatus.SENT

    def test_leaves_alone_an_email_whose_retries_may_still_come(self, services: Services) -> None:
        request_id = stuck(services, lease_ended_ago=timedelta(minutes=1))

        sweep_stuck_notifications(services)

        assert queued_again(services, request_id) == []
        assert notification(services, request_id).attempts == 1

    def test_marks_failed_with_the_reason_an_email_out_of_attempts(self, services: Services) -> None:
        attempts = services.settings.notification_max_attempts
        request_id = stuck(services, lease_ended_ago=timedelta(hours=1), attempts=attempts)

        sweep_stuck_notifications(services)

        given_up = notification(services, request_id)
        assert given_up.status is DeliveryStatus.FAILED
        assert given_up.last_error == (
            f"gave up: stuck in sending after {attempts} attempt(s); "
            "last error: SMTP unreachable: ConnectionResetError"
        )
        assert queued_again(services, request_id) == []

    def test_skips_what_another_sweep_holds_instead_of_waiting_or_sending_it_twice(
        self, services: Services
    ) -> None:
        # Given another replica's sweep, holding a stuck email in its open transaction
        request_id = stuck(services, lease_ended_ago=timedelta(hours=1))
        with services.uow() as other:
            held = other.notifications.stuck(before=utcnow(), limit=1000)
            assert request_id in {n.request_id for n in held}

            # When this replica's sweep runs meanwhile
            sweep_stuck_notifications(services)

            # Then it did not wait, and left that email to the other
            assert queued_again(services, request_id) == []

        # And once the other is gone without committing, the next sweep takes it
        sweep_stuck_notifications(services)
        assert len(queued_again(services, request_id)) == 1
