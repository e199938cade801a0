"""Bulk decisions (domain.handlers.decide_bulk), driven through hand-written fakes of their ports."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta

import pytest

from domain.commands import DecideBulk, Signature
from domain.handlers import bulk_item_decision_id, decide, decide_bulk
from domain.model import AdminKey, BulkItemResult, DecisionOutcome, Status, utcnow
from tests.unit.fakes import ADMIN_ID, ADMIN_KEY, AUDIENCE, FakeUnitOfWork, fake_signature, make_decision
from tests.unit.test_handlers import SIGNED, pending_review, saved
from tests.unit.test_routing_rules import by, two_admins


@pytest.fixture
def uow() -> FakeUnitOfWork:
    return FakeUnitOfWork()


def make_bulk(
    *,
    request_ids: tuple[str, ...] = (),
    approve: bool = True,
    bulk_id: str | None = None,
    plan_id: str | None = None,
    consumer_id: str | None = None,
    submitted_before: datetime | None = None,
    key: AdminKey = ADMIN_KEY,
    audience: str = AUDIENCE,
    sender: str | None = None,
) -> DecideBulk:
    """A bulk decision signed (with fake_signature) by ``key``; a fresh random bulk id unless given."""
    bulk_id = bulk_id or str(uuid.uuid4())
    decided_at = utcnow()
    signed_bytes = "|".join(
        [bulk_id, ",".join(request_ids), str(approve), str(plan_id), str(consumer_id), str(submitted_before)]
    ).encode()
    return DecideBulk(
        bulk_id=bulk_id,
        approve=approve,
        admin_id=ADMIN_ID,
        reason="backlog cleared",
        decided_at=decided_at,
        request_ids=request_ids,
        plan_id=plan_id,
        consumer_id=consumer_id,
        submitted_before=submitted_before,
        signature=Signature(
            key_id=key.key_id,
            value=fake_signature(key.public_key, signed_bytes),
            signed_bytes=signed_bytes,
            audience=audience,
        ),
        sender=sender,
    )


class TestABulkDecisionByIds:
    def test_decides_each_request_on_its_own_with_a_result_per_item(self, uow: FakeUnitOfWork) -> None:
        # Given two pending requests, one already decided, and an id that names nothing
        first, second, decided = pending_review(uow), pending_review(uow), pending_review(uow)
        decide(make_decision(decided, approve=False, reason="no"), uow=uow, **SIGNED)
        unknown = str(uuid.uuid4())

        # When an admin approves all four at once
        bulk = make_bulk(request_ids=(first, second, decided, unknown))
        recorded = decide_bulk(bulk, uow=uow, **SIGNED)  # type: ignore[arg-type]

        # Then each has its own result, and the bulk is recorded with them
        assert recorded.results == {
            first: "applied",
            second: "applied",
            decided: "already_decided",
            unknown: "not_found",
        }
        assert recorded.outcome is DecisionOutcome.APPLIED
        assert uow.bulk_decisions.saved(bulk.bulk_id) == recorded
        assert saved(uow, first).status is Status.APPROVED
        assert saved(uow, second).status is Status.APPROVED
        assert saved(uow, decided).status is Status.REJECTED
        # And each item is a decision of its own, in the request's trail, with the bulk's key
        for request_id in (first, second, decided, unknown):
            item = uow.decisions.saved(bulk_item_decision_id(bulk.bulk_id, request_id))
            assert item is not None and item.request_id == request_id and item.key_id == ADMIN_KEY.key_id
        assert saved(uow, first).history[-1].actor_id == ADMIN_ID
        assert "access_request.bulk_decided" in uow.told
        # And the admins are told the results, once, in the transaction that recorded them
        [told] = uow.outbox.admin_events
        assert (told.bulk_id, told.admin_id, told.approve, told.outcome) == (
            bulk.bulk_id,
            ADMIN_ID,
            True,
            "applied",
        )
        assert dict(told.results) == recorded.results
        assert [request_id for request_id, _ in told.results] == [first, second, decided, unknown]

    def test_replayed_changes_nothing_and_returns_the_recorded_results(self, uow: FakeUnitOfWork) -> None:
        # Given a bulk rejection that was applied
        request_id = pending_review(uow)
        bulk = make_bulk(request_ids=(request_id,), approve=False)
        first = decide_bulk(bulk, uow=uow, **SIGNED)  # type: ignore[arg-type]
        published = list(uow.published)

        # When the same message is delivered again
        again = decide_bulk(bulk, uow=uow, **SIGNED)  # type: ignore[arg-type]

        # Then its id stops it: the same results, nothing new
        assert again.results == first.results == {request_id: "applied"}
        assert uow.published == published
        assert len(uow.outbox.admin_events) == 1
        assert uow.told[-1] == "access_request.bulk_duplicate_ignored"

    def test_redelivered_after_a_crash_half_way_resumes_the_rest(self, uow: FakeUnitOfWork) -> None:
        # Given a bulk whose first item was decided before the worker died (the bulk not yet recorded)
        first, second = pending_review(uow), pending_review(uow)
        bulk = make_bulk(request_ids=(first, second))
        decide(
            dataclasses.replace(make_decision(first), decision_id=bulk_item_decision_id(bulk.bulk_id, first)),
            uow=uow,
            **SIGNED,  # type: ignore[arg-type]
        )
        published = len(uow.published)

        # When the message is redelivered
        recorded = decide_bulk(bulk, uow=uow, **SIGNED)  # type: ignore[arg-type]

        # Then the first is reported as decided by it, not decided twice, and the second is decided
        assert recorded.results == {first: "applied", second: "applied"}
        assert saved(uow, second).status is Status.APPROVED
        assert len([h for h in saved(uow, first).history if h.to_status is Status.APPROVED]) == 1
        assert len(uow.published) > published


class TestABulkDecisionByFilter:
    def test_selects_only_pending_requests_matching_every_filter(self, uow: FakeUnitOfWork) -> None:
        # Given pending requests of two consumers, and an approved one
        acme = pending_review(uow)
        globex = pending_review(
            uow,
            consumer_id="globex",
            consumer_email="api@globex.example",
            app_id="globex-app",
            portal_id="globex-portal",
            sender="portal-globex",
        )
        decided = pending_review(uow)
        decide(make_decision(decided), uow=uow, **SIGNED)

        # When an admin rejects Acme's pending requests on the partner plan
        bulk = make_bulk(approve=False, plan_id="partner", consumer_id="acme")
        recorded = decide_bulk(bulk, uow=uow, **SIGNED)  # type: ignore[arg-type]

        # Then only Acme's pending one is selected and rejected
        assert recorded.results == {acme: "applied"}
        assert recorded.selection == "plan_id=partner consumer_id=acme"
        assert saved(uow, acme).status is Status.REJECTED
        assert saved(uow, globex).status is Status.PENDING_REVIEW

    def test_submitted_before_leaves_newer_requests(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        before = saved(uow, request_id).received_at
        recorded = decide_bulk(make_bulk(submitted_before=before), uow=uow, **SIGNED)  # type: ignore[arg-type]
        assert recorded.results == {}
        assert recorded.outcome is DecisionOutcome.IGNORED
        [told] = uow.outbox.admin_events
        assert (told.outcome, told.outcome_reason, told.results) == (
            "ignored",
            "no pending request matches",
            (),
        )
        assert saved(uow, request_id).status is Status.PENDING_REVIEW


class TestARefusedBulkDecision:
    def test_is_recorded_and_decides_nothing(self, uow: FakeUnitOfWork) -> None:
        # Given a pending request and a bulk signed for another deployment
        request_id = pending_review(uow)
        bulk = make_bulk(request_ids=(request_id,), audience="elsewhere")

        # When it arrives
        recorded = decide_bulk(bulk, uow=uow, **SIGNED)  # type: ignore[arg-type]

        # Then it is recorded as refused, each item refused, and nothing decided
        assert recorded.outcome is DecisionOutcome.REFUSED
        assert recorded.outcome_reason.startswith("rejected_auth: signed for 'elsewhere'")
        assert recorded.results == {request_id: BulkItemResult.REFUSED.value}
        assert uow.bulk_decisions.saved(bulk.bulk_id) == recorded
        assert saved(uow, request_id).status is Status.PENDING_REVIEW
        assert uow.decisions.saved(bulk_item_decision_id(bulk.bulk_id, request_id)) is None
        assert uow.told[-1] == "access_request.bulk_refused"
        # And the admins hear that it was refused, and why: a forged or misdirected one is seen
        [told] = uow.outbox.admin_events
        assert (told.outcome, told.results) == ("refused", ((request_id, "refused"),))
        assert told.outcome_reason == recorded.outcome_reason

    def test_a_stale_one_is_refused(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        bulk = dataclasses.replace(
            make_bulk(request_ids=(request_id,)), decided_at=utcnow() - timedelta(hours=1)
        )
        recorded = decide_bulk(bulk, uow=uow, **SIGNED)  # type: ignore[arg-type]
        assert recorded.outcome is DecisionOutcome.REFUSED
        assert "stale bulk decision" in recorded.outcome_reason
        assert saved(uow, request_id).status is Status.PENDING_REVIEW

    def test_from_a_portal_user_is_refused(self, uow: FakeUnitOfWork) -> None:
        request_id = pending_review(uow)
        recorded = decide_bulk(
            make_bulk(request_ids=(request_id,), sender="portal-acme"),
            uow=uow,
            **SIGNED,  # type: ignore[arg-type]
        )
        assert recorded.outcome is DecisionOutcome.REFUSED
        assert saved(uow, request_id).status is Status.PENDING_REVIEW


class TestABulkApprovalOfARequestNeedingSeveral:
    def test_counts_once_per_admin_and_the_others_approval_applies_it(self) -> None:
        # Given a request whose plan needs two distinct approvals
        uow, request_id = two_admins()

        # When the admin approves it in a bulk / Then it is counted, still pending
        first = decide_bulk(make_bulk(request_ids=(request_id,)), uow=uow, **SIGNED)  # type: ignore[arg-type]
        assert first.results == {request_id: "counted"}
        assert saved(uow, request_id).status is Status.PENDING_REVIEW

        # When the same admin approves it again in another bulk / Then it does not count twice
        again = decide_bulk(make_bulk(request_ids=(request_id,)), uow=uow, **SIGNED)  # type: ignore[arg-type]
        assert again.results == {request_id: "ignored"}

        # When the second admin approves it on its own / Then it is approved
        assert decide(by("erin", request_id), uow=uow, **SIGNED) is DecisionOutcome.APPLIED  # type: ignore[arg-type]
        assert saved(uow, request_id).status is Status.APPROVED
