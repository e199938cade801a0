"""The gateway push, end to end: real worker pools issue a credential, and a real HTTP server receives it.

The session's pools run with ACCESSFLOW_GATEWAY_WEBHOOK_URL pointing at the server that
``tests/e2e/conftest.py`` starts, as a deployment with a gateway runs them.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from domain.handlers import gateway_event_id
from domain.model import Status
from infra.bootstrap import Services
from infra.db import orm
from tests import services as svc
from tests.e2e.conftest import PortalClient, request_payload, wait_for_status
from tests.gateway import GatewayServer

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]


class TestAnAutoApprovedRequest:
    def test_its_credential_is_pushed_signed_to_the_gateway_with_its_hash_and_never_its_secret(
        self, portal: PortalClient, services: Services, gateway: GatewayServer, gateway_secret: str
    ) -> None:
        # Given an auto-approved request from Acme's portal
        request_id = portal.submit(request_payload(product_ids=["payments", "ledger"]))

        # When the workers have provisioned it
        wait_for_status(services, request_id, Status.PROVISIONED)
        with services.engine.connect() as connection:
            credential = connection.execute(
                sa.select(orm.credentials).where(orm.credentials.c.request_id == request_id)
            ).one()

        # Then the gateway received its credential once, and the signature verifies
        [received] = svc.wait_until(lambda: gateway.about(credential.id), what="the gateway push")
        body = received.verified(gateway_secret)
        assert received.webhook_id == gateway_event_id(credential.id, 1)
        assert body["type"] == "credential.issued"
        data = body["data"]
        assert data["change"] == "issued" and data["revision"] == 1 and data["status"] == "active"
        assert data["public_id"] == credential.public_id
        assert (data["app_id"], data["consumer_id"]) == ("acme-checkout", "acme")
        assert sorted(data["product_ids"]) == ["ledger", "payments"]
        assert (data["rate_limit_per_minute"], data["monthly_quota"]) == (60, 10_000)
        # And it carries the hash the gateway checks keys against, never the secret the portal opened
        assert data["secret_hash"] == credential.secret_hash
        events = portal.wait_for_events(request_id, "credentials.issued")
        [issued] = [e for e in events if e["event"] == "credentials.issued"]
        secret = portal.open(issued["sealed_secret"]["value"])
        assert secret not in received.body.decode()
        assert all(secret not in value for value in received.headers.values())
