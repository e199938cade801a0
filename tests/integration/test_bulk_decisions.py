"""Bulk decisions on real PostgreSQL: a filter selects the pending requests, the handler decides each."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain import handlers
from domain.model import BulkDecision, DecisionOutcome, Status
from infra.bootstrap import Services
from infra.cli import producer
from infra.credentials import signing
from messages import v2
from tests import services as svc
from tests.conftest import ADMIN_ID, Parties
from tests.integration.test_approval_rules import route

pytestmark = pytest.mark.integration


def signed(services: Services, parties: Parties, **selection: object) -> v2.BulkDecision:
    """A bulk approval signed with the admin's key, as the CLI signs it."""
    key: Ed25519PrivateKey = signing.load_private_key(parties.admin_key_file)
    message = producer.signed_bulk_decision(
        approve=True,
        admin_id=ADMIN_ID,
        reason="backlog",
        audience=services.settings.queue_prefix,
        key_id=parties.admin_key_id,
        private_key=key,
        **selection,  # type: ignore[arg-type]
    )
    return message


def apply(services: Services, message: v2.BulkDecision) -> BulkDecision:
    """What the worker does with it: the real handler, on real PostgreSQL."""
    return handlers.decide_bulk(
        message.to_command(),
        uow=services.uow(),
        verify=services.verify_signature,
        audience=services.settings.queue_prefix,
    )


class TestAFilter:
    def test_selects_the_pending_requests_of_the_plan_and_consumer_only(
        self, services: Services, parties: Parties
    ) -> None:
        # Given a manual plan of this test's own: two of Acme's pending, one of Globex's, one of Acme's approved
        plan_id = svc.plan_with(services)
        acme = [route(services, plan_id)[0] for _ in range(2)]
        globex, _ = route(services, plan_id, consumer_id="globex")
        approved, _ = route(services, plan_id)
        with services.uow() as uow:
            request = uow.requests.get(approved, for_update=True)
            assert request is not None
            request.approve(admin_id=ADMIN_ID, reason="earlier")
            uow.commit()

        # When a bulk approval selects Acme's pending requests on the plan
        message = signed(services, parties, plan_id=plan_id, consumer_id="acme")
        recorded = apply(services, message)

        # Then only those two are decided, and the bulk reads back as recorded
        assert recorded.results == {acme[0]: "applied", acme[1]: "applied"}
        with services.uow() as uow:
            assert uow.bulk_decisions.get(recorded.id) == recorded
            statuses = {r: uow.requests.get(r).status for r in (*acme, globex)}  # type: ignore[union-attr]
        assert statuses == {acme[0]: Status.APPROVED, acme[1]: Status.APPROVED, globex: Status.PENDING_REVIEW}
        # And a replay changes nothing: the recorded results come back
        replayed = apply(services, message)
        assert replayed.results == recorded.results and replayed.outcome is DecisionOutcome.APPLIED

    def test_submitted_before_leaves_the_newer_ones(self, services: Services, parties: Parties) -> None:
        plan_id = svc.plan_with(services)
        older, _ = route(services, plan_id)
        cutoff = datetime.now(UTC)
        newer, _ = route(services, plan_id)
        recorded = apply(services, signed(services, parties, plan_id=plan_id, submitted_before=cutoff))
        assert recorded.results == {older: "applied"}
        with services.uow() as uow:
            request = uow.requests.get(newer)
        assert request is not None and request.status is Status.PENDING_REVIEW
