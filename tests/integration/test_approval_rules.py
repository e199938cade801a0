"""Approval rules and throttles on real PostgreSQL: stored with the plan, applied by the real router."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from domain import commands, handlers
from domain.model import Plan, Status
from domain.rules import parse_rules
from infra.bootstrap import Services
from infra.db import views
from tests.conftest import PORTAL_ID

pytestmark = pytest.mark.integration


def plan_with(
    services: Services,
    *,
    auto_approve: bool = False,
    rules: list[dict[str, Any]] | None = None,
    max_open: int | None = None,
    max_per_hour: int | None = None,
) -> str:
    """A plan of this test's own (so no other test's requests count against its throttles); its id."""
    plan_id = f"p-{uuid.uuid4().hex[:12]}"
    with services.uow() as uow:
        uow.catalogue.upsert(
            Plan(
                id=plan_id,
                name="Rules under test",
                auto_approve=auto_approve,
                rate_limit_per_minute=60,
                monthly_quota=None,
                product_ids=["payments", "ledger"],
                rules=parse_rules(rules or []),
                max_open_requests_per_consumer=max_open,
                max_requests_per_consumer_per_hour=max_per_hour,
            )
        )
        uow.commit()
    return plan_id


def route(services: Services, plan_id: str, *, consumer_id: str = "acme") -> tuple[str, Status]:
    """A submission routed by the real handler (Acme's through its portal, Globex's as v1); its id and status."""
    request_id = str(uuid.uuid4())
    app_id = {"acme": "acme-checkout", "globex": "globex-backoffice"}[consumer_id]
    portal_id, sender = None, None
    if consumer_id == "acme":
        with services.uow() as uow:
            portal = uow.portals.get(PORTAL_ID)
            assert portal is not None
        portal_id, sender = PORTAL_ID, portal.broker_user
    status = handlers.route_request(
        commands.RouteRequest(
            request_id=request_id,
            consumer_id=consumer_id,
            consumer_email="",
            consumer_name="",
            plan_id=plan_id,
            product_ids=("payments",),
            app_id=app_id,
            new_app_name=None,
            new_app_description=None,
            justification=None,
            submitted_at=datetime.now(UTC),
            portal_id=portal_id,
            sender=sender,
        ),
        uow=services.uow(),
        accept_v1_submissions=True,
    )
    return request_id, status


class TestRulesAreStoredWithThePlan:
    def test_a_plan_reads_back_with_its_rules_and_throttles(self, services: Services) -> None:
        # Given a plan stored with rules and throttles
        rules = [
            {"kind": "trusted_domain", "domains": ["acme.example"]},
            {"kind": "rejected_domain", "domains": ["globex.example"], "reason": "No."},
        ]
        plan_id = plan_with(services, rules=rules, max_open=2, max_per_hour=5)

        # When it is read back / Then everything is there
        with services.uow() as uow:
            plan = uow.catalogue.plan(plan_id)
        assert plan is not None
        assert plan.rules == parse_rules(rules)
        assert (plan.max_open_requests_per_consumer, plan.max_requests_per_consumer_per_hour) == (2, 5)


class TestATrustedDomainApprovesAtOnce:
    def test_the_request_is_approved_and_shows_the_rule(self, services: Services) -> None:
        # Given a manual plan that trusts acme.example
        plan_id = plan_with(services, rules=[{"kind": "trusted_domain", "domains": ["acme.example"]}])

        # When Acme (dev@acme.example) submits
        request_id, status = route(services, plan_id)

        # Then it is approved, and the rule is in the trail and in `requests show`
        assert status is Status.APPROVED
        details = views.request_details(services.uow(), request_id)
        assert details is not None
        assert details["routed_by"] == "rule 1: email domain acme.example is trusted"
        assert details["audit"][-1]["reason"] == "rule 1: email domain acme.example is trusted"
        assert details["audit"][-1]["actor"] == "system:router"


class TestARejectedDomainIsRejected:
    def test_with_the_rules_reason_for_the_consumer(self, services: Services) -> None:
        # Given a plan refusing globex.example
        plan_id = plan_with(
            services,
            auto_approve=True,
            rules=[
                {"kind": "rejected_domain", "domains": ["globex.example"], "reason": "Not for resellers."}
            ],
        )

        # When Globex submits
        request_id, status = route(services, plan_id, consumer_id="globex")

        # Then it is rejected with the rule's reason; the trail names the rule
        assert status is Status.REJECTED
        details = views.request_details(services.uow(), request_id)
        assert details is not None
        assert details["reason"] == "Not for resellers."
        assert details["routed_by"] == "rule 1: email domain globex.example is refused: Not for resellers."
        assert [e["to"] for e in details["audit"]] == ["submitted", "rejected"]


class TestAnActiveCredentialApproves:
    def test_a_second_request_of_a_holder_is_approved(self, services: Services) -> None:
        # Given a manual plan whose first rule approves a consumer holding an active credential on it
        plan_id = plan_with(services, rules=[{"kind": "holds_active_credential"}])
        first, status = route(services, plan_id)
        assert status is Status.PENDING_REVIEW  # none held yet

        # And Acme's first request approved by hand (as decided) and issued
        with services.uow() as uow:
            request = uow.requests.get(first, for_update=True)
            assert request is not None
            request.approve(admin_id="dana", reason="ok")
            uow.commit()
        handlers.issue_credentials(
            commands.IssueCredentials(first),
            uow=services.uow(),
            issuer=services.issuer,
            sealer=services.sealer(),
            portal_sealer=services.portal_sealer,
        )

        # When Acme asks again
        second, status = route(services, plan_id)

        # Then the rule approves it
        assert status is Status.APPROVED
        details = views.request_details(services.uow(), second)
        assert details is not None
        assert (
            details["routed_by"] == f"rule 1: consumer 'acme' holds an active credential on plan {plan_id!r}"
        )


class TestThrottlesUnderConcurrentSubmissions:
    @pytest.mark.parametrize("limit", ["open", "per_hour"])
    def test_ten_at_once_against_a_limit_of_three_accept_exactly_three(
        self, services: Services, limit: str
    ) -> None:
        # Given a manual plan allowing Acme 3 open requests (or 3 an hour)
        plan_id = plan_with(
            services,
            max_open=3 if limit == "open" else None,
            max_per_hour=3 if limit == "per_hour" else None,
        )
        results: list[tuple[str, Status]] = []
        barrier = threading.Barrier(10)

        def submit() -> None:
            barrier.wait()
            results.append(route(services, plan_id))

        # When 10 submissions of Acme are routed at the same moment, each in its own transaction
        threads = [threading.Thread(target=submit) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

        # Then exactly 3 wait for review and 7 are invalid, each saying why
        assert Counter(status for _, status in results) == {Status.PENDING_REVIEW: 3, Status.INVALID: 7}
        with services.uow() as uow:
            for request_id, status in results:
                request = uow.requests.get(request_id)
                assert request is not None and request.status is status
                if status is Status.INVALID:
                    assert request.status_reason.startswith("throttled: consumer 'acme' ")
                    assert request.status_reason.endswith("the most allowed is 3")

    def test_a_closed_request_frees_an_open_slot(self, services: Services) -> None:
        # Given a plan allowing 1 open request, and Acme's one open
        plan_id = plan_with(services, max_open=1)
        first, _ = route(services, plan_id)
        assert route(services, plan_id)[1] is Status.INVALID

        # When the open one is rejected
        with services.uow() as uow:
            request = uow.requests.get(first, for_update=True)
            assert request is not None
            request.reject(admin_id="dana", reason="no")
            uow.commit()

        # Then Acme may ask again
        assert route(services, plan_id)[1] is Status.PENDING_REVIEW
