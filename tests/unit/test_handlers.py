"""The use cases in domain.handlers, driven through hand-written fakes of their ports."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from datetime import timedelta

import pytest

from domain import events
from domain.commands import IssueCredentials, RetryProvisioning, SendNotification
from domain.errors import IllegalTransition, NotFound, PermanentDeliveryError, TransientError
from domain.handlers import (
    decide,
    derived_id,
    follow_ups,
    issue_credentials,
    redrive_stuck_notifications,
    redrive_stuck_provisioning,
    retry_provisioning,
    route_request,
    send_notification,
)
from domain.model import (
    AccessRequest,
    ActorKind,
    AdminKey,
    AuthMethod,
    Credential,
    DecisionOutcome,
    DeliveryStatus,
    NotificationKind,
    Status,
    utcnow,
)
from domain.notifications import ApproveContext, ProductLine, RejectContext, ReviewContext
from domain.ports import Email, Sent
from tests.unit.fakes import (
    ACME_EMAIL,
    ADMIN_EMAIL,
    ADMIN_EMAILS,
    ADMIN_ID,
    ADMIN_KEY,
    AUDIENCE,
    SUBMITTED_AT,
    FakeIssuer,
    FakeMailer,
    FakePortalSealer,
    FakeSealer,
    FakeUnitOfWork,
    fake_verify,
    make_decision,
    make_route_request,
)

#: What every signed decision in these tests is checked with.
SIGNED: dict[str, object] = {"verify": fake_verify, "audience": AUDIENCE}


@pytest.fixture
def uow() -> FakeUnitOfWork:
    return FakeUnitOfWork()


@pytest.fixture
def issuer() -> FakeIssuer:
    return FakeIssuer()


@pytest.fixture
def sealer() -> FakeSealer:
    return FakeSealer()


@pytest.fixture
def mailer() -> FakeMailer:
    return FakeMailer()


# --- helpers: bring a request to a state through the handlers themselves ---------------------------


def submitted(uow: FakeUnitOfWork, **overrides: object) -> str:
    """Route a fresh submission (by default Acme's portal's, v2); return its request id."""
    command = make_route_request(**overrides)  # type: ignore[arg-type]
    route_request(command, uow=uow, accept_v1_submissions=command.portal_id is None)
    return command.request_id


#: A contract v1 submission: it names no portal, so no sender is checked and no event sent.
V1 = {"portal_id": None, "sender": None}


def pending_review(uow: FakeUnitOfWork, **overrides: object) -> str:
    return submitted(uow, plan_id="partner", **overrides)


def approved(uow: FakeUnitOfWork, *, plan_id: str = "free", **overrides: object) -> str:
    request_id = submitted(uow, plan_id=plan_id, **overrides)
    if plan_id != "free":
        decide(make_decision(request_id, approve=True), uow=uow, **SIGNED)
    return request_id


def provisioned(uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer, **overrides: object) -> str:
    request_id = approved(uow, **overrides)  # type: ignore[arg-type]
    issue_credentials(
        IssueCredentials(request_id), uow=uow, issuer=issuer, sealer=sealer, portal_sealer=FakePortalSealer()
    )
    return request_id


def rejected(uow: FakeUnitOfWork, reason: str) -> str:
    request_id = pending_review(uow)
    decide(make_decision(request_id, approve=False, reason=reason), uow=uow, **SIGNED)
    return request_id


def saved(uow: FakeUnitOfWork, request_id: str) -> AccessRequest:
    request = uow.requests.saved(request_id)
    assert request is not None, f"request {request_id} was never committed"
    return request


def saved_credential(uow: FakeUnitOfWork, request_id: str) -> Credential:
    credential = uow.credentials.saved(request_id)
    assert credential is not None, f"no credential committed for {request_id}"
    return credential


def notify(uow: FakeUnitOfWork, mailer: FakeMailer, request_id: str, kind: NotificationKind) -> object:
    return send_notification(
        SendNotification(request_id, kind), uow=uow, mailer=mailer, admin_emails=ADMIN_EMAILS
    )


# --- the fake unit of work itself ------------------------------------------------------------------


class TestTheFakeUnitOfWorkOnlyKeepsWhatWasCommitted:
    def test_work_left_uncommitted_is_neither_stored_nor_published(self, uow: FakeUnitOfWork) -> None:
        # Given a transaction that stores a request and queues a command, but never commits
        command = make_route_request()
        with uow:
            uow.requests.add(
                AccessRequest(
                    id=command.request_id,
                    consumer_id="acme",
                    plan_id="free",
                    product_ids=["payments"],
                    app_id="acme-web",
                    submitted_at=SUBMITTED_AT,
                )
            )
            uow.outbox.put(IssueCredentials(command.request_id))

        # Then nothing of it survives
        assert uow.committed is False
        assert uow.requests.saved(command.request_id) is None
        assert uow.published == []

    def test_commands_are_published_only_once_committed(self, uow: FakeUnitOfWork) -> None:
        # Given a transaction that queued a command
        with uow:
            uow.outbox.put(IssueCredentials("req-1"))
            # Then it is not published yet
            assert uow.published == []

            # When the transaction commits
            uow.commit()

        # Then it is published
        assert uow.committed is True
        assert uow.published == [IssueCredentials("req-1")]

    def test_changes_to_loaded_objects_are_lost_without_commit(self, uow: FakeUnitOfWork) -> None:
        # Given a committed request
        request_id = pending_review(uow)

        # When a transaction changes it but does not commit
        with uow:
            request = uow.requests.get(request_id)
            assert request is not None
            request.approve(admin_id=ADMIN_EMAIL, reason="forgot to commit")

        # Then the stored request is as it was
        assert saved(uow, request_id).status is Status.PENDING_REVIEW


# --- route_request ---------------------------------------------------------------------------------


class TestRoutingUnderAnAutoApprovePlan:
    def test_approves_and_publishes_issue_credentials_after_commit(self, uow: FakeUnitOfWork) -> None:
        # Given a submission for payments under the auto-approve "free" plan
        command = make_route_request(plan_id="free", product_ids=("payments", "ledger"))

        # When it is routed
        status = route_request(command, uow=uow)

        # Then it is approved, stored, and credentials are ordered once the work is committed
        assert status is Status.APPROVED
        request = saved(uow, command.request_id)
        assert request.status is Status.APPROVED
        assert request.auth_method is AuthMethod.API_KEY
        assert uow.committed is True
        assert uow.published == [IssueCredentials(command.request_id)]

    def test_stores_the_submission_and_the_approval_in_the_history(self, uow: FakeUnitOfWork) -> None:
        # Given / When an auto-approved submission is routed
        request_id = submitted(uow, plan_id="free")

        # Then its stored history holds the submission and the router's approval
        history = saved(uow, request_id).history
        assert [(e.from_status, e.to_status, e.actor_id) for e in history] == [
            (None, Status.SUBMITTED, "router"),
            (Status.SUBMITTED, Status.APPROVED, "router"),
        ]
        assert saved(uow, request_id).events == []


class TestRoutingUnderAManualPlan:
    def test_parks_for_review_and_asks_the_admins(self, uow: FakeUnitOfWork) -> None:
        # Given a submission under the manual "partner" plan
        command = make_route_request(plan_id="partner", product_ids=("identity",))

        # When it is routed
        status = route_request(command, uow=uow)

        # Then it waits for review and a review email is ordered
        assert status is Status.PENDING_REVIEW
        assert saved(uow, command.request_id).status is Status.PENDING_REVIEW
        assert uow.published == [SendNotification(command.request_id, NotificationKind.REVIEW)]


class TestRoutingAnInvalidRequest:
    def test_stores_it_as_invalid_with_the_reason_and_orders_nothing(self, uow: FakeUnitOfWork) -> None:
        # Given a submission mixing an API-key product with an OAuth2 one
        command = make_route_request(plan_id="partner", product_ids=("payments", "identity"))

        # When it is routed
        status = route_request(command, uow=uow)

        # Then it is kept as invalid, with the reason, and no command is published
        assert status is Status.INVALID
        request = saved(uow, command.request_id)
        assert request.status is Status.INVALID
        assert request.status_reason.startswith("products must share one authentication method")
        assert uow.published == []


class TestRoutingARequestForANewApp:
    def test_creates_the_app_for_the_consumer_with_an_id_derived_from_the_request(
        self, uow: FakeUnitOfWork
    ) -> None:
        # Given a submission that asks for a new app instead of naming one
        command = make_route_request(
            app_id=None, new_app_name="Acme Mobile", new_app_description="The iOS app."
        )

        # When it is routed
        route_request(command, uow=uow)

        # Then the app exists, owned by the consumer, and the request points at it
        app_id = derived_id("app", command.request_id)
        app = uow.catalogue.saved_app(app_id)
        assert app is not None
        assert (app.consumer_id, app.name, app.description) == ("acme", "Acme Mobile", "The iOS app.")
        assert saved(uow, command.request_id).app_id == app_id

    def test_a_redelivery_after_a_rollback_derives_the_same_app_id(self) -> None:
        # Given one submission for a new app, delivered to two fresh databases
        # (as a redelivery would find it after the first attempt rolled back)
        command = make_route_request(app_id=None, new_app_name="Acme Mobile")
        first, second = FakeUnitOfWork(), FakeUnitOfWork()

        # When both route it
        route_request(command, uow=first)
        route_request(command, uow=second)

        # Then both created the same app id, and another request would get another one
        assert saved(first, command.request_id).app_id == saved(second, command.request_id).app_id
        assert saved(first, command.request_id).app_id != derived_id("app", "another-request")

    def test_an_invalid_request_creates_no_app(self, uow: FakeUnitOfWork) -> None:
        # Given a submission for a new app under a plan that does not exist
        apps_before = uow.catalogue.saved_apps()
        command = make_route_request(plan_id="gold", app_id=None, new_app_name="Acme Mobile")

        # When it is routed
        status = route_request(command, uow=uow)

        # Then it is invalid and no app was created
        assert status is Status.INVALID
        assert uow.catalogue.saved_apps() == apps_before
        assert saved(uow, command.request_id).app_id is None

    def test_a_request_under_review_gets_its_app_only_when_an_admin_approves_it(
        self, uow: FakeUnitOfWork
    ) -> None:
        # Given a submission for a new app, parked for review
        request_id = pending_review(uow, app_id=None, new_app_name="Acme Mobile")
        app_id = derived_id("app", request_id)
        assert uow.catalogue.saved_app(app_id) is None
        assert saved(uow, request_id).app_id is None

        # When an admin approves it
        decide(make_decision(request_id, approve=True), uow=uow, **SIGNED)

        # Then the app exists now, in the same transaction as the approval
        app = uow.catalogue.saved_app(app_id)
        assert app is not None
        assert (app.consumer_id, app.name) == ("acme", "Acme Mobile")
        assert saved(uow, request_id).app_id == app_id

    def test_a_rejected_request_leaves_no_app(self, uow: FakeUnitOfWork) -> None:
        # Given a submission for a new app, parked for review
        apps_before = uow.catalogue.saved_apps()
        request_id = pending_review(uow, app_id=None, new_app_name="Acme Mobile")

        # When an admin rejects it
        decide(make_decision(request_id, approve=False, reason="no"), uow=uow, **SIGNED)

        # Then no app was ever created for it
        assert uow.catalogue.saved_apps() == apps_before
        assert saved(uow, request_id).app_id is None


class TestRoutingTheSameRequestTwice:
    def test_changes_nothing_and_publishes_nothing_more(self, uow: FakeUnitOfWork) -> None:
        # Given a submission that was already routed
        command = make_route_request(plan_id="free")
        route_request(command, uow=uow)
        stored_before = saved(uow, command.request_id)
        history_before = list(stored_before.history)
        published_before = list(uow.published)

        # When the same message is delivered again
        status = route_request(command, uow=uow)

        # Then the current status is reported and nothing else happens
        assert status is Status.APPROVED
        assert len(uow.requests) == 1
        assert saved(uow, command.request_id).history == history_before
        assert uow.published == published_before

    def test_a_different_body_under_the_same_id_is_ignored_too(self, uow: FakeUnitOfWork) -> None:
        # Given an approved submission
        request_id = submitted(uow, plan_id="free")

        # When a message with the same id but another plan arrives
        status = route_request(make_route_request(request_id=request_id, plan_id="partner"), uow=uow)

        # Then the stored request wins
        assert status is Status.APPROVED
        assert saved(uow, request_id).plan_id == "free"
        assert uow.published == [IssueCredentials(request_id)]


# --- decide ----------------------------------------------------------------------------------------


class TestAnAdminApprovingAPendingRequest:
    def test_applies_the_decision_and_orders_credentials(self, uow: FakeUnitOfWork) -> None:
        # Given a request waiting for review
        request_id = pending_review(uow)
        decision = make_decision(request_id, approve=True, reason="known partner")

        # When an admin approves it
        outcome = decide(decision, uow=uow, **SIGNED)

        # Then the decision is applied, recorded, and credentials are ordered
        assert outcome is DecisionOutcome.APPLIED
        request = saved(uow, request_id)
        assert request.status is Status.APPROVED
        last = request.history[-1]
        assert (last.actor_kind, last.actor_id, last.reason) == (
            ActorKind.ADMIN,
            ADMIN_ID,
            "known partner",
        )
        stored = uow.decisions.saved(decision.decision_id)
        assert stored is not None
        assert stored.outcome is DecisionOutcome.APPLIED
        assert uow.published[-1] == IssueCredentials(request_id)


class TestAnAdminRejectingAPendingRequest:
    def test_rejects_keeps_the_reason_and_orders_the_rejection_email(self, uow: FakeUnitOfWork) -> None:
        # Given a request waiting for review
        request_id = pending_review(uow)

        # When an admin rejects it with a reason
        outcome = decide(
            make_decision(request_id, approve=False, reason="no business case"),
            uow=uow,
            **SIGNED,
        )

        # Then it is rejected with that reason and the consumer is to be told
        assert outcome is DecisionOutcome.APPLIED
        request = saved(uow, request_id)
        assert request.status is Status.REJECTED
        assert request.status_reason == "no business case"
        assert uow.published[-1] == SendNotification(request_id, NotificationKind.REJECT)


class TestASecondDecisionOnTheSameRequest:
    def test_is_recorded_as_ignored_and_orders_nothing(self, uow: FakeUnitOfWork) -> None:
        # Given a request an admin already approved
        request_id = pending_review(uow)
        decide(make_decision(request_id, approve=True), uow=uow, **SIGNED)
        published_before = list(uow.published)

        # When another admin's rejection arrives
        second = make_decision(request_id, approve=False, reason="too late")
        outcome = decide(second, uow=uow, **SIGNED)

        # Then it is kept for the record, ignored, and nothing is ordered
        assert outcome is DecisionOutcome.IGNORED
        stored = uow.decisions.saved(second.decision_id)
        assert stored is not None
        assert stored.outcome is DecisionOutcome.IGNORED
        assert stored.outcome_reason == "request is approved, not pending review"
        assert saved(uow, request_id).status is Status.APPROVED
        assert uow.published == published_before


class TestTheSameDecisionDeliveredTwice:
    def test_stores_one_decision_and_applies_it_once(self, uow: FakeUnitOfWork) -> None:
        # Given an approval that was already applied
        request_id = pending_review(uow)
        decision = make_decision(request_id, approve=True)
        decide(decision, uow=uow, **SIGNED)

        # When the same message is delivered again
        outcome = decide(decision, uow=uow, **SIGNED)

        # Then it is ignored, stored once, and credentials were ordered once
        assert outcome is DecisionOutcome.IGNORED
        assert [d.id for d in uow.decisions.saved_all()] == [decision.decision_id]
        assert uow.decisions.saved_all()[0].outcome is DecisionOutcome.APPLIED
        assert uow.published.count(IssueCredentials(request_id)) == 1


def _refusal_cases() -> dict[str, tuple[dict[str, object], str]]:
    later = SUBMITTED_AT.replace(year=2030)
    revoked = AdminKey("revoked-key", ADMIN_ID, "revoked-public-key", SUBMITTED_AT, revoked_at=SUBMITTED_AT)
    someone_elses = AdminKey("other-key", "other-admin", "other-public-key", SUBMITTED_AT)
    return {
        "unsigned": ({"key": None}, "rejected_auth: missing signature"),
        "unknown key": (
            {"key": AdminKey("nobodys-key", ADMIN_ID, "x", SUBMITTED_AT)},
            "rejected_auth: unknown key 'nobodys-key'",
        ),
        "revoked key": ({"key": revoked}, "rejected_auth: key 'revoked-key' was revoked"),
        "another admin's key": (
            {"key": someone_elses},
            "rejected_auth: key 'other-key' is not admin 'admin'",
        ),
        "signed for another deployment": ({"audience": "staging"}, "rejected_auth: signed for 'staging'"),
        "stale": ({"decided_at": SUBMITTED_AT}, "rejected_auth: stale decision"),
        "from the future": ({"decided_at": later}, "rejected_auth: stale decision"),
        "from a portal's AMQP user": ({"sender": "portal-acme"}, "rejected_auth: decisions are not accepted"),
    }


class TestADecisionNotShownToComeFromAnAdmin:
    @pytest.mark.parametrize("case", list(_refusal_cases()))
    def test_is_refused_recorded_and_changes_nothing(self, uow: FakeUnitOfWork, case: str) -> None:
        overrides, expected_reason = _refusal_cases()[case]
        # Given a request waiting for review, and keys of two admins, one revoked
        request_id = pending_review(uow)
        uow.admin_keys.upsert_admin("other-admin", "other@accessflow.example")
        for key in (
            AdminKey("revoked-key", ADMIN_ID, "revoked-public-key", SUBMITTED_AT, revoked_at=SUBMITTED_AT),
            AdminKey("other-key", "other-admin", "other-public-key", SUBMITTED_AT),
        ):
            uow.admin_keys._keys.upsert(key.key_id, key)
        uow.admin_keys.commit()
        published_before = list(uow.published)

        # When a decision arrives that is not signed by an active key of the admin it names
        decision = make_decision(request_id, approve=True, **overrides)  # type: ignore[arg-type]
        outcome = decide(decision, uow=uow, **SIGNED)

        # Then the request is untouched, nothing is ordered, and the refusal is on record with why
        assert outcome is DecisionOutcome.REFUSED
        assert saved(uow, request_id).status is Status.PENDING_REVIEW
        assert uow.published == published_before
        stored = uow.decisions.saved(decision.decision_id)
        assert stored is not None
        assert stored.outcome is DecisionOutcome.REFUSED
        assert stored.outcome_reason.startswith(expected_reason), stored.outcome_reason

    def test_with_a_tampered_field_has_a_bad_signature(self, uow: FakeUnitOfWork) -> None:
        # Given an admin's signed rejection
        request_id = pending_review(uow)
        signed = make_decision(request_id, approve=False, reason="no")
        # When someone turns it into an approval, keeping the signature
        assert signed.signature is not None
        forged_bytes = signed.signature.signed_bytes.replace(b"False", b"True")
        forged = dataclasses.replace(
            signed, approve=True, signature=dataclasses.replace(signed.signature, signed_bytes=forged_bytes)
        )
        outcome = decide(forged, uow=uow, **SIGNED)

        # Then it is refused as badly signed
        assert outcome is DecisionOutcome.REFUSED
        stored = uow.decisions.saved(forged.decision_id)
        assert stored is not None and stored.outcome_reason == "rejected_auth: bad signature"
        assert saved(uow, request_id).status is Status.PENDING_REVIEW

    def test_replayed_after_being_applied_changes_nothing(self, uow: FakeUnitOfWork) -> None:
        # Given an approval that was applied
        request_id = pending_review(uow)
        decision = make_decision(request_id, approve=True)
        assert decide(decision, uow=uow, **SIGNED) is DecisionOutcome.APPLIED
        published_before = list(uow.published)

        # When the same signed message is replayed, even well within the allowed skew
        outcome = decide(decision, uow=uow, **SIGNED)

        # Then the decision id stops it
        assert outcome is DecisionOutcome.IGNORED
        assert uow.published == published_before

    def test_a_signed_decision_records_the_key_that_verified_it(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        decision = make_decision(request_id, approve=True)
        decide(decision, uow=uow, **SIGNED)
        stored = uow.decisions.saved(decision.decision_id)
        assert stored is not None and stored.key_id == ADMIN_KEY.key_id
        assert stored.admin_email == ADMIN_EMAIL


class TestADecisionAboutAnUnknownRequest:
    def test_is_recorded_as_ignored(self, uow: FakeUnitOfWork) -> None:
        # Given no request with this id
        decision = make_decision("no-such-request")

        # When an admin decides on it
        outcome = decide(decision, uow=uow, **SIGNED)

        # Then it is ignored, recorded, and nothing is ordered
        assert outcome is DecisionOutcome.IGNORED
        stored = uow.decisions.saved(decision.decision_id)
        assert stored is not None
        assert stored.outcome_reason == "no such request"
        assert uow.published == []


# --- issue_credentials -----------------------------------------------------------------------------


class TestIssuingCredentialsForAnApprovedRequest:
    @pytest.mark.parametrize(
        ("plan_id", "rate_limit", "quota"), [("free", 60, 10_000), ("partner", 600, None)]
    )
    def test_issues_one_credential_with_the_plans_limits(
        self,
        uow: FakeUnitOfWork,
        issuer: FakeIssuer,
        sealer: FakeSealer,
        plan_id: str,
        rate_limit: int,
        quota: int | None,
    ) -> None:
        # Given a request approved under the plan
        request_id = approved(uow, plan_id=plan_id, product_ids=("payments", "ledger"))

        # When its credentials are issued
        credential = issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )

        # Then one credential carries the plan's limits, for the request's app and products
        assert credential is not None
        assert len(issuer.issued) == 1
        stored = saved_credential(uow, request_id)
        assert (stored.rate_limit_per_minute, stored.monthly_quota) == (rate_limit, quota)
        assert stored.id == derived_id("credential", request_id)
        assert (stored.app_id, stored.kind, stored.public_id) == ("acme-web", AuthMethod.API_KEY, "key-1")
        assert stored.product_ids == ["payments", "ledger"]

    def test_of_a_v1_request_stores_the_secret_sealed_and_hashed_never_in_plaintext(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given / When an approved v1 request (no portal) gets its credentials
        request_id = provisioned(uow, issuer, sealer, **V1)

        # Then only the sealed secret and its hash are stored
        (secret,) = issuer.secrets
        stored = saved_credential(uow, request_id)
        assert stored.sealed_secret is not None
        assert stored.sealed_secret != secret.encode()
        assert secret.encode() not in stored.sealed_secret
        assert secret not in repr(stored)
        assert stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        # ... and the sealed secret opens to the issued one, exactly once
        assert stored.reveal(sealer.unseal) == secret
        assert stored.reveal(sealer.unseal) is None

    def test_of_a_portal_request_seals_the_secret_to_the_portal_and_keeps_no_copy(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given / When an approved request from Acme's portal gets its credentials
        request_id = provisioned(uow, issuer, sealer)

        # Then only the hash is stored: no copy for an operator to reveal
        (secret,) = issuer.secrets
        stored = saved_credential(uow, request_id)
        assert stored.sealed_secret is None
        assert stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        # And the portal hears of it, with the secret sealed to its own key
        issued = [e for e in uow.outbox.events if e.name == "credentials.issued"]
        assert len(issued) == 1
        assert issued[0].portal_id == "acme-portal"
        assert issued[0].details["sealed_secret"] == {
            "algorithm": "fake-box",
            "recipient_key": "acme-portal-public-key",
            "value": secret[::-1],
        }
        assert issued[0].details["credential"]["public_id"] == stored.public_id  # type: ignore[index]

    def test_provisions_the_request_and_orders_the_approval_email(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given an approved request
        request_id = approved(uow)

        # When its credentials are issued
        issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )

        # Then it is provisioned and the consumer is to be told
        request = saved(uow, request_id)
        assert request.status is Status.PROVISIONED
        assert request.history[-1].reason == f"credential {derived_id('credential', request_id)} issued"
        assert uow.published[-1] == SendNotification(request_id, NotificationKind.APPROVE)

    def test_a_new_app_gets_the_credential(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given / When a request for a new app is approved and provisioned
        request_id = provisioned(uow, issuer, sealer, app_id=None, new_app_name="Acme Mobile")

        # Then the credential belongs to the app created for it
        assert saved_credential(uow, request_id).app_id == derived_id("app", request_id)

    def test_an_oauth2_product_gets_a_client_credential(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given an approved request for the OAuth2 product
        request_id = approved(uow, plan_id="partner", product_ids=("identity",))

        # When its credentials are issued
        issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )

        # Then the credential is an OAuth2 client
        stored = saved_credential(uow, request_id)
        assert (stored.kind, stored.public_id) == (AuthMethod.OAUTH2_CLIENT_CREDENTIALS, "client-1")


class TestAProvisioningThatCannotSucceed:
    def issue(self, uow: FakeUnitOfWork, issuer: FakeIssuer, request_id: str) -> Credential | None:
        return issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=FakeSealer(),
            portal_sealer=FakePortalSealer(),
        )

    def test_a_plan_deleted_after_the_approval_fails_it_visibly_and_ends_the_message(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        # Given an approved request whose plan an operator then deleted
        request_id = approved(uow, plan_id="free")
        uow.catalogue.remove_plan("free")
        published_before = list(uow.published)

        # When the credentials worker handles it: no exception, so no retries and no dead letter
        assert self.issue(uow, issuer, request_id) is None

        # Then it waits in provisioning_failed with the reason, its portal told, nothing issued
        request = saved(uow, request_id)
        assert request.status is Status.PROVISIONING_FAILED
        assert request.status_reason == "plan 'free' no longer exists"
        assert issuer.issued == []
        assert uow.credentials.saved(request_id) is None
        assert uow.published == published_before
        told = [(e.name, e.status, e.reason) for e in uow.outbox.events if e.request_id == request_id]
        assert told[-1] == (
            "access_request.provisioning_failed",
            "provisioning_failed",
            "plan 'free' no longer exists",
        )

    def test_an_issuer_that_refuses_for_good_fails_it_with_the_issuers_reason(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        # Given an approved request, and an issuer that says no
        request_id = approved(uow)
        issuer.refusal = "the gateway has no room for another key"

        # When the credentials worker handles it
        assert self.issue(uow, issuer, request_id) is None

        # Then the request failed provisioning, saying why
        request = saved(uow, request_id)
        assert request.status is Status.PROVISIONING_FAILED
        assert (
            request.status_reason == "the credential issuer refused: the gateway has no room for another key"
        )

    def test_an_operator_retries_it_once_the_cause_is_fixed(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        # Given a request whose provisioning failed because the issuer refused
        request_id = approved(uow)
        issuer.refusal = "down for maintenance"
        self.issue(uow, issuer, request_id)

        # When the cause is fixed and an operator retries it
        issuer.refusal = None
        status = retry_provisioning(
            RetryProvisioning(request_id, operator="ops-alice", reason="gateway back"), uow=uow
        )

        # Then it is approved again in the operator's name, and its credentials are ordered anew
        assert status is Status.APPROVED
        last = saved(uow, request_id).history[-1]
        assert (last.actor_kind, last.actor_id, last.reason) == (
            ActorKind.OPERATOR,
            "ops-alice",
            "gateway back",
        )
        assert uow.published[-1] == IssueCredentials(request_id)
        assert [e.name for e in uow.outbox.events if e.request_id == request_id][
            -1
        ] == "access_request.approved"

        # And the credentials worker provisions it
        assert self.issue(uow, issuer, request_id) is not None
        assert saved(uow, request_id).status is Status.PROVISIONED

    def test_only_a_failed_provisioning_is_retried(self, uow: FakeUnitOfWork) -> None:
        # Given a request waiting for review, and no request at all
        request_id = pending_review(uow)

        # When an operator retries them, Then each is refused and nothing changes
        with pytest.raises(IllegalTransition, match="is pending_review"):
            retry_provisioning(RetryProvisioning(request_id, operator="ops", reason="r"), uow=uow)
        with pytest.raises(NotFound):
            retry_provisioning(RetryProvisioning("no-such-request", operator="ops", reason="r"), uow=uow)
        assert saved(uow, request_id).status is Status.PENDING_REVIEW


class TestIssuingCredentialsTwice:
    def test_the_second_call_issues_nothing(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given a request whose credentials were issued
        request_id = provisioned(uow, issuer, sealer)
        published_before = list(uow.published)
        credential_before = saved_credential(uow, request_id)

        # When the order is delivered again
        result = issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )

        # Then nothing is issued, stored or ordered
        assert result is None
        assert len(issuer.issued) == 1
        assert len(uow.credentials) == 1
        assert saved_credential(uow, request_id) == credential_before
        assert uow.published == published_before

    def test_a_credential_stored_before_a_crash_is_reused(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given an approved request that already has a credential stored
        request_id = approved(uow)
        with uow:
            uow.credentials.add(
                Credential(
                    id="cred-from-before",
                    request_id=request_id,
                    app_id="acme-web",
                    kind=AuthMethod.API_KEY,
                    public_id="key-0",
                    secret_hash="0" * 64,
                    sealed_secret=sealer.seal("secret-0"),
                    product_ids=["payments"],
                    rate_limit_per_minute=60,
                    monthly_quota=10_000,
                )
            )
            uow.commit()

        # When its credentials are issued
        credential = issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )

        # Then the stored one is used and no second one is made
        assert credential is not None
        assert credential.id == "cred-from-before"
        assert issuer.issued == []
        assert saved(uow, request_id).status is Status.PROVISIONED


class TestIssuingCredentialsForARequestThatIsNotApproved:
    @pytest.mark.parametrize(
        "make", [pending_review, lambda uow: rejected(uow, "no")], ids=["pending", "rejected"]
    )
    def test_issues_nothing(
        self,
        uow: FakeUnitOfWork,
        issuer: FakeIssuer,
        sealer: FakeSealer,
        make: Callable[[FakeUnitOfWork], str],
    ) -> None:
        # Given a request that is not approved
        request_id = make(uow)
        status_before = saved(uow, request_id).status
        published_before = list(uow.published)

        # When credentials are ordered for it
        result = issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )

        # Then nothing is issued, stored, changed or ordered
        assert result is None
        assert issuer.issued == []
        assert uow.credentials.saved(request_id) is None
        assert saved(uow, request_id).status is status_before
        assert uow.published == published_before

    def test_an_unknown_request_gets_nothing(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given / When credentials are ordered for a request that does not exist
        result = issue_credentials(
            IssueCredentials("no-such-request"),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )

        # Then nothing is issued
        assert result is None
        assert issuer.issued == []


# --- send_notification -----------------------------------------------------------------------------


class TestTheApprovalEmail:
    def test_goes_to_the_consumer_with_the_credentials_public_details(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer, mailer: FakeMailer
    ) -> None:
        # Given a provisioned request
        request_id = provisioned(uow, issuer, sealer, product_ids=("payments", "ledger"))

        # When the approval email is sent
        status = notify(uow, mailer, request_id, NotificationKind.APPROVE)

        # Then the consumer gets it, with the app, plan, limits and public id
        assert status is DeliveryStatus.SENT
        (email,) = mailer.sent
        assert email.kind is NotificationKind.APPROVE
        assert email.to == (ACME_EMAIL,)
        assert email.message_id == f"<approve.{request_id}@accessflow>"
        assert email.context == ApproveContext(
            request_id=request_id,
            consumer_name="Acme Developers",
            app_id="acme-web",
            app_name="Acme Web",
            plan_name="Free",
            products=(ProductLine("payments", "Payments API"), ProductLine("ledger", "Ledger API")),
            rate_limit_per_minute=60,
            monthly_quota=10_000,
            credential_kind="api_key",
            credential_public_id="key-1",
            portal_name="Acme Portal",
            portal_url="https://portal.acme.example",
        )

    def test_holds_no_secret(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer, mailer: FakeMailer
    ) -> None:
        # Given a provisioned request
        request_id = provisioned(uow, issuer, sealer)

        # When the approval email is sent
        notify(uow, mailer, request_id, NotificationKind.APPROVE)

        # Then neither the secret nor its sealed form appears anywhere in it
        (secret,) = issuer.secrets
        (email,) = mailer.sent
        assert secret not in repr(email)
        assert repr(sealer.seal(secret)) not in repr(email)
        assert saved_credential(uow, request_id).secret_hash not in repr(email)

    def test_is_recorded_as_sent(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer, mailer: FakeMailer
    ) -> None:
        # Given a provisioned request
        request_id = provisioned(uow, issuer, sealer)

        # When the approval email is sent
        notify(uow, mailer, request_id, NotificationKind.APPROVE)

        # Then the notification is stored as sent after one attempt
        notification = uow.notifications.saved(request_id, NotificationKind.APPROVE)
        assert notification is not None
        assert (notification.status, notification.attempts, notification.last_error) == (
            DeliveryStatus.SENT,
            1,
            "",
        )
        assert notification.sent_at is not None
        assert notification.message_id == f"<approve.{request_id}@accessflow>"


class TestTheRejectionEmail:
    def test_goes_to_the_consumer_with_the_admins_reason(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        # Given a request an admin rejected with a reason
        request_id = rejected(uow, "please use the sandbox first")

        # When the rejection email is sent
        notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then the consumer gets it with that reason
        (email,) = mailer.sent
        assert email.to == (ACME_EMAIL,)
        assert isinstance(email.context, RejectContext)
        assert email.context.reason == "please use the sandbox first"
        assert email.context.plan_name == "Partner"


class TestTheReviewEmail:
    def test_goes_to_the_configured_admins_with_the_justification(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        # Given a request for a new app waiting for review, with a justification
        request_id = pending_review(
            uow, app_id=None, new_app_name="Acme Mobile", justification="launching in May"
        )

        # When the review email is sent
        notify(uow, mailer, request_id, NotificationKind.REVIEW)

        # Then every configured admin gets it, with who asks for what and why
        (email,) = mailer.sent
        assert email.to == ADMIN_EMAILS
        assert email.context == ReviewContext(
            request_id=request_id,
            consumer_id="acme",
            consumer_name="Acme Developers",
            consumer_email=ACME_EMAIL,
            app_name="Acme Mobile",
            plan_name="Partner",
            products=(ProductLine("payments", "Payments API"),),
            justification="launching in May",
        )

    def test_with_no_admins_configured_nothing_is_sent_and_the_gap_is_recorded(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        # Given a request waiting for review and no admins configured
        request_id = pending_review(uow)

        # When the review email is sent
        status = send_notification(
            SendNotification(request_id, NotificationKind.REVIEW), uow=uow, mailer=mailer, admin_emails=()
        )

        # Then no email goes out, and the notification is failed with the reason, for an operator to see
        assert status is DeliveryStatus.FAILED
        assert mailer.attempts == 0
        notification = uow.notifications.saved(request_id, NotificationKind.REVIEW)
        assert notification is not None
        assert notification.last_error == "no recipients configured"


class TestANotificationAlreadySent:
    def test_is_not_sent_again(self, uow: FakeUnitOfWork, mailer: FakeMailer) -> None:
        # Given a rejection email that was sent
        request_id = rejected(uow, "no")
        notify(uow, mailer, request_id, NotificationKind.REJECT)

        # When the order to send it is delivered again
        status = notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then nothing more is sent or counted
        assert status is DeliveryStatus.SENT
        assert len(mailer.sent) == 1
        notification = uow.notifications.saved(request_id, NotificationKind.REJECT)
        assert notification is not None
        assert notification.attempts == 1
        assert len(uow.notifications) == 1


class TestATransientMailFailure:
    def test_propagates_and_leaves_the_notification_sending_with_the_attempt_counted(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        # Given a rejected request and a mail server that will say "try later" once
        request_id = rejected(uow, "no")
        mailer.fail_next(TransientError, "421 try again later")

        # When the rejection email is sent
        with pytest.raises(TransientError, match="421"):
            notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then it is still to be sent, and the attempt was counted
        notification = uow.notifications.saved(request_id, NotificationKind.REJECT)
        assert notification is not None
        assert (notification.status, notification.attempts) == (DeliveryStatus.SENDING, 1)
        assert mailer.sent == []

    def test_a_retry_sends_it_and_marks_it_sent(self, uow: FakeUnitOfWork, mailer: FakeMailer) -> None:
        # Given a rejection email whose first attempt failed for now
        request_id = rejected(uow, "no")
        mailer.fail_next(TransientError, "421 try again later")
        with pytest.raises(TransientError):
            notify(uow, mailer, request_id, NotificationKind.REJECT)

        # When it is retried
        status = notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then it is sent once, after two attempts, with the same Message-ID
        assert status is DeliveryStatus.SENT
        (email,) = mailer.sent
        assert email.message_id == f"<reject.{request_id}@accessflow>"
        notification = uow.notifications.saved(request_id, NotificationKind.REJECT)
        assert notification is not None
        assert (notification.status, notification.attempts) == (DeliveryStatus.SENT, 2)
        assert notification.sent_at is not None


class TestARedeliveryWhileTheFirstDeliveryIsStillSending:
    def test_backs_off_instead_of_sending_a_second_copy(self, uow: FakeUnitOfWork) -> None:
        # Given a mail server that, while it takes the first email, sees the same command redelivered
        request_id = rejected(uow, "no")
        redelivery: list[BaseException] = []

        class SlowMailer(FakeMailer):
            def send(self, email: Email) -> Sent:
                try:
                    notify(uow, self, request_id, NotificationKind.REJECT)
                except TransientError as busy:
                    redelivery.append(busy)
                return super().send(email)

        mailer = SlowMailer()

        # When the first delivery completes
        status = notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then the redelivery stood back, and exactly one email went out
        assert status is DeliveryStatus.SENT
        assert len(mailer.sent) == 1
        assert [str(e) for e in redelivery] == [
            f"reject email for {request_id} is being sent by another worker"
        ]

    def test_the_lease_taken_is_the_mailers_from_the_email_settings(self, uow: FakeUnitOfWork) -> None:
        # Given a mailer whose lease (ACCESSFLOW_EMAIL_LEASE_SECONDS) is five minutes, which dies mid-send
        request_id = rejected(uow, "no")

        class DyingMailer(FakeMailer):
            def send(self, email: Email) -> Sent:
                raise SystemExit("the worker died")

        started = utcnow()
        with pytest.raises(SystemExit):
            send_notification(
                SendNotification(request_id, NotificationKind.REJECT),
                uow=uow,
                mailer=DyingMailer(lease=timedelta(minutes=5)),
                admin_emails=ADMIN_EMAILS,
            )

        # Then the email is held for the mailer's lease, with no lease passed by the caller
        notification = uow.notifications.saved(request_id, NotificationKind.REJECT)
        assert notification is not None and notification.lease_expires_at is not None
        held = notification.lease_expires_at - started
        assert timedelta(minutes=5) <= held < timedelta(minutes=5, seconds=5)

    def test_a_crashed_sender_is_taken_over_once_its_lease_has_run_out(self, uow: FakeUnitOfWork) -> None:
        # Given an attempt whose sender died mid-send, with a lease of no length
        request_id = rejected(uow, "no")

        class DyingMailer(FakeMailer):
            def send(self, email: Email) -> Sent:
                raise SystemExit("the worker died")

        with pytest.raises(SystemExit):
            send_notification(
                SendNotification(request_id, NotificationKind.REJECT),
                uow=uow,
                mailer=DyingMailer(lease=timedelta(0)),
                admin_emails=ADMIN_EMAILS,
            )

        # When the command is redelivered
        mailer = FakeMailer()
        status = notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then the email goes out: at least once, even when the first sender vanished
        assert status is DeliveryStatus.SENT
        assert len(mailer.sent) == 1


class TestAPermanentMailFailure:
    def test_marks_the_notification_failed_without_raising(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        # Given a rejected request and a mail server that refuses the recipient for good
        request_id = rejected(uow, "no")
        mailer.fail_next(PermanentDeliveryError, "550 no such user")

        # When the rejection email is sent
        status = notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then the failure is recorded, not raised
        assert status is DeliveryStatus.FAILED
        notification = uow.notifications.saved(request_id, NotificationKind.REJECT)
        assert notification is not None
        assert (notification.status, notification.last_error) == (DeliveryStatus.FAILED, "550 no such user")
        assert notification.sent_at is None

    def test_is_never_retried(self, uow: FakeUnitOfWork, mailer: FakeMailer) -> None:
        # Given a rejection email the server refused for good
        request_id = rejected(uow, "no")
        mailer.fail_next(PermanentDeliveryError, "550 no such user")
        notify(uow, mailer, request_id, NotificationKind.REJECT)

        # When the order to send it is delivered again
        status = notify(uow, mailer, request_id, NotificationKind.REJECT)

        # Then the server is not asked again
        assert status is DeliveryStatus.FAILED
        assert mailer.attempts == 1


class TestARecipientRefusedWhileOthersAreTaken:
    def test_is_recorded_as_partial_with_who_was_refused(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        # Given a review email to two admins, and a server that refuses the second of them
        request_id = pending_review(uow)
        mailer.refuse = {ADMIN_EMAILS[1]: "550 5.1.1 no such user"}

        # When it is sent
        status = notify(uow, mailer, request_id, NotificationKind.REVIEW)

        # Then it is not recorded as sent: partial, naming the refused recipient and the reply
        assert status is DeliveryStatus.PARTIAL
        notification = uow.notifications.saved(request_id, NotificationKind.REVIEW)
        assert notification is not None
        assert notification.status is DeliveryStatus.PARTIAL
        assert notification.last_error == (
            f"1 of 2 recipients refused: {ADMIN_EMAILS[1]} (550 5.1.1 no such user)"
        )
        assert notification.sent_at is not None and notification.lease_expires_at is None

    def test_is_not_sent_again_on_a_redelivery(self, uow: FakeUnitOfWork, mailer: FakeMailer) -> None:
        request_id = pending_review(uow)
        mailer.refuse = {ADMIN_EMAILS[1]: "550 5.1.1 no such user"}
        notify(uow, mailer, request_id, NotificationKind.REVIEW)

        assert notify(uow, mailer, request_id, NotificationKind.REVIEW) is DeliveryStatus.PARTIAL
        assert mailer.attempts == 1


def stuck_email(uow: FakeUnitOfWork, mailer: FakeMailer) -> str:
    """A rejection email whose send failed transiently, and whose message then went away."""
    request_id = rejected(uow, "no")
    mailer.fail_next(TransientError, "451 try later")
    with pytest.raises(TransientError):
        notify(uow, mailer, request_id, NotificationKind.REJECT)
    uow.outbox.published.clear()
    return request_id


def later(seconds: float) -> Callable[[], object]:
    return lambda: utcnow() + timedelta(seconds=seconds)


class TestAnEmailStuckInSending:
    def test_is_left_alone_while_its_retries_may_still_come(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        stuck_email(uow, mailer)

        assert redrive_stuck_notifications(
            uow=uow, stale_after=timedelta(minutes=15), max_attempts=5, now=later(60)
        ) == (0, 0)
        assert uow.published == []

    def test_is_sent_again_through_the_outbox_once_stale(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        # Given an email whose last attempt ended long ago, still sending
        request_id = stuck_email(uow, mailer)

        # When the sweep runs, with a clock past the stale time
        result = redrive_stuck_notifications(
            uow=uow, stale_after=timedelta(minutes=15), max_attempts=5, now=later(16 * 60)
        )

        # Then its command is queued again, committed, with the attempt counted
        assert result == (1, 0)
        assert uow.published == [SendNotification(request_id, NotificationKind.REJECT)]
        notification = uow.notifications.saved(request_id, NotificationKind.REJECT)
        assert notification is not None
        assert (notification.status, notification.attempts) == (DeliveryStatus.SENDING, 2)
        # And it is not re-driven again at once
        assert redrive_stuck_notifications(
            uow=uow, stale_after=timedelta(minutes=15), max_attempts=5, now=later(16 * 60)
        ) == (0, 0)

    def test_ends_failed_with_the_reason_after_the_last_attempt(
        self, uow: FakeUnitOfWork, mailer: FakeMailer
    ) -> None:
        request_id = stuck_email(uow, mailer)
        results = [
            redrive_stuck_notifications(
                uow=uow, stale_after=timedelta(minutes=15), max_attempts=3, now=later(16 * 60 * (n + 1))
            )
            for n in range(4)
        ]

        assert results == [(1, 0), (1, 0), (0, 1), (0, 0)]
        notification = uow.notifications.saved(request_id, NotificationKind.REJECT)
        assert notification is not None
        assert notification.status is DeliveryStatus.FAILED
        assert (
            notification.last_error
            == "gave up: stuck in sending after 3 attempt(s); last error: 451 try later"
        )
        assert notify(uow, mailer, request_id, NotificationKind.REJECT) is DeliveryStatus.FAILED


def stuck_approval(uow: FakeUnitOfWork) -> str:
    """An approved request whose IssueCredentials was dead-lettered: it stays approved."""
    request_id = approved(uow)
    uow.outbox.published.clear()
    return request_id


class TestARequestStuckInApproved:
    def test_is_left_alone_while_its_command_may_still_come(self, uow: FakeUnitOfWork) -> None:
        stuck_approval(uow)

        assert redrive_stuck_provisioning(
            uow=uow, stale_after=timedelta(minutes=15), max_attempts=3, now=later(60)
        ) == (0, 0)
        assert uow.published == []

    def test_has_its_credentials_issued_again_through_the_outbox_once_stale(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, sealer: FakeSealer
    ) -> None:
        # Given an approved request whose command went away long ago
        request_id = stuck_approval(uow)

        # When the sweep runs, with a clock past the stale time
        result = redrive_stuck_provisioning(
            uow=uow, stale_after=timedelta(minutes=15), max_attempts=3, now=later(16 * 60)
        )

        # Then its command is queued again, committed, with the re-drive counted
        assert result == (1, 0)
        assert uow.published == [IssueCredentials(request_id)]
        assert (saved(uow, request_id).status, saved(uow, request_id).provision_attempts) == (
            Status.APPROVED,
            1,
        )
        # And it is not re-driven again at once
        assert redrive_stuck_provisioning(
            uow=uow, stale_after=timedelta(minutes=15), max_attempts=3, now=later(16 * 60)
        ) == (0, 0)
        # And the command provisions it
        issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=FakePortalSealer(),
        )
        assert saved(uow, request_id).status is Status.PROVISIONED

    def test_ends_provisioning_failed_with_the_reason_after_the_last_re_drive(
        self, uow: FakeUnitOfWork
    ) -> None:
        request_id = stuck_approval(uow)
        results = [
            redrive_stuck_provisioning(
                uow=uow, stale_after=timedelta(minutes=15), max_attempts=2, now=later(16 * 60 * (n + 1))
            )
            for n in range(4)
        ]

        assert results == [(1, 0), (1, 0), (0, 1), (0, 0)]
        request = saved(uow, request_id)
        assert request.status is Status.PROVISIONING_FAILED
        last = request.history[-1]
        assert (last.actor_kind, last.actor_id) == (ActorKind.SYSTEM, "provisioning-sweep")
        assert last.reason.startswith("gave up: still approved with no credential after 2 re-drive(s)")
        told = [(e.name, e.reason) for e in uow.outbox.events if e.request_id == request_id]
        assert told[-1] == ("access_request.provisioning_failed", last.reason)
        assert uow.told[-2:] == ["provisioning.failed", "provisioning.redriven"]


class TestANotificationForAnUnknownRequest:
    def test_is_dropped(self, uow: FakeUnitOfWork, mailer: FakeMailer) -> None:
        # Given / When an email is ordered about a request that does not exist
        status = notify(uow, mailer, "no-such-request", NotificationKind.APPROVE)

        # Then nothing is sent or stored
        assert status is None
        assert mailer.attempts == 0
        assert len(uow.notifications) == 0


# --- follow-ups ------------------------------------------------------------------------------------


class TestEachEventCallsForItsFollowUp:
    @pytest.mark.parametrize(
        ("event", "expected"),
        [
            (events.RequestApproved("r", automatically=True), [IssueCredentials("r")]),
            (events.RequestApproved("r", automatically=False), [IssueCredentials("r")]),
            (events.RequestParkedForReview("r"), [SendNotification("r", NotificationKind.REVIEW)]),
            (events.RequestRejected("r", "no"), [SendNotification("r", NotificationKind.REJECT)]),
            (events.CredentialsProvisioned("r", "c"), [SendNotification("r", NotificationKind.APPROVE)]),
            (events.RequestInvalidated("r", "bad"), []),
        ],
        ids=["auto-approved", "approved-by-admin", "parked", "rejected", "provisioned", "invalidated"],
    )
    def test_maps_the_event_to_commands(self, event: events.Event, expected: list[object]) -> None:
        # Given an event / When its follow-ups are asked for / Then they are the expected commands
        assert follow_ups(event) == expected
