"""Approval rules and throttles (domain.rules), alone and as AccessRequest.route applies them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from domain import events
from domain.model import AccessRequest, ActorKind, Catalogue, Consumer, Status, throttle_for
from domain.rules import (
    Action,
    InvalidRule,
    RequestCounts,
    Rule,
    RuleKind,
    Throttle,
    evaluate,
    needs_credential_check,
    parse_rules,
    throttle_refusal,
)
from tests.unit.fakes import SUBMITTED_AT, build_catalogue_slice

TRUST_ACME = {"kind": "trusted_domain", "domains": ["acme.example"]}
HOLDS = {"kind": "holds_active_credential"}
REFUSE_GLOBEX = {
    "kind": "rejected_domain",
    "domains": ["globex.example"],
    "reason": "Globex is a competitor.",
}


def route(
    rules: list[dict[str, Any]],
    *,
    plan_id: str = "partner",
    consumer_id: str = "acme",
    holds: bool = False,
    counts: RequestCounts | None = None,
    max_open: int | None = None,
    max_per_hour: int | None = None,
) -> AccessRequest:
    """A submitted request routed under ``plan_id`` given these rules and throttles."""
    app_id = {"acme": "acme-web", "globex": "globex-app"}[consumer_id]
    request = AccessRequest(
        id="req-1",
        consumer_id=consumer_id,
        plan_id=plan_id,
        product_ids=["payments"],
        app_id=app_id,
        submitted_at=SUBMITTED_AT,
    )
    request.record_submission()
    catalogue = build_catalogue_slice(plan_id=plan_id, consumer_id=consumer_id, app_id=app_id)
    assert catalogue.plan is not None
    catalogue.plan = dataclasses.replace(
        catalogue.plan,
        rules=parse_rules(rules),
        max_open_requests_per_consumer=max_open,
        max_requests_per_consumer_per_hour=max_per_hour,
    )
    catalogue.holds_active_credential = holds
    catalogue.counts = counts
    request.events.clear()
    request.route(catalogue)
    return request


class TestAPlanWithoutRulesRoutesByItsFlag:
    def test_an_auto_approve_plan_approves_and_says_so(self) -> None:
        # Given / When a request under the auto-approve plan "free", which has no rules
        request = route([], plan_id="free")

        # Then it is approved as before, and the flag is named as what decided
        assert request.status is Status.APPROVED
        assert request.routed_by == "plan 'free' is auto-approve"
        assert request.history[-1].reason == "plan 'free' is auto-approve"

    def test_a_manual_plan_parks_for_review_and_says_so(self) -> None:
        # Given / When a request under the manual plan "partner", which has no rules
        request = route([])

        # Then it waits for review
        assert request.status is Status.PENDING_REVIEW
        assert request.routed_by == "plan 'partner' requires manual approval"


class TestATrustedDomainApproves:
    def test_a_consumer_of_the_domain_is_approved_on_a_manual_plan(self) -> None:
        # Given a manual plan trusting acme.example / When Acme (dev@acme.example) asks
        request = route([TRUST_ACME])

        # Then the request is approved by the rule, which the audit trail names
        assert request.status is Status.APPROVED
        assert request.routed_by == "rule 1: email domain acme.example is trusted"
        entry = request.history[-1]
        assert (entry.actor_kind, entry.actor_id, entry.reason) == (
            ActorKind.SYSTEM,
            "router",
            "rule 1: email domain acme.example is trusted",
        )
        assert request.events == [events.RequestApproved("req-1", automatically=True)]

    def test_another_domain_falls_through_to_the_flag(self) -> None:
        # Given the same rule / When Globex asks
        request = route([TRUST_ACME], consumer_id="globex")

        # Then no rule matched, and the manual plan parks it
        assert request.status is Status.PENDING_REVIEW
        assert request.routed_by == "no rule matched; plan 'partner' requires manual approval"

    def test_the_domain_is_compared_without_case(self) -> None:
        # Given a rule that names the domain in capitals
        rule = parse_rules([{"kind": "trusted_domain", "domains": ["ACME.Example"]}])

        # When an address of it in other capitals is evaluated / Then it matches
        verdict = evaluate(rule, plan_id="p", auto_approve=False, consumer_id="c", email="Dev@Acme.EXAMPLE")
        assert verdict.action is Action.APPROVE

    def test_a_subdomain_is_not_the_domain(self) -> None:
        # Given a rule trusting acme.example / When dev@evil-acme.example or x@sub.acme.example asks
        rules = parse_rules([TRUST_ACME])
        for email in ("dev@evil-acme.example", "x@sub.acme.example", "acme.example@other.example"):
            # Then it is not trusted
            verdict = evaluate(rules, plan_id="p", auto_approve=False, consumer_id="c", email=email)
            assert verdict.action is Action.REVIEW, email


class TestAnActiveCredentialApproves:
    def test_a_consumer_holding_one_is_approved(self) -> None:
        # Given the rule / When Acme, who holds an active credential on the plan, asks
        request = route([HOLDS], holds=True)

        # Then it is approved by the rule
        assert request.status is Status.APPROVED
        assert request.routed_by == "rule 1: consumer 'acme' holds an active credential on plan 'partner'"

    def test_a_consumer_holding_none_is_reviewed(self) -> None:
        # Given the rule / When Acme holds none
        request = route([HOLDS], holds=False)

        # Then it waits for review
        assert request.status is Status.PENDING_REVIEW

    def test_only_that_rule_needs_the_credential_query(self) -> None:
        # Given / When / Then the router asks the database only for a plan with the rule
        assert needs_credential_check(parse_rules([TRUST_ACME, HOLDS]))
        assert not needs_credential_check(parse_rules([TRUST_ACME, REFUSE_GLOBEX]))
        assert not needs_credential_check([])


class TestARejectedDomainRejects:
    def test_the_request_is_rejected_with_the_rules_reason(self) -> None:
        # Given a rule refusing globex.example / When Globex asks
        request = route([REFUSE_GLOBEX], consumer_id="globex")

        # Then it is rejected: the consumer's reason is the rule's, the audit trail names the rule
        assert request.status is Status.REJECTED
        assert request.status_reason == "Globex is a competitor."
        assert request.routed_by == "rule 1: email domain globex.example is refused: Globex is a competitor."
        assert request.history[-1].reason == request.routed_by
        assert request.history[-1].from_status is Status.SUBMITTED
        # And the rejection follows as an admin's does: the reject email, the portal's event
        assert request.events == [events.RequestRejected("req-1", "Globex is a competitor.")]

    def test_it_rejects_even_on_an_auto_approve_plan(self) -> None:
        # Given / When Globex asks under "free" with the rule
        request = route([REFUSE_GLOBEX], plan_id="free", consumer_id="globex")

        # Then it is rejected
        assert request.status is Status.REJECTED


class TestTheFirstMatchingRuleDecides:
    def test_an_earlier_rule_wins_over_a_later_one(self) -> None:
        # Given rules that both match Acme, rejection first
        refuse_acme = {"kind": "rejected_domain", "domains": ["acme.example"], "reason": "Closed to Acme."}

        # When Acme asks under each order
        rejected = route([refuse_acme, TRUST_ACME])
        approved = route([TRUST_ACME, refuse_acme])

        # Then the first rule decides, and is named by its position
        assert rejected.status is Status.REJECTED
        assert rejected.routed_by.startswith("rule 1: ")
        assert approved.status is Status.APPROVED
        assert approved.routed_by.startswith("rule 1: ")

    def test_the_position_named_is_the_matching_rules(self) -> None:
        # Given a rule that does not match, then one that does
        request = route([REFUSE_GLOBEX, HOLDS, TRUST_ACME])

        # When / Then rule 3 decided
        assert request.routed_by == "rule 3: email domain acme.example is trusted"


class TestBadRulesAreRefusedWithAClearError:
    @pytest.mark.parametrize(
        ("entry", "message"),
        [
            ({"kind": "always"}, "rule 1: unknown kind 'always'"),
            ({}, "rule 1: unknown kind None"),
            ("trusted_domain", "rule 1: must be a mapping"),
            ({"kind": "trusted_domain"}, "'domains' must be a non-empty list"),
            ({"kind": "trusted_domain", "domains": []}, "'domains' must be a non-empty list"),
            ({"kind": "trusted_domain", "domains": "acme.example"}, "'domains' must be a non-empty list"),
            ({"kind": "trusted_domain", "domains": ["acme"]}, "not an email domain: acme"),
            ({"kind": "trusted_domain", "domains": ["a@acme.example"]}, "not an email domain"),
            ({"kind": "rejected_domain", "domains": ["globex.example"]}, "needs a 'reason'"),
            ({"kind": "rejected_domain", "domains": ["globex.example"], "reason": "  "}, "needs a 'reason'"),
            ({"kind": "holds_active_credential", "domains": ["x.example"]}, "unexpected field(s) domains"),
            ({"kind": "trusted_domain", "domains": ["acme.example"], "reason": "x"}, "unexpected field(s)"),
        ],
    )
    def test_names_the_rule_and_what_is_wrong(self, entry: Any, message: str) -> None:
        # Given / When a bad rule is parsed / Then the error says which and why
        with pytest.raises(InvalidRule) as raised:
            parse_rules([entry])
        assert message in str(raised.value)

    def test_the_position_is_that_of_the_bad_rule(self) -> None:
        with pytest.raises(InvalidRule, match=r"^rule 2: "):
            parse_rules([TRUST_ACME, {"kind": "nope"}])

    def test_a_rule_reads_back_as_written(self) -> None:
        # Given rules parsed from the catalogue / When written as JSON and parsed again / Then equal
        rules = parse_rules([TRUST_ACME, HOLDS, REFUSE_GLOBEX])
        assert parse_rules([r.to_json() for r in rules]) == rules
        assert rules[0] == Rule(RuleKind.TRUSTED_DOMAIN, domains=("acme.example",))


# --- throttles ---------------------------------------------------------------------------------


class TestThrottleArithmetic:
    @pytest.mark.parametrize(
        ("max_open", "open_", "refused"),
        [(1, 0, False), (1, 1, True), (3, 2, False), (3, 3, True), (3, 7, True)],
    )
    def test_open_requests_are_refused_at_the_limit(self, max_open: int, open_: int, refused: bool) -> None:
        # Given a limit and what the consumer has open (not counting this request)
        why = throttle_refusal(
            Throttle(max_open=max_open), RequestCounts(open=open_, last_hour=0), consumer_id="c", plan_id="p"
        )

        # Then one more is refused exactly when the open ones reach the limit
        assert (why is not None) is refused

    @pytest.mark.parametrize(
        ("per_hour", "recent", "refused"),
        [(5, 4, False), (5, 5, True), (1, 0, False), (1, 1, True)],
    )
    def test_requests_per_hour_are_refused_at_the_limit(
        self, per_hour: int, recent: int, refused: bool
    ) -> None:
        why = throttle_refusal(
            Throttle(max_per_hour=per_hour),
            RequestCounts(open=0, last_hour=recent),
            consumer_id="c",
            plan_id="p",
        )
        assert (why is not None) is refused

    def test_no_limit_refuses_nothing_and_asks_for_no_count(self) -> None:
        assert not Throttle().applies
        assert Throttle(max_open=1).applies and Throttle(max_per_hour=1).applies
        assert throttle_refusal(Throttle(), RequestCounts(10**6, 10**6), consumer_id="c", plan_id="p") is None

    def test_the_reason_names_the_consumer_the_plan_and_the_limit(self) -> None:
        why = throttle_refusal(
            Throttle(max_open=3), RequestCounts(3, 0), consumer_id="acme", plan_id="partner"
        )
        assert why == (
            "throttled: consumer 'acme' has 3 open request(s) on plan 'partner', the most allowed is 3"
        )
        why = throttle_refusal(
            Throttle(max_per_hour=2), RequestCounts(0, 2), consumer_id="acme", plan_id="free"
        )
        assert why == (
            "throttled: consumer 'acme' sent 2 request(s) on plan 'free' in the last hour, the most allowed is 2"
        )


class TestAThrottledRequestIsInvalid:
    def test_over_the_limit_it_is_invalid_with_the_reason(self) -> None:
        # Given a plan allowing 3 open requests, and Acme with 3 open
        request = route([TRUST_ACME], max_open=3, counts=RequestCounts(open=3, last_hour=3))

        # Then it is invalid, not approved by the rule, and the trail and events say why
        assert request.status is Status.INVALID
        assert request.status_reason.startswith("throttled: consumer 'acme' has 3 open request(s)")
        assert request.routed_by == request.status_reason
        assert request.events == [events.RequestInvalidated("req-1", request.status_reason)]

    def test_under_the_limit_the_rules_decide(self) -> None:
        request = route([TRUST_ACME], max_open=3, counts=RequestCounts(open=2, last_hour=2))
        assert request.status is Status.APPROVED

    def test_an_invalid_request_is_invalid_for_its_own_reason_first(self) -> None:
        # Given a request for a product the plan does not offer, over the limit too
        request = AccessRequest(
            id="req-2", consumer_id="acme", plan_id="free", product_ids=["identity"], app_id="acme-web",
            submitted_at=SUBMITTED_AT,
        )  # fmt: skip
        catalogue: Catalogue = build_catalogue_slice(plan_id="free", product_ids=["identity"])
        catalogue.counts = RequestCounts(open=9, last_hour=9)
        assert catalogue.plan is not None
        catalogue.plan.max_open_requests_per_consumer = 1

        # When routed / Then the catalogue's reason, not the throttle's
        request.route(catalogue)
        assert request.status is Status.INVALID
        assert "not offered under plan 'free'" in request.status_reason


# --- N of M approvers ------------------------------------------------------------------------------


def parked_needing(required: int, admins: list[str] | None = None) -> AccessRequest:
    rule: dict[str, Any] = {"kind": "approvers", "required": required}
    if admins is not None:
        rule["admins"] = admins
    request = route([rule], plan_id="free")
    assert request.status is Status.PENDING_REVIEW
    request.events.clear()
    return request


class TestAnApproversRule:
    def test_parks_even_an_auto_approve_plan_and_names_n_and_m(self) -> None:
        # Given / When a request under "free" with a rule needing 2 of dana, erin, frank
        request = parked_needing(2, ["dana", "erin", "frank"])

        # Then it waits, and says for whom
        assert request.routed_by == "rule 1: plan 'free' requires 2 approval(s) of admins dana, erin, frank"
        assert (request.approvals_required, request.approvers) == (2, ["dana", "erin", "frank"])
        assert request.needs_several_approvals

    def test_without_a_list_any_admin_counts(self) -> None:
        request = parked_needing(2)
        assert request.routed_by == "rule 1: plan 'free' requires 2 approval(s) of distinct admins"
        assert request.approvers == []
        assert request.approval_refusal("anyone", set()) is None

    def test_an_earlier_rule_still_decides_first(self) -> None:
        # Given a trusted domain before the approvers rule / When Acme asks / Then approved at once
        request = route([TRUST_ACME, {"kind": "approvers", "required": 2}])
        assert request.status is Status.APPROVED
        assert request.approvals_required == 1

    def test_a_request_routed_by_the_flag_needs_one_approval(self) -> None:
        request = route([])
        assert (request.approvals_required, request.approvers, request.needs_several_approvals) == (
            1,
            [],
            False,
        )


class TestCountingApprovals:
    def test_the_nth_distinct_approval_approves(self) -> None:
        # Given a request needing 2 approvals
        request = parked_needing(2, ["dana", "erin"])

        # When dana approves / Then it is counted, audited on its own, and the request still waits
        assert request.count_approval(admin_id="dana", reason="fine", approved_by=set()) is False
        assert request.status is Status.PENDING_REVIEW
        entry = request.history[-1]
        assert (entry.from_status, entry.to_status, entry.actor_kind, entry.actor_id, entry.reason) == (
            Status.PENDING_REVIEW,
            Status.PENDING_REVIEW,
            ActorKind.ADMIN,
            "dana",
            "approval 1 of 2: fine",
        )
        assert request.events == []

        # When erin approves / Then it is approved, by erin, as the second approval
        assert request.count_approval(admin_id="erin", reason="ok", approved_by={"dana"}) is True
        assert request.status is Status.APPROVED
        assert request.history[-1].reason == "approval 2 of 2: ok"
        assert request.events == [events.RequestApproved("req-1", automatically=False)]

    def test_the_same_admin_counts_once(self) -> None:
        request = parked_needing(2)
        assert request.approval_refusal("dana", {"dana"}) == (
            "admin 'dana' approved already: an admin's approvals count once"
        )

    def test_an_admin_not_listed_does_not_count(self) -> None:
        request = parked_needing(2, ["dana", "erin"])
        assert request.approval_refusal("mallory", set()) == (
            "admin 'mallory' is not one of this request's approvers (dana, erin)"
        )

    def test_one_rejection_ends_it(self) -> None:
        # Given a request with one approval counted
        request = parked_needing(3)
        request.count_approval(admin_id="dana", reason="fine", approved_by=set())

        # When another admin rejects / Then it is rejected
        request.reject(admin_id="erin", reason="no")
        assert request.status is Status.REJECTED


class TestBadApproversRules:
    @pytest.mark.parametrize(
        ("entry", "message"),
        [
            ({"kind": "approvers"}, "'required' must be a whole number from 1 to 10"),
            ({"kind": "approvers", "required": 0}, "'required' must be a whole number"),
            ({"kind": "approvers", "required": 11}, "'required' must be a whole number"),
            ({"kind": "approvers", "required": "2"}, "'required' must be a whole number"),
            ({"kind": "approvers", "required": True}, "'required' must be a whole number"),
            (
                {"kind": "approvers", "required": 3, "admins": ["a", "b"]},
                "requires 3 approvals but lists only 2",
            ),
            ({"kind": "approvers", "required": 2, "admins": ["a", "a"]}, "names an admin twice"),
            ({"kind": "approvers", "required": 1, "admins": "a"}, "'admins' must be a list of admin ids"),
            ({"kind": "approvers", "required": 1, "domains": ["x.example"]}, "unexpected field(s) domains"),
        ],
    )
    def test_are_refused_with_why(self, entry: Any, message: str) -> None:
        with pytest.raises(InvalidRule) as raised:
            parse_rules([entry])
        assert message in str(raised.value)


class TestAConsumersOwnThrottle:
    def test_takes_the_place_of_the_plans_field_by_field(self) -> None:
        # Given a plan allowing 3 open and 10 an hour, and consumers with and without their own limits
        base = build_catalogue_slice().plan
        assert base is not None
        plan = dataclasses.replace(
            base, max_open_requests_per_consumer=3, max_requests_per_consumer_per_hour=10
        )
        plain = Consumer(id="a", email="a@a.example", name="A")
        noisy = dataclasses.replace(plain, max_open_requests=1)
        trusted = dataclasses.replace(plain, max_open_requests=50, max_requests_per_hour=500)

        # When / Then each field is the consumer's where set, else the plan's
        assert throttle_for(plan, plain) == Throttle(max_open=3, max_per_hour=10)
        assert throttle_for(plan, noisy) == Throttle(max_open=1, max_per_hour=10)
        assert throttle_for(plan, trusted) == Throttle(max_open=50, max_per_hour=500)

    def test_applies_on_a_plan_without_throttles(self) -> None:
        plan = build_catalogue_slice().plan
        assert plan is not None and not throttle_for(plan, Consumer("a", "a@a.example", "A")).applies
        assert throttle_for(plan, Consumer("a", "a@a.example", "A", max_requests_per_hour=2)).applies

    def test_a_request_over_the_consumers_limit_is_invalid(self) -> None:
        # Given a plan allowing 3 open, and Acme allowed only 1, with 1 open
        request = AccessRequest(
            id="req-3", consumer_id="acme", plan_id="partner", product_ids=["payments"], app_id="acme-web",
            submitted_at=SUBMITTED_AT,
        )  # fmt: skip
        catalogue = build_catalogue_slice(plan_id="partner")
        assert catalogue.plan is not None and catalogue.consumer is not None
        catalogue.plan.max_open_requests_per_consumer = 3
        catalogue.consumer.max_open_requests = 1
        catalogue.counts = RequestCounts(open=1, last_hour=1)

        # When routed / Then invalid, naming the consumer's limit
        request.route(catalogue)
        assert request.status is Status.INVALID
        assert request.status_reason.endswith("the most allowed is 1")
