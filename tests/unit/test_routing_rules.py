"""route_request with approval rules and throttles, on the fakes: what is read, stored, announced and queued."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from domain.commands import DecideRequest, IssueCredentials, OperateCredentials, SendNotification, Signature
from domain.handlers import decide, issue_credentials, operate_credentials, route_request
from domain.model import (
    AdminKey,
    AuthMethod,
    Credential,
    CredentialOperationKind,
    DecisionOutcome,
    NotificationKind,
    OperationTarget,
    Status,
    utcnow,
)
from domain.rules import parse_rules
from tests.unit.fakes import (
    ADMIN_ID,
    ADMIN_KEY,
    AUDIENCE,
    PARTNER,
    SUBMITTED_AT,
    FakeIssuer,
    FakePortalSealer,
    FakeSealer,
    FakeUnitOfWork,
    fake_signature,
    fake_verify,
    make_decision,
    make_route_request,
)


def uow_with(
    rules: list[dict[str, Any]] | None = None, *, max_open: int | None = None, max_per_hour: int | None = None
) -> FakeUnitOfWork:
    """The standard fakes, the manual plan "partner" given these rules and throttles."""
    uow = FakeUnitOfWork()
    with uow:
        uow.catalogue.upsert(
            dataclasses.replace(
                PARTNER,
                rules=parse_rules(rules or []),
                max_open_requests_per_consumer=max_open,
                max_requests_per_consumer_per_hour=max_per_hour,
            )
        )
        uow.commit()
    return uow


def routed(uow: FakeUnitOfWork, consumer_id: str = "acme") -> tuple[str, Status]:
    sender, portal = {"acme": ("portal-acme", "acme-portal"), "globex": ("portal-globex", "globex-portal")}[
        consumer_id
    ]
    command = make_route_request(
        plan_id="partner",
        consumer_id=consumer_id,
        app_id={"acme": "acme-web", "globex": "globex-app"}[consumer_id],
        portal_id=portal,
        sender=sender,
    )
    return command.request_id, route_request(command, uow=uow)


class TestAPlanWithoutRulesOrThrottles:
    def test_routes_with_no_extra_read(self) -> None:
        # Given the manual plan with neither / When a request is routed
        uow = uow_with()
        _, status = routed(uow)

        # Then it waits for review, and nothing was counted or looked up for rules
        assert status is Status.PENDING_REVIEW
        assert uow.requests.throttle_counts == 0
        assert uow.credentials.active_checks == 0


class TestARuleApproves:
    def test_credentials_are_ordered_and_the_portal_told_with_the_rule(self) -> None:
        # Given a manual plan trusting acme.example / When Acme's request is routed
        uow = uow_with([{"kind": "trusted_domain", "domains": ["acme.example"]}])
        request_id, status = routed(uow)

        # Then it is approved: credentials are ordered, and the portal hears which rule
        assert status is Status.APPROVED
        saved = uow.requests.saved(request_id)
        assert saved is not None
        assert saved.routed_by == "rule 1: email domain acme.example is trusted"
        assert uow.published == [IssueCredentials(request_id)]
        assert [(e.name, e.reason) for e in uow.outbox.events][-1] == (
            "access_request.approved",
            "rule 1: email domain acme.example is trusted",
        )

    def test_a_holder_of_an_active_credential_is_approved(self) -> None:
        # Given the rule, and an active credential of Acme's on the plan
        uow = uow_with([{"kind": "holds_active_credential"}])
        with uow:
            uow.credentials.add(
                Credential(
                    id="cred-1", request_id="old", app_id="acme-web", kind=AuthMethod.API_KEY, public_id="af_1",
                    secret_hash="h", sealed_secret=None, product_ids=["payments"], rate_limit_per_minute=1,
                    monthly_quota=None, plan_id="partner", consumer_id="acme",
                )
            )  # fmt: skip
            uow.commit()

        # When Acme asks, and Globex (who holds none) asks
        _, acme = routed(uow)
        _, globex = routed(uow, "globex")

        # Then Acme is approved by the rule, Globex waits; the lookup ran once per request
        assert (acme, globex) == (Status.APPROVED, Status.PENDING_REVIEW)
        assert uow.credentials.active_checks == 2


class TestARuleRejects:
    def test_the_consumer_is_emailed_the_rules_reason(self) -> None:
        # Given a plan refusing globex.example / When Globex asks
        uow = uow_with([{"kind": "rejected_domain", "domains": ["globex.example"], "reason": "Not here."}])
        request_id, status = routed(uow, "globex")

        # Then it is rejected with the rule's reason (which the reject email tells), the email is
        # ordered, and the portal hears the rule and its reason, as the audit trail has them
        assert status is Status.REJECTED
        saved = uow.requests.saved(request_id)
        assert saved is not None and saved.status_reason == "Not here."
        assert uow.published == [SendNotification(request_id, NotificationKind.REJECT)]
        assert [(e.name, e.reason) for e in uow.outbox.events][-1] == (
            "access_request.rejected",
            "rule 1: email domain globex.example is refused: Not here.",
        )


class TestAThrottle:
    @pytest.mark.parametrize(("max_open", "max_per_hour"), [(2, None), (None, 2)])
    def test_the_third_request_is_invalid_with_the_reason(
        self, max_open: int | None, max_per_hour: int | None
    ) -> None:
        # Given a plan allowing Acme 2 (open, or an hour)
        uow = uow_with(max_open=max_open, max_per_hour=max_per_hour)

        # When Acme asks three times, and Globex once
        statuses = [routed(uow)[1] for _ in range(3)]
        request_id = routed(uow)[0]
        _, globex = routed(uow, "globex")

        # Then two wait for review, the others are invalid and say why; Globex is not counted with Acme
        assert statuses == [Status.PENDING_REVIEW, Status.PENDING_REVIEW, Status.INVALID]
        saved = uow.requests.saved(request_id)
        assert saved is not None and saved.status is Status.INVALID
        assert saved.status_reason.startswith("throttled: consumer 'acme' ")
        assert [(e.name, e.reason) for e in uow.outbox.events][-3] == (
            "access_request.invalid",
            saved.status_reason,
        )
        assert globex is Status.PENDING_REVIEW


# --- N of M approvers, through decide ----------------------------------------------------------------

SECOND_KEY = AdminKey(
    key_id="erin-key-1", admin_id="erin", public_key="erin-public-key-1", created_at=SUBMITTED_AT
)
SIGNED: dict[str, Any] = {"verify": fake_verify, "audience": AUDIENCE}


def two_admins(required: int = 2, admins: list[str] | None = None) -> tuple[FakeUnitOfWork, str]:
    """A plan needing ``required`` approvals; admins "admin" and "erin" with keys; a request parked on it."""
    rule: dict[str, Any] = {"kind": "approvers", "required": required}
    if admins is not None:
        rule["admins"] = admins
    uow = uow_with([rule])
    with uow:
        uow.admin_keys.upsert_admin("erin", "erin@accessflow.example")
        uow.admin_keys.add_key(SECOND_KEY)
        uow.commit()
    request_id, status = routed(uow)
    assert status is Status.PENDING_REVIEW
    return uow, request_id


def by(admin: str, request_id: str, *, approve: bool = True) -> DecideRequest:
    key = ADMIN_KEY if admin == ADMIN_ID else SECOND_KEY
    return make_decision(request_id, approve=approve, admin_id=admin, key=key)


class TestTwoApprovers:
    def test_the_second_distinct_approval_approves_and_each_is_recorded(self) -> None:
        # Given a request needing 2 approvals
        uow, request_id = two_admins()

        # When the first admin approves / Then it is counted; nothing is issued yet
        assert decide(by(ADMIN_ID, request_id), uow=uow, **SIGNED) is DecisionOutcome.COUNTED
        saved = uow.requests.saved(request_id)
        assert saved is not None and saved.status is Status.PENDING_REVIEW
        assert not any(isinstance(c, IssueCredentials) for c in uow.published)

        # When the same admin approves again / Then it is ignored: counted once
        assert decide(by(ADMIN_ID, request_id), uow=uow, **SIGNED) is DecisionOutcome.IGNORED

        # When a second admin approves / Then the request is approved and credentials ordered
        assert decide(by("erin", request_id), uow=uow, **SIGNED) is DecisionOutcome.APPLIED
        saved = uow.requests.saved(request_id)
        assert saved is not None and saved.status is Status.APPROVED
        assert uow.published[-1] == IssueCredentials(request_id)
        # And every approval is in the audit trail on its own, and every decision recorded
        assert [(e.actor_id, e.to_status, e.reason) for e in saved.history[2:]] == [
            (ADMIN_ID, Status.PENDING_REVIEW, "approval 1 of 2: looks fine"),
            ("erin", Status.APPROVED, "approval 2 of 2: looks fine"),
        ]
        assert sorted(d.outcome.value for d in uow.decisions.saved_all()) == ["applied", "counted", "ignored"]

    def test_one_rejection_ends_it(self) -> None:
        # Given one approval counted
        uow, request_id = two_admins()
        decide(by(ADMIN_ID, request_id), uow=uow, **SIGNED)

        # When the other admin rejects / Then it is rejected, and a later approval is ignored
        assert decide(by("erin", request_id, approve=False), uow=uow, **SIGNED) is DecisionOutcome.APPLIED
        saved = uow.requests.saved(request_id)
        assert saved is not None and saved.status is Status.REJECTED
        assert decide(by("erin", request_id), uow=uow, **SIGNED) is DecisionOutcome.IGNORED

    def test_an_admin_not_listed_is_ignored_with_the_reason(self) -> None:
        # Given a request that only "erin" may approve
        uow, request_id = two_admins(required=1, admins=["erin"])

        # When another admin approves / Then ignored, saying why; erin's approval then applies
        assert decide(by(ADMIN_ID, request_id), uow=uow, **SIGNED) is DecisionOutcome.IGNORED
        ignored = uow.decisions.saved_all()[-1]
        assert ignored.outcome_reason == "admin 'admin' is not one of this request's approvers (erin)"
        assert decide(by("erin", request_id), uow=uow, **SIGNED) is DecisionOutcome.APPLIED


class TestAnAdminsPlanChange:
    def test_is_routed_by_the_new_plans_rules(self) -> None:
        # Given Acme's credential on "free", and "partner" approving holders of a credential on it
        uow = uow_with(
            [{"kind": "holds_active_credential"}, {"kind": "trusted_domain", "domains": ["acme.example"]}]
        )
        command = make_route_request(plan_id="free")
        route_request(command, uow=uow)
        credential = issue_credentials(
            IssueCredentials(command.request_id),
            uow=uow,
            issuer=FakeIssuer(),
            sealer=FakeSealer(),
            portal_sealer=FakePortalSealer(),
        )
        assert credential is not None

        # When an admin moves it to "partner"
        operation_id = str(uuid.uuid4())
        signed_bytes = f"{operation_id}|change_plan".encode()
        recorded = operate_credentials(
            OperateCredentials(
                operation_id=operation_id,
                operation=CredentialOperationKind.CHANGE_PLAN,
                target=OperationTarget.CREDENTIAL,
                target_id=credential.id,
                admin_id=ADMIN_ID,
                reason="upgrade",
                issued_at=utcnow(),
                signature=Signature(
                    ADMIN_KEY.key_id,
                    fake_signature(ADMIN_KEY.public_key, signed_bytes),
                    signed_bytes,
                    AUDIENCE,
                ),
                sender="admin-tool",
                plan_id="partner",
            ),
            uow=uow,
            issuer=FakeIssuer(),
            sealer=FakeSealer(),
            portal_sealer=FakePortalSealer(),
            verify=fake_verify,
            audience=AUDIENCE,
        )

        # Then the plan change is approved by rule 2 (Acme holds none on "partner" yet), as a request would be
        change_id = recorded.results[credential.id].split()[3].rstrip(":")
        assert recorded.results[credential.id].endswith("approved")
        saved = uow.requests.saved(change_id)
        assert saved is not None
        assert saved.routed_by == "rule 2: email domain acme.example is trusted"
        assert uow.credentials.active_checks == 1
