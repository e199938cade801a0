"""Each handler reports what it did as an outcome (domain.outcomes), which infra logs as one line.

An outcome about a change is told only once its transaction commits; one about something
ignored or refused is told at once. No outcome carries a secret.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
import structlog

from domain import outcomes
from domain.commands import IssueCredentials, SendNotification
from domain.errors import PermanentDeliveryError
from domain.handlers import (
    decide,
    derived_id,
    issue_credentials,
    redrive_stuck_notifications,
    route_request,
    send_notification,
)
from domain.model import NotificationKind
from infra.logs import log_outcome
from tests.unit.fakes import (
    ADMIN_EMAILS,
    ADMIN_ID,
    FakeIssuer,
    FakeMailer,
    FakePortalSealer,
    FakeSealer,
    FakeUnitOfWork,
    make_decision,
    make_route_request,
)
from tests.unit.test_handlers import SIGNED, approved, later, pending_review, rejected, stuck_email


@pytest.fixture
def uow() -> FakeUnitOfWork:
    return FakeUnitOfWork()


def issue(uow: FakeUnitOfWork, issuer: FakeIssuer, request_id: str) -> None:
    issue_credentials(
        IssueCredentials(request_id),
        uow=uow,
        issuer=issuer,
        sealer=FakeSealer(),
        portal_sealer=FakePortalSealer(),
    )


def notify(uow: FakeUnitOfWork, mailer: FakeMailer, request_id: str, kind: NotificationKind) -> None:
    send_notification(SendNotification(request_id, kind), uow=uow, mailer=mailer, admin_emails=ADMIN_EMAILS)


class TestRoutingASubmission:
    @pytest.mark.parametrize(
        ("plan_id", "products", "outcome"),
        [
            ("free", ("payments",), "auto_approved"),
            ("partner", ("payments",), "pending_review"),
            ("free", ("identity",), "invalid"),
        ],
    )
    def test_tells_request_routed_with_its_outcome_and_ids(
        self, uow: FakeUnitOfWork, plan_id: str, products: tuple[str, ...], outcome: str
    ) -> None:
        # Given a submission from Acme's portal
        command = make_route_request(plan_id=plan_id, product_ids=products)

        # When it is routed
        route_request(command, uow=uow)

        # Then one request.routed is told, with the outcome and the request's ids
        [told] = uow.outcomes
        assert isinstance(told, outcomes.RequestRouted)
        assert (told.name, told.request_id, told.outcome) == ("request.routed", command.request_id, outcome)
        assert (told.portal_id, told.consumer_id, told.plan_id, told.app_id) == (
            "acme-portal",
            "acme",
            plan_id,
            "acme-web",
        )

    def test_a_second_delivery_tells_duplicate_ignored_and_no_second_routing(
        self, uow: FakeUnitOfWork
    ) -> None:
        command = make_route_request()
        route_request(command, uow=uow)

        route_request(command, uow=uow)

        assert uow.told == ["request.routed", "request.duplicate_ignored"]
        assert uow.outcomes[1] == outcomes.RequestDuplicateIgnored(
            command.request_id, "approved", concurrent=False
        )

    def test_a_routing_that_does_not_commit_tells_nothing(self, uow: FakeUnitOfWork) -> None:
        # Given a request routed within a transaction that is then left without a commit
        with uow:
            uow.record_outcome(
                outcomes.RequestRouted("r-1", "pending_review", None, "acme", "free", None, "")
            )

        # Then nothing was told: the change it speaks of never happened
        assert uow.outcomes == []


class TestDeciding:
    def test_an_applied_decision_tells_request_decided(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        command = make_decision(request_id, approve=True)

        decide(command, uow=uow, **SIGNED)  # type: ignore[arg-type]

        assert uow.outcomes[-1] == outcomes.RequestDecided(
            request_id=request_id,
            decision_id=command.decision_id,
            admin_id=ADMIN_ID,
            approve=True,
            outcome="applied",
            status="approved",
            reason="",
        )

    def test_a_decision_on_a_request_not_pending_tells_it_was_ignored_and_why(
        self, uow: FakeUnitOfWork
    ) -> None:
        request_id = rejected(uow, "no")
        command = make_decision(request_id, approve=True)

        decide(command, uow=uow, **SIGNED)  # type: ignore[arg-type]

        told = uow.outcomes[-1]
        assert isinstance(told, outcomes.RequestDecided)
        assert (told.outcome, told.status, told.reason) == (
            "ignored",
            "rejected",
            "request is rejected, not pending review",
        )

    def test_an_unsigned_decision_tells_decision_refused_at_warning(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        command = make_decision(request_id, key=None)

        decide(command, uow=uow, **SIGNED)  # type: ignore[arg-type]

        told = uow.outcomes[-1]
        assert isinstance(told, outcomes.DecisionRefused)
        assert (told.decision_id, told.request_id, told.level) == (command.decision_id, request_id, "warning")
        assert told.reason.startswith("rejected_auth: missing signature")
        assert "request.decided" not in uow.told[1:]

    def test_the_same_decision_twice_tells_duplicate_ignored(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        command = make_decision(request_id)
        decide(command, uow=uow, **SIGNED)  # type: ignore[arg-type]

        decide(command, uow=uow, **SIGNED)  # type: ignore[arg-type]

        assert uow.outcomes[-1] == outcomes.DecisionDuplicateIgnored(
            command.decision_id, request_id, concurrent=False
        )


class TestIssuingCredentials:
    def test_tells_credentials_issued_with_the_public_id_and_no_secret(self, uow: FakeUnitOfWork) -> None:
        request_id = approved(uow)
        issuer = FakeIssuer()

        issue(uow, issuer, request_id)

        told = uow.outcomes[-1]
        assert told == outcomes.CredentialsIssued(
            request_id=request_id,
            credential_id=derived_id("credential", request_id),
            public_id="key-1",
            app_id="acme-web",
            kind="api_key",
            portal_id="acme-portal",
        )
        assert issuer.secrets[0] not in repr(dataclasses.asdict(told))

    def test_a_refusing_issuer_tells_provisioning_failed_with_the_reason(self, uow: FakeUnitOfWork) -> None:
        request_id = approved(uow)
        issuer = FakeIssuer()
        issuer.refusal = "no room"

        issue(uow, issuer, request_id)

        assert uow.outcomes[-1] == outcomes.ProvisioningFailed(
            request_id, "the credential issuer refused: no room"
        )
        assert uow.outcomes[-1].level == "warning"

    def test_a_request_not_approved_tells_not_due(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)

        issue(uow, FakeIssuer(), request_id)

        assert uow.outcomes[-1] == outcomes.CredentialsNotDue(request_id, "pending_review")


class TestSendingEmails:
    def test_a_sent_email_tells_email_sent_with_its_message_id(self, uow: FakeUnitOfWork) -> None:
        request_id = rejected(uow, "no")

        notify(uow, FakeMailer(), request_id, NotificationKind.REJECT)

        told = uow.outcomes[-1]
        assert isinstance(told, outcomes.EmailSent)
        assert (told.name, told.request_id, told.kind, told.outcome, told.recipients, told.refused) == (
            "email.sent",
            request_id,
            "reject",
            "sent",
            1,
            0,
        )
        assert told.email_message_id == f"<reject.{request_id}@accessflow>"

    def test_a_partly_refused_email_tells_email_sent_partial(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        mailer = FakeMailer()
        mailer.refuse = {ADMIN_EMAILS[1]: "550 no such user"}

        notify(uow, mailer, request_id, NotificationKind.REVIEW)

        told = uow.outcomes[-1]
        assert isinstance(told, outcomes.EmailSent)
        assert (told.outcome, told.recipients, told.refused) == ("partial", 2, 1)

    def test_a_refused_email_tells_email_failed(self, uow: FakeUnitOfWork) -> None:
        request_id = rejected(uow, "no")
        mailer = FakeMailer()
        mailer.fail_next(PermanentDeliveryError, "550 mailbox unavailable")

        notify(uow, mailer, request_id, NotificationKind.REJECT)

        told = uow.outcomes[-1]
        assert isinstance(told, outcomes.EmailFailed)
        assert (told.name, told.reason, told.level) == ("email.failed", "550 mailbox unavailable", "warning")

    def test_an_email_about_no_request_tells_email_dropped(self, uow: FakeUnitOfWork) -> None:
        notify(uow, FakeMailer(), "no-such-request", NotificationKind.APPROVE)

        assert uow.outcomes == [outcomes.EmailDropped("no-such-request", "approve")]

    def test_the_stuck_email_sweep_tells_what_it_redrove(self, uow: FakeUnitOfWork) -> None:
        request_id = stuck_email(uow, FakeMailer())

        redrive_stuck_notifications(
            uow=uow, stale_after=timedelta(minutes=15), max_attempts=5, now=later(16 * 60)
        )

        assert uow.outcomes[-1] == outcomes.NotificationsRedriven(1, 0, (request_id,))


class TestLoggingAnOutcome:
    def test_is_one_line_named_by_the_outcome_with_its_fields(self) -> None:
        with structlog.testing.capture_logs() as logged:
            log_outcome(outcomes.CredentialsIssued("r-1", "c-1", "key-1", "app-1", "api_key", None))

        assert logged == [
            {
                "event": "credentials.issued",
                "log_level": "info",
                "request_id": "r-1",
                "credential_id": "c-1",
                "public_id": "key-1",
                "app_id": "app-1",
                "kind": "api_key",
                "portal_id": None,
            }
        ]

    def test_a_refusal_is_a_warning(self) -> None:
        with structlog.testing.capture_logs() as logged:
            log_outcome(outcomes.DecisionRefused("d-1", "r-1", "dana", "rejected_auth: bad signature"))

        assert [(line["event"], line["log_level"]) for line in logged] == [("decision.refused", "warning")]

    def test_every_outcome_has_a_dotted_name_and_only_plain_fields(self) -> None:
        for outcome in outcomes.Outcome.__subclasses__():
            assert "." in outcome.name, outcome
            for field in dataclasses.fields(outcome):
                assert "secret" not in field.name, (outcome, field.name)
