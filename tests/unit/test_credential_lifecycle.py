"""A credential after issue: the domain's rules, and the handlers driven through fakes of their ports."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from domain.commands import (
    IssueCredentials,
    OperateCredentials,
    PushCredentialChange,
    SendNotification,
    Signature,
)
from domain.errors import IllegalTransition
from domain.handlers import decide, expire_credentials, issue_credentials, operate_credentials, route_request
from domain.model import (
    ActorKind,
    Attribution,
    AuthMethod,
    Credential,
    CredentialOperationKind,
    CredentialStatus,
    DecisionOutcome,
    NotificationKind,
    OperationTarget,
    Plan,
    RequestKind,
    Status,
    utcnow,
)
from tests.unit.fakes import (
    ADMIN_ID,
    ADMIN_KEY,
    AUDIENCE,
    FakeIssuer,
    FakePortalSealer,
    FakeSealer,
    FakeUnitOfWork,
    fake_signature,
    fake_verify,
    make_decision,
    make_route_request,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=utcnow().tzinfo)
GOLD = Plan(
    id="gold",
    name="Gold",
    auto_approve=True,
    rate_limit_per_minute=1200,
    monthly_quota=None,
    product_ids=["payments", "ledger"],
)
TRIAL = Plan(
    id="trial",
    name="Trial",
    auto_approve=True,
    rate_limit_per_minute=10,
    monthly_quota=100,
    product_ids=["payments", "ledger"],
    credential_lifetime_days=30,
)
POINTS = [timedelta(days=14), timedelta(days=3)]


@pytest.fixture
def uow() -> FakeUnitOfWork:
    uow = FakeUnitOfWork()
    with uow:
        uow.catalogue.upsert(GOLD)
        uow.catalogue.upsert(TRIAL)
        uow.commit()
    return uow


@pytest.fixture
def issuer() -> FakeIssuer:
    return FakeIssuer()


def provision(
    uow: FakeUnitOfWork, issuer: FakeIssuer, *, plan_id: str = "free", **overrides: object
) -> Credential:
    """A request of Acme's, routed (auto-approved), its credential issued; the stored credential."""
    command = make_route_request(plan_id=plan_id, **overrides)  # type: ignore[arg-type]
    route_request(command, uow=uow, accept_v1_submissions=command.portal_id is None)
    credential = issue_credentials(
        IssueCredentials(command.request_id),
        uow=uow,
        issuer=issuer,
        sealer=FakeSealer(),
        portal_sealer=FakePortalSealer(),
        now=lambda: NOW,
    )
    assert credential is not None
    return credential


def operation(
    kind: CredentialOperationKind,
    target_id: str,
    *,
    target: OperationTarget = OperationTarget.CREDENTIAL,
    signed: bool = True,
    sender: str | None = "admin-tool",
    **extra: object,
) -> OperateCredentials:
    operation_id = str(uuid.uuid4())
    signed_bytes = f"{operation_id}|{kind}|{target}|{target_id}".encode()
    signature = (
        Signature(
            ADMIN_KEY.key_id, fake_signature(ADMIN_KEY.public_key, signed_bytes), signed_bytes, AUDIENCE
        )
        if signed
        else None
    )
    return OperateCredentials(
        operation_id=operation_id,
        operation=kind,
        target=target,
        target_id=target_id,
        admin_id=ADMIN_ID,
        reason="because",
        issued_at=utcnow(),
        signature=signature,
        sender=sender,
        **extra,  # type: ignore[arg-type]
    )


def operate(
    uow: FakeUnitOfWork, issuer: FakeIssuer, command: OperateCredentials, *, gateway: bool = False
) -> dict[str, str]:
    recorded = operate_credentials(
        command,
        uow=uow,
        issuer=issuer,
        sealer=FakeSealer(),
        portal_sealer=FakePortalSealer(),
        verify=fake_verify,
        audience=AUDIENCE,
        gateway_configured=gateway,
    )
    return recorded.results


def saved(uow: FakeUnitOfWork, credential: Credential) -> Credential:
    found = uow.credentials.saved_by_id(credential.id)
    assert found is not None
    return found


# --- the domain ---------------------------------------------------------------------------------------


def credential(**overrides: object) -> Credential:
    values: dict[str, object] = {
        "id": "c1",
        "request_id": "r1",
        "app_id": "acme-web",
        "kind": AuthMethod.API_KEY,
        "public_id": "key-1",
        "secret_hash": "h1",
        "sealed_secret": None,
        "product_ids": ["payments"],
        "rate_limit_per_minute": 60,
        "monthly_quota": None,
    }
    values.update(overrides)
    return Credential(**values)  # type: ignore[arg-type]


BY_DANA = Attribution(NOW, ActorKind.ADMIN, "dana", "why")


class TestTheCredentialItself:
    def test_after_a_rotation_with_grace_each_secret_verifies_under_its_own_id_until_the_grace_ends(
        self,
    ) -> None:
        c = credential()
        c.rotate(public_id="key-2", secret_hash="h2", grace=timedelta(hours=1), by=BY_DANA)
        assert c.hashes_for("key-2", NOW) == ["h2"]
        assert c.hashes_for("key-1", NOW + timedelta(minutes=59)) == ["h1"]
        assert c.hashes_for("key-1", NOW + timedelta(hours=1)) == []
        assert c.revision == 2

    def test_an_oauth2_client_keeps_its_id_and_both_secrets_verify_under_it_in_the_grace(self) -> None:
        c = credential(kind=AuthMethod.OAUTH2_CLIENT_CREDENTIALS, public_id="client-1")
        c.rotate(public_id="client-1", secret_hash="h2", grace=timedelta(hours=1), by=BY_DANA)
        assert c.hashes_for("client-1", NOW) == ["h2", "h1"]
        assert c.hashes_for("client-1", NOW + timedelta(hours=2)) == ["h2"]

    def test_without_grace_the_previous_secret_is_forgotten(self) -> None:
        c = credential()
        c.rotate(public_id="key-2", secret_hash="h2", grace=timedelta(0), by=BY_DANA)
        assert (c.previous_public_id, c.previous_secret_hash, c.previous_valid_until) == (None, None, None)

    @pytest.mark.parametrize(
        "status", [CredentialStatus.SUSPENDED, CredentialStatus.REVOKED, CredentialStatus.EXPIRED]
    )
    def test_nothing_of_a_credential_that_is_not_active_verifies(self, status: CredentialStatus) -> None:
        assert credential(status=status).hashes_for("key-1", NOW) == []

    def test_nothing_verifies_from_its_expiry_on(self) -> None:
        c = credential(expires_at=NOW)
        assert c.hashes_for("key-1", NOW - timedelta(microseconds=1)) == ["h1"]
        assert c.hashes_for("key-1", NOW) == []

    def test_a_revoked_credential_cannot_be_resumed_rotated_or_suspended(self) -> None:
        c = credential()
        c.revoke(BY_DANA)
        for change in (c.resume, c.suspend, c.revoke):
            with pytest.raises(IllegalTransition):
                change(BY_DANA)
        with pytest.raises(IllegalTransition):
            c.rotate(public_id="k", secret_hash="h", grace=timedelta(0), by=BY_DANA)

    def test_notices_are_due_once_each_and_a_late_first_look_skips_the_far_ones(self) -> None:
        c = credential(expires_at=NOW + timedelta(days=30))
        assert c.notices_due(POINTS, NOW) == []
        assert c.notices_due(POINTS, NOW + timedelta(days=17)) == [timedelta(days=14)]
        c.note_expiry_notice([timedelta(days=14)], now=NOW)
        assert c.notices_due(POINTS, NOW + timedelta(days=17)) == []
        # First seen 2 days before the end: both points are reached; one notice, both recorded
        late = credential(expires_at=NOW + timedelta(days=2))
        due = late.notices_due(POINTS, NOW)
        assert due == [timedelta(days=14), timedelta(days=3)]
        change = late.note_expiry_notice(due, now=NOW)
        assert late.expiry_notices == "14d,3d" and "(3d notice)" in change.reason

    def test_a_new_expiry_date_starts_the_notices_again(self) -> None:
        c = credential(expires_at=NOW + timedelta(days=2), expiry_notices="14d,3d")
        c.set_expiry(NOW + timedelta(days=60), BY_DANA)
        assert c.expiry_notices == "" and c.notices_due(POINTS, NOW + timedelta(days=50)) == [
            timedelta(days=14)
        ]


# --- the handlers -------------------------------------------------------------------------------------


class TestIssue:
    def test_a_credential_carries_its_plan_its_consumer_and_the_plans_lifetime(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer, plan_id="trial")
        stored = saved(uow, c)
        assert (stored.plan_id, stored.consumer_id) == ("trial", "acme")
        assert stored.expires_at == NOW + timedelta(days=30)
        assert [change.change.value for change in uow.credentials.trail] == ["issued"]


class TestOperations:
    def test_revoke_by_consumer_reaches_every_credential_of_the_consumer_and_tells_each_portal_event(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        first, second = provision(uow, issuer), provision(uow, issuer)
        results = operate(
            uow, issuer, operation(CredentialOperationKind.REVOKE, "acme", target=OperationTarget.CONSUMER)
        )
        assert results == {first.id: "applied", second.id: "applied"}
        assert {saved(uow, c).status for c in (first, second)} == {CredentialStatus.REVOKED}
        revoked = [e for e in uow.outbox.events if e.name == "credentials.revoked"]
        assert sorted(e.request_id for e in revoked) == sorted([first.request_id, second.request_id])
        assert all(e.status == "revoked" and e.details["credential"]["status"] == "revoked" for e in revoked)  # type: ignore[index]

    @pytest.mark.parametrize(
        ("command_changes", "reason"),
        [
            ({"signed": False}, "rejected_auth: missing signature"),
            (
                {"sender": "portal-acme"},
                "rejected_auth: operations are not accepted from portal user 'portal-acme'",
            ),
        ],
        ids=["unsigned", "from-a-portal"],
    )
    def test_one_not_shown_to_come_from_an_admin_is_recorded_as_refused_and_changes_nothing(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, command_changes: dict[str, object], reason: str
    ) -> None:
        c = provision(uow, issuer)
        command = operation(CredentialOperationKind.REVOKE, c.id, **command_changes)  # type: ignore[arg-type]
        assert operate(uow, issuer, command) == {}
        recorded = uow.credential_operations.saved(command.operation_id)
        assert recorded is not None and recorded.outcome is DecisionOutcome.REFUSED
        assert recorded.outcome_reason.startswith(reason)
        assert saved(uow, c).status is CredentialStatus.ACTIVE
        assert "credentials.operation_refused" in uow.told

    def test_a_replay_of_an_operation_changes_nothing(self, uow: FakeUnitOfWork, issuer: FakeIssuer) -> None:
        c = provision(uow, issuer)
        suspend = operation(CredentialOperationKind.SUSPEND, c.id)
        operate(uow, issuer, suspend)
        operate(uow, issuer, operation(CredentialOperationKind.RESUME, c.id))
        operate(uow, issuer, suspend)
        assert saved(uow, c).status is CredentialStatus.ACTIVE and saved(uow, c).revision == 3
        assert "credentials.operation_duplicate_ignored" in uow.told

    def test_an_unknown_target_is_recorded_as_ignored(self, uow: FakeUnitOfWork, issuer: FakeIssuer) -> None:
        command = operation(CredentialOperationKind.SUSPEND, "no-such-app", target=OperationTarget.APP)
        assert operate(uow, issuer, command) == {}
        recorded = uow.credential_operations.saved(command.operation_id)
        assert recorded is not None
        assert (recorded.outcome, recorded.outcome_reason) == (
            DecisionOutcome.IGNORED,
            "no credential matches",
        )

    def test_rotating_a_portals_credential_seals_the_new_secret_to_the_portal_only(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer)
        operate(uow, issuer, operation(CredentialOperationKind.ROTATE, c.id, grace=timedelta(hours=1)))
        [rotated] = [e for e in uow.outbox.events if e.name == "credentials.rotated"]
        assert rotated.details["sealed_secret"] == {  # the fake box: the reversed secret
            "algorithm": "fake-box",
            "recipient_key": "acme-portal-public-key",
            "value": issuer.secrets[-1][::-1],
        }
        stored = saved(uow, c)
        assert stored.sealed_secret is None and stored.previous_public_id == c.public_id

    def test_rotating_a_v1_credential_seals_the_new_secret_at_rest_for_one_reveal(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer, portal_id=None, sender=None)
        operate(uow, issuer, operation(CredentialOperationKind.ROTATE, c.id))
        stored = saved(uow, c)
        assert stored.sealed_secret is not None and stored.revealed_at is None
        assert FakeSealer().unseal(stored.sealed_secret) == issuer.secrets[-1]


class TestTheGatewayPush:
    def test_with_a_gateway_each_change_but_a_notice_is_pushed_at_its_revision(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer, plan_id="trial")
        operate(uow, issuer, operation(CredentialOperationKind.SUSPEND, c.id), gateway=True)
        operate(uow, issuer, operation(CredentialOperationKind.ROTATE, c.id), gateway=True)
        end = NOW + timedelta(days=30)
        expire_credentials(
            uow=uow, notice_points=POINTS, now=lambda: end - timedelta(days=1), gateway_configured=True
        )
        expire_credentials(uow=uow, notice_points=POINTS, now=lambda: end, gateway_configured=True)
        pushes = [(p.change, p.revision) for p in uow.published if isinstance(p, PushCredentialChange)]
        assert pushes == [("suspended", 2), ("rotated", 3), ("expired", 5)]  # revision 4 is the notice

    def test_without_one_nothing_is_queued_for_it(self, uow: FakeUnitOfWork, issuer: FakeIssuer) -> None:
        c = provision(uow, issuer)
        operate(uow, issuer, operation(CredentialOperationKind.REVOKE, c.id))
        assert not [p for p in uow.published if isinstance(p, PushCredentialChange)]


class TestPlanChange:
    def test_to_an_auto_approve_plan_is_applied_with_the_new_limits_and_the_same_key(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer)
        results = operate(uow, issuer, operation(CredentialOperationKind.CHANGE_PLAN, c.id, plan_id="gold"))
        change_id = results[c.id].split()[3].rstrip(":")
        with uow:
            request = uow.requests.get(change_id)
        assert (
            request is not None
            and request.kind is RequestKind.PLAN_CHANGE
            and request.status is Status.APPROVED
        )
        issue_credentials(
            IssueCredentials(change_id),
            uow=uow,
            issuer=issuer,
            sealer=FakeSealer(),
            portal_sealer=FakePortalSealer(),
        )
        stored = saved(uow, c)
        assert (stored.plan_id, stored.rate_limit_per_minute, stored.public_id) == ("gold", 1200, c.public_id)
        assert len(issuer.issued) == 1  # no new key
        assert "credentials.plan_changed" in [e.name for e in uow.outbox.events]

    def test_to_a_manual_plan_waits_for_review_and_a_reject_leaves_it_as_it_was(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer)
        results = operate(
            uow, issuer, operation(CredentialOperationKind.CHANGE_PLAN, c.id, plan_id="partner")
        )
        change_id = results[c.id].split()[3].rstrip(":")
        assert results[c.id].endswith("pending_review")
        assert SendNotification(change_id, NotificationKind.REVIEW) in uow.published
        decide(
            make_decision(change_id, approve=False, reason="no"),
            uow=uow,
            verify=fake_verify,
            audience=AUDIENCE,
        )
        assert saved(uow, c).plan_id == "free"

    def test_of_a_revoked_credential_is_invalid(self, uow: FakeUnitOfWork, issuer: FakeIssuer) -> None:
        c = provision(uow, issuer)
        operate(uow, issuer, operation(CredentialOperationKind.REVOKE, c.id))
        command = operation(CredentialOperationKind.CHANGE_PLAN, c.id, plan_id="gold")
        results = operate(uow, issuer, command)
        assert results[c.id].endswith("invalid")
        recorded = uow.credential_operations.saved(command.operation_id)
        assert (
            recorded is not None
            and recorded.outcome_reason == f"credential {c.id!r} is revoked: its plan cannot change"
        )


class TestAPlanChangeAskedByThePortal:
    def test_is_routed_like_an_access_request_and_keeps_the_key(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer)
        change = make_route_request(plan_id="gold", credential_id=c.id)
        assert route_request(change, uow=uow) is Status.APPROVED
        issue_credentials(
            IssueCredentials(change.request_id),
            uow=uow,
            issuer=issuer,
            sealer=FakeSealer(),
            portal_sealer=FakePortalSealer(),
        )
        assert (saved(uow, c).plan_id, len(issuer.issued)) == ("gold", 1)

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            (
                {"product_ids": ("payments", "ledger")},
                "a plan change keeps credential {id!r}'s products (payments)",
            ),
            ({"credential_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7"}, "unknown credential"),
        ],
        ids=["other-products", "unknown-credential"],
    )
    def test_that_does_not_fit_its_credential_is_invalid_with_the_reason(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer, changes: dict[str, object], reason: str
    ) -> None:
        c = provision(uow, issuer)
        change = make_route_request(**{"plan_id": "gold", "credential_id": c.id, **changes})  # type: ignore[arg-type]
        assert route_request(change, uow=uow) is Status.INVALID
        with uow:
            request = uow.requests.get(change.request_id)
        assert request is not None and request.status_reason.startswith(reason.format(id=c.id))

    def test_for_another_consumers_credential_is_refused_by_the_app_check(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer)
        change = make_route_request(plan_id="gold", credential_id=c.id, app_id="globex-app")
        assert route_request(change, uow=uow) is Status.INVALID


class TestTheExpirySweep:
    def test_notices_then_expiry_each_once_with_an_email_and_an_event(
        self, uow: FakeUnitOfWork, issuer: FakeIssuer
    ) -> None:
        c = provision(uow, issuer, plan_id="trial")
        end = NOW + timedelta(days=30)

        def sweep(at: datetime) -> tuple[int, int]:
            return expire_credentials(uow=uow, notice_points=POINTS, now=lambda: at)

        assert sweep(end - timedelta(days=20)) == (0, 0)
        assert sweep(end - timedelta(days=13)) == (0, 1)
        assert sweep(end - timedelta(days=13)) == (0, 0)
        assert sweep(end - timedelta(days=1)) == (0, 1)
        assert sweep(end) == (1, 0)
        assert sweep(end + timedelta(days=1)) == (0, 0)
        assert saved(uow, c).status is CredentialStatus.EXPIRED
        emails = [
            cmd
            for cmd in uow.published
            if isinstance(cmd, SendNotification) and cmd.request_id == c.request_id
        ]
        assert [(e.kind, e.topic.split("/")[1:2]) for e in emails[1:]] == [
            (NotificationKind.EXPIRY_NOTICE, ["14d"]),
            (NotificationKind.EXPIRY_NOTICE, ["3d"]),
            (NotificationKind.EXPIRED, []),
        ]
        names = [e.name for e in uow.outbox.events if e.name.startswith("credentials.")]
        assert names == [
            "credentials.issued",
            "credentials.expiring",
            "credentials.expiring",
            "credentials.expired",
        ]

    def test_a_suspended_credential_still_expires(self, uow: FakeUnitOfWork, issuer: FakeIssuer) -> None:
        c = provision(uow, issuer, plan_id="trial")
        operate(uow, issuer, operation(CredentialOperationKind.SUSPEND, c.id))
        expire_credentials(uow=uow, notice_points=[], now=lambda: NOW + timedelta(days=31))
        assert saved(uow, c).status is CredentialStatus.EXPIRED
