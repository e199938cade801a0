"""Review deadlines: parking sets the deadline, the sweep reminds, escalates and expires; through fakes."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

import pytest

from domain.commands import SendNotification
from domain.handlers import (
    decide,
    email_message_id,
    expire_reviews,
    operate_credentials,
    route_request,
    send_notification,
)
from domain.model import (
    REVIEW_SWEEP,
    AccessRequest,
    CredentialOperationKind,
    DecisionOutcome,
    DeliveryStatus,
    NotificationKind,
    Status,
)
from domain.notifications import ReviewDeadlineContext, ReviewExpiredContext
from tests.unit.fakes import (
    ACME_EMAIL,
    ADMIN_EMAILS,
    AUDIENCE,
    PARTNER,
    FakeIssuer,
    FakeMailer,
    FakePortalSealer,
    FakeSealer,
    FakeUnitOfWork,
    fake_verify,
    make_decision,
    make_route_request,
)
from tests.unit.test_credential_lifecycle import operation, provision

HOUR = timedelta(hours=1)
REMINDERS = [24 * HOUR, 4 * HOUR]
ESCALATION = 2 * HOUR
ESCALATION_EMAILS = ("head-of-api@accessflow.example",)


@pytest.fixture
def uow() -> FakeUnitOfWork:
    uow = FakeUnitOfWork()
    with uow:
        uow.catalogue.upsert(dataclasses.replace(PARTNER, id="timed", name="Timed", review_deadline_hours=72))
        uow.commit()
    return uow


def park(uow: FakeUnitOfWork, *, plan_id: str = "timed", default_hours: float | None = None) -> AccessRequest:
    command = make_route_request(plan_id=plan_id)
    assert route_request(command, uow=uow, review_deadline_hours=default_hours) is Status.PENDING_REVIEW
    request = uow.requests.saved(command.request_id)
    assert request is not None
    return request


def sweep(uow: FakeUnitOfWork, at: datetime) -> tuple[int, int, int]:
    return expire_reviews(uow=uow, reminder_points=REMINDERS, escalation_point=ESCALATION, now=lambda: at)


def emails_about(uow: FakeUnitOfWork, request_id: str) -> list[SendNotification]:
    return [c for c in uow.published if isinstance(c, SendNotification) and c.request_id == request_id]


class TestParking:
    def test_a_request_parked_under_a_plan_with_hours_gets_its_deadline(self, uow: FakeUnitOfWork) -> None:
        request = park(uow)
        assert request.review_deadline_at == request.updated_at + 72 * HOUR

    def test_a_plan_without_hours_takes_the_default(self, uow: FakeUnitOfWork) -> None:
        request = park(uow, plan_id="partner", default_hours=8)
        assert request.review_deadline_at == request.updated_at + 8 * HOUR

    def test_with_no_hours_anywhere_there_is_no_deadline_and_the_sweep_leaves_it(
        self, uow: FakeUnitOfWork
    ) -> None:
        request = park(uow, plan_id="partner")
        assert request.review_deadline_at is None
        assert sweep(uow, request.updated_at + 1000 * HOUR) == (0, 0, 0)
        saved = uow.requests.saved(request.id)
        assert saved is not None and saved.status is Status.PENDING_REVIEW


class TestTheSweep:
    def test_reminds_each_point_once_escalates_once_then_expires_and_tells_consumer_and_portal(
        self, uow: FakeUnitOfWork
    ) -> None:
        # Given a request parked with a deadline
        request = park(uow)
        deadline = request.review_deadline_at
        assert deadline is not None

        # When the sweep runs at chosen moments
        assert sweep(uow, deadline - 30 * HOUR) == (0, 0, 0)
        assert sweep(uow, deadline - 23 * HOUR) == (0, 1, 0)
        assert sweep(uow, deadline - 22 * HOUR) == (0, 0, 0)
        assert sweep(uow, deadline - 3 * HOUR) == (0, 1, 0)
        assert sweep(uow, deadline - HOUR) == (0, 0, 1)
        assert sweep(uow, deadline - HOUR / 2) == (0, 0, 0)
        assert sweep(uow, deadline) == (1, 0, 0)
        assert sweep(uow, deadline + HOUR) == (0, 0, 0)

        # Then the request is expired, by the sweep, with the reason
        saved = uow.requests.saved(request.id)
        assert saved is not None and saved.status is Status.EXPIRED
        assert saved.history[-1].actor_id == REVIEW_SWEEP
        assert "no review decision by the deadline" in saved.status_reason
        # And each email was queued once: two reminders, the escalation, the consumer's email
        kinds = [(e.kind, e.topic.split("/")[0]) for e in emails_about(uow, request.id)]
        assert kinds == [
            (NotificationKind.REVIEW, ""),
            (NotificationKind.REVIEW_REMINDER, "24h"),
            (NotificationKind.REVIEW_REMINDER, "4h"),
            (NotificationKind.REVIEW_ESCALATION, f"{deadline:%Y%m%dT%H%M%S}"),
            (NotificationKind.REVIEW_EXPIRED, ""),
        ]
        # And the portal heard the expiry, with its reason, last in the request's sequence
        told = [e for e in uow.outbox.events if e.request_id == request.id]
        assert [e.name for e in told] == [
            "access_request.submitted",
            "access_request.pending_review",
            "access_request.expired",
        ]
        assert told[-1].status == "expired"
        assert told[-1].reason == saved.status_reason
        assert [e.sequence for e in told] == [1, 2, 3]
        assert "requests.review_deadlines_swept" in uow.told

    def test_without_an_escalation_list_nothing_is_escalated(self, uow: FakeUnitOfWork) -> None:
        request = park(uow)
        assert request.review_deadline_at is not None
        moment = request.review_deadline_at - HOUR
        assert expire_reviews(uow=uow, reminder_points=[], escalation_point=None, now=lambda: moment) == (
            0,
            0,
            0,
        )

    def test_a_decision_after_the_expiry_is_recorded_as_ignored(self, uow: FakeUnitOfWork) -> None:
        # Given a request expired unreviewed
        request = park(uow)
        assert request.review_deadline_at is not None
        sweep(uow, request.review_deadline_at)

        # When an admin approves it late
        outcome = decide(make_decision(request.id), uow=uow, verify=lambda *_: True, audience="accessflow")

        # Then the decision is ignored, with the reason, and the request stays expired
        assert outcome is DecisionOutcome.IGNORED
        saved = uow.requests.saved(request.id)
        assert saved is not None and saved.status is Status.EXPIRED
        decisions = [d for d in uow.decisions._table.rows.values() if d.request_id == request.id]
        assert [d.outcome_reason for d in decisions] == ["request is expired, not pending review"]

    def test_a_request_decided_in_time_is_left_alone(self, uow: FakeUnitOfWork) -> None:
        request = park(uow)
        assert request.review_deadline_at is not None
        decide(make_decision(request.id), uow=uow, verify=lambda *_: True, audience="accessflow")
        assert sweep(uow, request.review_deadline_at + HOUR) == (0, 0, 0)
        saved = uow.requests.saved(request.id)
        assert saved is not None and saved.status is Status.APPROVED


class TestTheEmails:
    def send(
        self, uow: FakeUnitOfWork, mailer: FakeMailer, command: SendNotification
    ) -> DeliveryStatus | None:
        return send_notification(
            command, uow=uow, mailer=mailer, admin_emails=ADMIN_EMAILS, escalation_emails=ESCALATION_EMAILS
        )

    def test_reminders_go_to_the_admins_the_escalation_to_its_list_the_expiry_to_the_consumer(
        self, uow: FakeUnitOfWork
    ) -> None:
        request = park(uow)
        deadline = request.review_deadline_at
        assert deadline is not None
        for at in (deadline - 23 * HOUR, deadline - HOUR, deadline):
            sweep(uow, at)
        mailer = FakeMailer()
        for command in emails_about(uow, request.id)[1:]:
            assert self.send(uow, mailer, command) is DeliveryStatus.SENT

        # (an hour before the deadline, the 4-hour reminder is due along with the escalation)
        recipients = [(e.kind, e.to) for e in mailer.sent]
        assert recipients == [
            (NotificationKind.REVIEW_REMINDER, ADMIN_EMAILS),
            (NotificationKind.REVIEW_REMINDER, ADMIN_EMAILS),
            (NotificationKind.REVIEW_ESCALATION, ESCALATION_EMAILS),
            (NotificationKind.REVIEW_EXPIRED, (ACME_EMAIL,)),
        ]
        reminder, _, escalation, expired = (e.context for e in mailer.sent)
        assert isinstance(reminder, ReviewDeadlineContext) and isinstance(escalation, ReviewDeadlineContext)
        assert reminder.deadline == f"{deadline:%Y-%m-%d %H:%M} UTC"
        assert isinstance(expired, ReviewExpiredContext)
        assert expired.portal_name != ""
        # Each email has its own Message-ID: the reminders differ by topic
        assert len({e.message_id for e in mailer.sent}) == 4
        assert mailer.sent[0].message_id == email_message_id(
            request.id, NotificationKind.REVIEW_REMINDER, "accessflow", emails_about(uow, request.id)[1].topic
        )


class TestAPlanChangeParkedForReview:
    def test_gets_the_default_deadline_too(self, uow: FakeUnitOfWork) -> None:
        # Given an issued credential, and a plan change to a manual plan asked by an admin
        issuer = FakeIssuer()
        c = provision(uow, issuer)
        recorded = operate_credentials(
            operation(CredentialOperationKind.CHANGE_PLAN, c.id, plan_id="partner"),
            uow=uow,
            issuer=issuer,
            sealer=FakeSealer(),
            portal_sealer=FakePortalSealer(),
            verify=fake_verify,
            audience=AUDIENCE,
            review_deadline_hours=12,
        )

        # Then the plan-change request waits with the deployment's default deadline
        change_id = recorded.results[c.id].split()[3].rstrip(":")
        change = uow.requests.saved(change_id)
        assert change is not None and change.status is Status.PENDING_REVIEW
        assert change.review_deadline_at == change.updated_at + 12 * HOUR
