"""The AccessRequest aggregate: its state machine, its audit trail, and the catalogue rules."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from domain import events
from domain.commands import RouteRequest
from domain.errors import IllegalTransition, RuleViolation
from domain.model import (
    ALLOWED_TRANSITIONS,
    FINAL_STATUSES,
    REVIEW_SWEEP,
    AccessRequest,
    ActorKind,
    AuthMethod,
    Catalogue,
    Plan,
    Status,
    check_rules,
    review_deadline,
)
from tests.unit.fakes import SUBMITTED_AT, build_catalogue_slice


def new_request(
    *,
    request_id: str = "req-1",
    consumer_id: str = "acme",
    plan_id: str = "free",
    product_ids: tuple[str, ...] = ("payments",),
    app_id: str | None = "acme-web",
) -> AccessRequest:
    """A request as the router creates it: SUBMITTED, with its submission audited."""
    request = AccessRequest(
        id=request_id,
        consumer_id=consumer_id,
        plan_id=plan_id,
        product_ids=list(product_ids),
        app_id=app_id,
        submitted_at=SUBMITTED_AT,
    )
    request.record_submission()
    return request


def catalogue_for(request: AccessRequest, *, plan_id: str | None = None) -> Catalogue:
    """The catalogue slice the router would load for ``request``, optionally under another plan."""
    return build_catalogue_slice(
        plan_id=plan_id or request.plan_id,
        product_ids=request.product_ids,
        consumer_id=request.consumer_id,
        app_id=request.app_id,
    )


def request_in(status: Status) -> AccessRequest:
    """A request brought to ``status`` along a legal path."""
    if status is Status.SUBMITTED:
        return new_request()
    if status is Status.INVALID:
        request = new_request()
        request.invalidate("unknown plan 'gold'")
        return request
    if status in (Status.APPROVED, Status.PROVISIONED, Status.PROVISIONING_FAILED):
        request = new_request(plan_id="free")
        request.route(catalogue_for(request))
        if status is Status.PROVISIONED:
            request.mark_provisioned("cred-1")
        if status is Status.PROVISIONING_FAILED:
            request.fail_provisioning("plan 'free' no longer exists")
        return request
    request = new_request(plan_id="partner")
    request.route(catalogue_for(request))
    if status is Status.REJECTED:
        request.reject(admin_id="admin@accessflow.example", reason="no")
    if status is Status.EXPIRED:
        request.set_review_deadline(DEADLINE)
        request.expire_review(now=DEADLINE)
    return request


#: A review deadline for the tests of deadlines.
DEADLINE = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def snapshot(request: AccessRequest) -> tuple[object, ...]:
    """Everything a transition may change."""
    return (
        request.status,
        request.status_reason,
        request.auth_method,
        request.updated_at,
        list(request.history),
        list(request.events),
    )


# --- legal paths ---------------------------------------------------------------------------------


class TestAnAutoApprovePlanTakesARequestToProvisioned:
    def test_routing_approves_at_once_and_issuing_provisions(self) -> None:
        # Given a submitted request for a product under the auto-approve "free" plan
        request = new_request(plan_id="free", product_ids=("payments", "ledger"))

        # When it is routed and its credential is issued
        request.route(catalogue_for(request))
        approved = request.status
        request.mark_provisioned("cred-1")

        # Then it went SUBMITTED -> APPROVED -> PROVISIONED with the products' auth method
        assert approved is Status.APPROVED
        assert request.status is Status.PROVISIONED
        assert request.auth_method is AuthMethod.API_KEY
        assert [e.to_status for e in request.history] == [
            Status.SUBMITTED,
            Status.APPROVED,
            Status.PROVISIONED,
        ]

    def test_records_an_automatic_approval_then_the_provisioning(self) -> None:
        # Given a submitted request under the auto-approve plan
        request = new_request(plan_id="free")

        # When it is routed and provisioned
        request.route(catalogue_for(request))
        request.mark_provisioned("cred-1")

        # Then both events are recorded, in order
        assert request.events == [
            events.RequestSubmitted("req-1"),
            events.RequestApproved("req-1", automatically=True),
            events.CredentialsProvisioned("req-1", "cred-1"),
        ]


class TestAManualPlanWaitsForAnAdmin:
    def test_routing_parks_the_request_for_review(self) -> None:
        # Given a submitted request under the manual "partner" plan
        request = new_request(plan_id="partner", product_ids=("identity",))

        # When it is routed
        request.route(catalogue_for(request))

        # Then it waits for review, and says so
        assert request.status is Status.PENDING_REVIEW
        assert request.status_reason == "plan 'partner' requires manual approval"
        assert request.auth_method is AuthMethod.OAUTH2_CLIENT_CREDENTIALS
        assert request.events == [events.RequestSubmitted("req-1"), events.RequestParkedForReview("req-1")]

    def test_an_admin_approval_leads_to_provisioned(self) -> None:
        # Given a request parked for review
        request = request_in(Status.PENDING_REVIEW)
        request.events.clear()

        # When an admin approves it and its credential is issued
        request.approve(admin_id="admin@accessflow.example", reason="known partner")
        request.mark_provisioned("cred-7")

        # Then it is provisioned, approved by hand
        assert request.status is Status.PROVISIONED
        assert request.events == [
            events.RequestApproved("req-1", automatically=False),
            events.CredentialsProvisioned("req-1", "cred-7"),
        ]

    def test_an_admin_rejection_is_final_and_keeps_the_reason(self) -> None:
        # Given a request parked for review
        request = request_in(Status.PENDING_REVIEW)
        request.events.clear()

        # When an admin rejects it
        request.reject(admin_id="admin@accessflow.example", reason="no business case")

        # Then it is rejected for good, with the admin's reason
        assert request.status is Status.REJECTED
        assert request.status.is_final
        assert request.status_reason == "no business case"
        assert request.events == [events.RequestRejected("req-1", "no business case")]


class TestARequestThatBreaksARuleBecomesInvalid:
    def test_routing_marks_it_invalid_with_the_reason(self) -> None:
        # Given a request for a plan the catalogue does not have
        request = new_request(plan_id="gold")

        # When it is routed
        request.route(catalogue_for(request))

        # Then it is invalid for good, with a reason, and nothing else happens
        assert request.status is Status.INVALID
        assert request.status.is_final
        assert request.status_reason == "unknown plan 'gold'"
        assert request.auth_method is None
        assert request.events == [
            events.RequestSubmitted("req-1"),
            events.RequestInvalidated("req-1", "unknown plan 'gold'"),
        ]


# --- the audit trail -------------------------------------------------------------------------------


class TestTheAuditTrailHasOneEntryPerTransition:
    def test_submission_is_the_first_entry(self) -> None:
        # Given / When a request is created and its submission recorded
        request = new_request()

        # Then its history starts with the router receiving it
        (entry,) = request.history
        assert (entry.from_status, entry.to_status) == (None, Status.SUBMITTED)
        assert (entry.actor_kind, entry.actor_id, entry.reason) == (
            ActorKind.SYSTEM,
            "router",
            "received from portal",
        )
        assert entry.request_id == "req-1"
        assert entry.at == request.received_at

    def test_each_transition_names_its_actor_and_reason(self) -> None:
        # Given a request under the manual plan
        request = new_request(plan_id="partner")

        # When it is routed, approved by an admin and provisioned
        request.route(catalogue_for(request))
        request.approve(admin_id="alice@accessflow.example", reason="known partner")
        request.mark_provisioned("cred-9")

        # Then every step is in the history, with who did it and why
        assert [
            (e.from_status, e.to_status, e.actor_kind, e.actor_id, e.reason) for e in request.history
        ] == [
            (None, Status.SUBMITTED, ActorKind.SYSTEM, "router", "received from portal"),
            (
                Status.SUBMITTED,
                Status.PENDING_REVIEW,
                ActorKind.SYSTEM,
                "router",
                "plan 'partner' requires manual approval",
            ),
            (
                Status.PENDING_REVIEW,
                Status.APPROVED,
                ActorKind.ADMIN,
                "alice@accessflow.example",
                "known partner",
            ),
            (Status.APPROVED, Status.PROVISIONED, ActorKind.SYSTEM, "issuer", "credential cred-9 issued"),
        ]
        assert {e.request_id for e in request.history} == {"req-1"}

    def test_an_automatic_approval_names_the_plan(self) -> None:
        # Given a request under the auto-approve plan
        request = new_request(plan_id="free")

        # When it is routed
        request.route(catalogue_for(request))

        # Then the router is the actor and the plan is the reason
        entry = request.history[-1]
        assert (entry.actor_kind, entry.actor_id, entry.reason) == (
            ActorKind.SYSTEM,
            "router",
            "plan 'free' is auto-approve",
        )
        assert request.updated_at == entry.at

    def test_a_rejection_names_the_admin_and_their_reason(self) -> None:
        # Given a request parked for review
        request = request_in(Status.PENDING_REVIEW)

        # When an admin rejects it
        request.reject(admin_id="bob@accessflow.example", reason="duplicate of req-0")

        # Then the last entry says who and why
        entry = request.history[-1]
        assert (entry.from_status, entry.to_status) == (Status.PENDING_REVIEW, Status.REJECTED)
        assert (entry.actor_kind, entry.actor_id, entry.reason) == (
            ActorKind.ADMIN,
            "bob@accessflow.example",
            "duplicate of req-0",
        )


class TestAFailedProvisioning:
    def test_is_recorded_with_its_reason_and_told_as_an_event(self) -> None:
        # Given an approved request
        request = request_in(Status.APPROVED)
        request.events.clear()

        # When its credential cannot be issued
        request.fail_provisioning("plan 'free' no longer exists")

        # Then it waits in provisioning_failed, with the issuer as the actor and the cause as the reason
        entry = request.history[-1]
        assert (entry.from_status, entry.to_status) == (Status.APPROVED, Status.PROVISIONING_FAILED)
        assert (entry.actor_kind, entry.actor_id, entry.reason) == (
            ActorKind.SYSTEM,
            "issuer",
            "plan 'free' no longer exists",
        )
        assert request.events == [events.ProvisioningFailed(request.id, "plan 'free' no longer exists")]
        assert not request.status.is_final

    def test_a_retry_approves_it_again_in_the_operators_name(self) -> None:
        # Given a request whose provisioning failed
        request = request_in(Status.PROVISIONING_FAILED)
        request.events.clear()

        # When an operator retries it
        request.retry_provisioning(operator="ops-alice", reason="plan restored")

        # Then it is approved again, by the operator, and its credential will be issued anew
        entry = request.history[-1]
        assert (entry.from_status, entry.to_status) == (Status.PROVISIONING_FAILED, Status.APPROVED)
        assert (entry.actor_kind, entry.actor_id, entry.reason) == (
            ActorKind.OPERATOR,
            "ops-alice",
            "plan restored",
        )
        assert request.events == [events.RequestApproved(request.id, automatically=False)]


# --- illegal transitions ---------------------------------------------------------------------------

#: One way to ask a request to move to each state. No public operation leads back to
#: SUBMITTED, so that one goes through the guard every operation shares.
MOVES: dict[Status, Callable[[AccessRequest], None]] = {
    Status.SUBMITTED: lambda r: r._move(
        Status.SUBMITTED, actor_kind=ActorKind.SYSTEM, actor_id="t", reason="t"
    ),
    Status.PENDING_REVIEW: lambda r: r.park_for_review(),
    Status.APPROVED: lambda r: r.approve(admin_id="admin@accessflow.example", reason="ok"),
    Status.PROVISIONED: lambda r: r.mark_provisioned("cred-x"),
    Status.REJECTED: lambda r: r.reject(admin_id="admin@accessflow.example", reason="no"),
    Status.INVALID: lambda r: r.invalidate("broken"),
    Status.PROVISIONING_FAILED: lambda r: r.fail_provisioning("the issuer refused"),
    Status.EXPIRED: lambda r: _expire_unreviewed(r),
}


def _expire_unreviewed(request: AccessRequest) -> None:
    if request.status is Status.PENDING_REVIEW:
        request.set_review_deadline(DEADLINE)
    request.expire_review(now=DEADLINE)


ILLEGAL_PAIRS = [
    (source, target)
    for source, target in itertools.product(Status, Status)
    if target not in ALLOWED_TRANSITIONS[source]
]


class TestEveryTransitionOutsideTheTableIsRefused:
    def test_the_table_leaves_fifty_four_illegal_pairs(self) -> None:
        # Given the transition table / Then 10 of the 64 pairs are legal (submitted -> rejected by a
        # rule, pending review -> expired at its deadline)
        assert len(ILLEGAL_PAIRS) == 54

    @pytest.mark.parametrize(
        ("source", "target"), ILLEGAL_PAIRS, ids=[f"{s.value}->{t.value}" for s, t in ILLEGAL_PAIRS]
    )
    def test_raises_and_leaves_the_request_as_it_was(self, source: Status, target: Status) -> None:
        # Given a request in the source state
        request = request_in(source)
        before = snapshot(request)

        # When it is asked to move to the target state
        with pytest.raises(IllegalTransition, match=f"from {source} to {target}"):
            MOVES[target](request)

        # Then nothing about it changed
        assert snapshot(request) == before

    @pytest.mark.parametrize(
        ("source", "target"),
        [(s, t) for s, targets in ALLOWED_TRANSITIONS.items() for t in targets],
        ids=lambda s: s.value,
    )
    def test_every_pair_in_the_table_is_allowed(self, source: Status, target: Status) -> None:
        # Given a request in the source state
        request = request_in(source)

        # When it is asked to move to an allowed target
        MOVES[target](request)

        # Then it moved
        assert request.status is target


class TestFinalStatesAreTheOnesWithNoWayOut:
    @pytest.mark.parametrize("status", list(Status), ids=lambda s: s.value)
    def test_a_state_is_final_exactly_when_nothing_follows_it(self, status: Status) -> None:
        # Given / When / Then the "final" flag agrees with the transition table
        assert status.is_final == (not ALLOWED_TRANSITIONS[status])
        assert status.is_final == (status in FINAL_STATUSES)


class TestRoutingAnAlreadyRoutedRequest:
    def test_is_refused_and_leaves_the_status_alone(self) -> None:
        # Given a request that was already approved
        request = request_in(Status.APPROVED)
        before = snapshot(request)

        # When it is routed again with the same catalogue
        with pytest.raises(IllegalTransition):
            request.route(catalogue_for(request))

        # Then nothing changed
        assert snapshot(request) == before

    def test_cannot_approve_a_request_waiting_for_an_admin(self) -> None:
        # Given a request waiting for review under the manual plan
        request = request_in(Status.PENDING_REVIEW)
        before = snapshot(request)

        # When it is routed again against an auto-approve plan
        with pytest.raises(IllegalTransition):
            request.route(catalogue_for(request, plan_id="free"))

        # Then it still waits for an admin: the router cannot skip the review
        assert snapshot(request) == before
        assert request.status is Status.PENDING_REVIEW

    def test_does_not_overwrite_its_auth_method_when_the_catalogue_changed(self) -> None:
        # Given a request approved for an API-key product
        request = request_in(Status.APPROVED)
        assert request.auth_method is AuthMethod.API_KEY
        # ... and a catalogue in which that product has since moved to OAuth2
        catalogue = catalogue_for(request)
        catalogue.products["payments"].auth_method = AuthMethod.OAUTH2_CLIENT_CREDENTIALS

        # When it is routed again
        with pytest.raises(IllegalTransition):
            request.route(catalogue)

        # Then the refused transition left its auth method alone
        assert request.auth_method is AuthMethod.API_KEY

    def test_does_not_give_an_invalid_request_an_auth_method(self) -> None:
        # Given a request that was invalidated before it got an auth method
        request = request_in(Status.INVALID)
        assert request.auth_method is None

        # When it is routed again against a catalogue it now satisfies
        with pytest.raises(IllegalTransition):
            request.route(catalogue_for(request))

        # Then the refused transition left it without an auth method
        assert request.auth_method is None


# --- catalogue rules ---------------------------------------------------------------------------------

RULE_CASES = {
    "unknown consumer": (dict(consumer_id="initech"), "unknown consumer 'initech'"),
    "unknown plan": (dict(plan_id="gold"), "unknown plan 'gold'"),
    "no product": (dict(product_ids=()), "a request needs at least one product"),
    "unknown product": (dict(product_ids=("payments", "weather", "ads")), "unknown product(s): ads, weather"),
    "product not offered under plan": (
        dict(plan_id="free", product_ids=("payments", "identity")),
        "product(s) identity not offered under plan 'free'",
    ),
    "mixed auth methods": (
        dict(plan_id="partner", product_ids=("payments", "identity")),
        "products must share one authentication method, "
        "got identity=oauth2_client_credentials, payments=api_key",
    ),
    "app of another consumer": (
        dict(app_id="globex-app"),
        "app 'globex-app' does not belong to consumer 'acme'",
    ),
    "unknown app": (dict(app_id="acme-mobile"), "unknown app 'acme-mobile'"),
}


class TestEachCatalogueRuleGivesAnInvalidRequestWithAClearReason:
    @pytest.mark.parametrize(("overrides", "reason"), RULE_CASES.values(), ids=RULE_CASES.keys())
    def test_check_rules_raises_the_reason(self, overrides: dict[str, object], reason: str) -> None:
        # Given a request that breaks one rule
        request = new_request(**overrides)  # type: ignore[arg-type]

        # When its rules are checked / Then the violation names the problem
        with pytest.raises(RuleViolation) as raised:
            check_rules(
                plan_id=request.plan_id,
                product_ids=request.product_ids,
                consumer_id=request.consumer_id,
                app_id=request.app_id,
                catalogue=catalogue_for(request),
            )
        assert raised.value.reason == reason

    @pytest.mark.parametrize(("overrides", "reason"), RULE_CASES.values(), ids=RULE_CASES.keys())
    def test_routing_invalidates_with_the_reason(self, overrides: dict[str, object], reason: str) -> None:
        # Given a request that breaks one rule
        request = new_request(**overrides)  # type: ignore[arg-type]

        # When it is routed
        request.route(catalogue_for(request))

        # Then it is invalid, the reason is kept, and the router is the actor
        assert request.status is Status.INVALID
        assert request.status_reason == reason
        assert request.history[-1].actor_id == "router"
        assert request.history[-1].reason == reason


class TestARequestThatKeepsTheRulesIsAccepted:
    @pytest.mark.parametrize(
        ("plan_id", "product_ids", "method"),
        [
            ("free", ("payments",), AuthMethod.API_KEY),
            ("free", ("payments", "ledger"), AuthMethod.API_KEY),
            ("partner", ("identity",), AuthMethod.OAUTH2_CLIENT_CREDENTIALS),
        ],
    )
    def test_check_rules_returns_the_shared_auth_method(
        self, plan_id: str, product_ids: tuple[str, ...], method: AuthMethod
    ) -> None:
        # Given a request that keeps every rule
        request = new_request(plan_id=plan_id, product_ids=product_ids)

        # When its rules are checked
        found = check_rules(
            plan_id=request.plan_id,
            product_ids=request.product_ids,
            consumer_id=request.consumer_id,
            app_id=request.app_id,
            catalogue=catalogue_for(request),
        )

        # Then it gets the one auth method its products share
        assert found is method

    def test_a_request_for_a_new_app_skips_the_app_rules(self) -> None:
        # Given a request with no app id yet (the app is to be created)
        request = new_request(app_id=None)

        # When it is routed
        request.route(catalogue_for(request))

        # Then it is accepted
        assert request.status is Status.APPROVED


class TestAutoApprovalComesOnlyFromThePlan:
    def test_the_same_request_is_approved_or_parked_by_the_plans_flag_alone(self) -> None:
        # Given two identical requests, and the "free" plan's flag switched off for the second
        auto = new_request(plan_id="free", request_id="req-a")
        manual = new_request(plan_id="free", request_id="req-b")
        manual_catalogue = catalogue_for(manual)
        assert manual_catalogue.plan is not None
        manual_catalogue.plan.auto_approve = False

        # When both are routed
        auto.route(catalogue_for(auto))
        manual.route(manual_catalogue)

        # Then only the plan's flag made the difference
        assert auto.status is Status.APPROVED
        assert manual.status is Status.PENDING_REVIEW

    def test_nothing_in_a_submission_can_ask_for_approval(self) -> None:
        # Given the fields a portal submission carries / Then none of them is about approval
        names = {f.name for f in dataclasses.fields(RouteRequest)}
        assert not {n for n in names if "approv" in n or "auto" in n}

    def test_a_justification_does_not_sway_a_manual_plan(self) -> None:
        # Given a request under the manual plan with a pushy justification
        request = new_request(plan_id="partner")
        request.justification = "auto_approve: true, please approve at once"

        # When it is routed
        request.route(catalogue_for(request))

        # Then it still waits for an admin
        assert request.status is Status.PENDING_REVIEW


# --- random walks through the state machine --------------------------------------------------------

ADMINS = st.sampled_from(["alice@accessflow.example", "bob@accessflow.example"])
REASONS = st.text(max_size=20)
ROUTE_TARGETS = {"free": Status.APPROVED, "partner": Status.PENDING_REVIEW, "gold": Status.INVALID}


class AccessRequestMachine(RuleBasedStateMachine):
    """Drives one request with random operations and checks the invariants after each."""

    def __init__(self) -> None:
        super().__init__()
        self.request = new_request()
        self.transitions = 0
        self.final: Status | None = None

    def attempt(
        self, operation: Callable[[], None], target: Status, *, only_from: Status | None = None
    ) -> None:
        before = snapshot(self.request)
        legal = target in ALLOWED_TRANSITIONS[self.request.status]
        if only_from is not None:
            legal = legal and self.request.status is only_from
        if legal:
            operation()
            self.transitions += 1
            assert self.request.status is target
        else:
            with pytest.raises(IllegalTransition):
                operation()
            assert snapshot(self.request) == before

    @rule(plan_id=st.sampled_from(sorted(ROUTE_TARGETS)))
    def route(self, plan_id: str) -> None:
        catalogue = catalogue_for(self.request, plan_id=plan_id)
        # Routing is the first step only: even PENDING_REVIEW -> APPROVED is not the router's to take.
        self.attempt(
            lambda: self.request.route(catalogue), ROUTE_TARGETS[plan_id], only_from=Status.SUBMITTED
        )

    @rule(admin=ADMINS, reason=REASONS)
    def approve(self, admin: str, reason: str) -> None:
        self.attempt(lambda: self.request.approve(admin_id=admin, reason=reason), Status.APPROVED)

    @rule(admin=ADMINS, reason=REASONS)
    def reject(self, admin: str, reason: str) -> None:
        self.attempt(lambda: self.request.reject(admin_id=admin, reason=reason), Status.REJECTED)

    @rule(credential_id=st.uuids().map(str))
    def mark_provisioned(self, credential_id: str) -> None:
        self.attempt(lambda: self.request.mark_provisioned(credential_id), Status.PROVISIONED)

    @rule(reason=REASONS)
    def invalidate(self, reason: str) -> None:
        self.attempt(lambda: self.request.invalidate(reason), Status.INVALID)

    @invariant()
    def status_is_always_a_status(self) -> None:
        assert isinstance(self.request.status, Status)
        assert self.request.status in set(Status)

    @invariant()
    def final_states_never_change(self) -> None:
        if self.final is not None:
            assert self.request.status is self.final
        elif self.request.status.is_final:
            self.final = self.request.status

    @invariant()
    def history_has_the_submission_and_one_entry_per_transition(self) -> None:
        assert len(self.request.history) == self.transitions + 1
        # One event for the submission, then one per transition.
        assert len(self.request.events) == self.transitions + 1

    @invariant()
    def history_is_a_connected_chain(self) -> None:
        history = self.request.history
        assert history[0].from_status is None
        assert history[0].to_status is Status.SUBMITTED
        for previous, entry in itertools.pairwise(history):
            assert entry.from_status is previous.to_status
        assert history[-1].to_status is self.request.status

    @invariant()
    def provisioned_is_only_reached_from_approved(self) -> None:
        for entry in self.request.history:
            if entry.to_status is Status.PROVISIONED:
                assert entry.from_status is Status.APPROVED


AccessRequestMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=20, deadline=None, database=None
)


#: Hypothesis runs random sequences of route/approve/reject/provision/invalidate against it.
TestRandomOperationsKeepTheStateMachineInvariants = AccessRequestMachine.TestCase


# --- review deadlines ------------------------------------------------------------------------------

HOURS = timedelta(hours=1)
REMINDERS = [24 * HOURS, 4 * HOURS]


def pending_with_deadline() -> AccessRequest:
    request = request_in(Status.PENDING_REVIEW)
    request.set_review_deadline(DEADLINE)
    request.events.clear()
    return request


def plan(hours: float | None) -> Plan:
    return Plan(
        id="partner",
        name="Partner",
        auto_approve=False,
        rate_limit_per_minute=60,
        monthly_quota=None,
        review_deadline_hours=hours,
    )


class TestTheReviewDeadline:
    def test_the_plans_hours_win_over_the_default(self) -> None:
        parked = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
        assert review_deadline(plan(72), 24, parked) == parked + 72 * HOURS
        assert review_deadline(plan(0.5), None, parked) == parked + timedelta(minutes=30)

    def test_a_plan_without_hours_takes_the_default_and_none_means_no_deadline(self) -> None:
        parked = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
        assert review_deadline(plan(None), 48, parked) == parked + 48 * HOURS
        assert review_deadline(plan(None), None, parked) is None

    def test_only_a_request_pending_review_gets_one(self) -> None:
        request = request_in(Status.APPROVED)
        with pytest.raises(IllegalTransition):
            request.set_review_deadline(DEADLINE)


class TestReminders:
    def test_each_point_is_due_once_and_records_one_event_for_the_nearest(self) -> None:
        # Given a request pending review with a deadline
        request = pending_with_deadline()

        # Then nothing is due more than a day before it
        assert request.review_reminders_due(REMINDERS, DEADLINE - 25 * HOURS) == []
        # When the 24-hour point is reached, that reminder is due, once
        due = request.review_reminders_due(REMINDERS, DEADLINE - 23 * HOURS)
        assert due == [24 * HOURS]
        request.note_review_reminder(due, now=DEADLINE - 23 * HOURS)
        assert request.review_reminders_due(REMINDERS, DEADLINE - 22 * HOURS) == []
        # And the 4-hour one later, once
        due = request.review_reminders_due(REMINDERS, DEADLINE - 3 * HOURS)
        assert due == [4 * HOURS]
        request.note_review_reminder(due, now=DEADLINE - 3 * HOURS)
        assert request.review_reminders_due(REMINDERS, DEADLINE - HOURS) == []

        assert request.review_notices == "24h,4h"
        assert request.events == [
            events.ReviewReminderDue(request.id, "24h", DEADLINE),
            events.ReviewReminderDue(request.id, "4h", DEADLINE),
        ]
        assert request.status is Status.PENDING_REVIEW

    def test_a_late_first_look_sends_only_the_nearest(self) -> None:
        request = pending_with_deadline()
        due = request.review_reminders_due(REMINDERS, DEADLINE - 2 * HOURS)
        assert due == [24 * HOURS, 4 * HOURS]
        request.note_review_reminder(due, now=DEADLINE - 2 * HOURS)
        assert request.events == [events.ReviewReminderDue(request.id, "4h", DEADLINE)]

    def test_none_is_due_at_or_after_the_deadline_nor_without_one(self) -> None:
        request = pending_with_deadline()
        assert request.review_reminders_due(REMINDERS, DEADLINE) == []
        assert request_in(Status.PENDING_REVIEW).review_reminders_due(REMINDERS, DEADLINE) == []

    def test_a_new_deadline_starts_the_reminders_again(self) -> None:
        request = pending_with_deadline()
        request.note_review_reminder([24 * HOURS], now=DEADLINE - 23 * HOURS)
        request.set_review_deadline(DEADLINE + 48 * HOURS)
        assert request.review_reminders_due(REMINDERS, DEADLINE + 25 * HOURS) == [24 * HOURS]


class TestEscalation:
    def test_is_due_once_from_its_point_until_the_deadline(self) -> None:
        request = pending_with_deadline()
        point = 2 * HOURS
        assert not request.escalation_due(point, DEADLINE - 3 * HOURS)
        assert request.escalation_due(point, DEADLINE - HOURS)
        request.escalate_review(now=DEADLINE - HOURS)
        assert not request.escalation_due(point, DEADLINE - timedelta(minutes=30))
        assert request.events == [events.ReviewEscalated(request.id, DEADLINE)]

    def test_none_is_due_without_a_point_or_at_the_deadline(self) -> None:
        request = pending_with_deadline()
        assert not request.escalation_due(None, DEADLINE - HOURS)
        assert not request.escalation_due(2 * HOURS, DEADLINE)


class TestExpiry:
    def test_at_the_deadline_the_request_ends_expired_by_the_sweep_with_the_reason(self) -> None:
        # Given a request pending review
        request = pending_with_deadline()

        # When its deadline passes and the sweep expires it
        assert request.review_overdue(DEADLINE)
        request.expire_review(now=DEADLINE)

        # Then it is expired, for good, by the sweep, with the reason
        assert request.status is Status.EXPIRED
        assert request.status.is_final
        entry = request.history[-1]
        assert (entry.from_status, entry.to_status) == (Status.PENDING_REVIEW, Status.EXPIRED)
        assert (entry.actor_kind, entry.actor_id) == (ActorKind.SYSTEM, REVIEW_SWEEP)
        assert "2026-12-01T12:00:00Z" in entry.reason
        assert request.events == [events.RequestExpired(request.id, entry.reason)]
        # And no admin decision applies to it any more
        with pytest.raises(IllegalTransition):
            request.approve(admin_id="admin@accessflow.example", reason="late")

    def test_before_the_deadline_it_is_refused(self) -> None:
        request = pending_with_deadline()
        assert not request.review_overdue(DEADLINE - timedelta(seconds=1))
        with pytest.raises(IllegalTransition, match="not expired"):
            request.expire_review(now=DEADLINE - timedelta(seconds=1))
        assert request.status is Status.PENDING_REVIEW
