"""The gateway webhook against a real HTTP server started by the test, and through a real dramatiq worker.

Every push is checked with the ``standardwebhooks`` package, an implementation of the spec
independent of accessflow's. The worker tests run the gateway actor as a pool runs it: a
credential issued by the real handler queues its push in the outbox, the relay publishes it
to RabbitMQ, and a dramatiq worker on the gateway queue, with the delivery guard and Retries,
posts it to the server.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import dramatiq
import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import WebhookVerificationError

from domain import commands, handlers
from domain.errors import PermanentDeliveryError, TransientError
from domain.model import Credential
from domain.ports import CredentialChange
from infra.bootstrap import Services, build, declare_topology, wire
from infra.gateway.webhook import StandardWebhookGateway
from infra.messaging import dead_letters
from infra.settings import Settings
from messages.routes import PUSH, ROUTES
from tests import services as svc
from tests.gateway import GatewayServer, gateway_server, new_secret
from tests.integration.test_persistence import routed

pytestmark = pytest.mark.integration

#: Seconds a test waits for the worker to do what it expects; it takes well under one.
DEADLINE = 30.0


def change(**overrides: object) -> CredentialChange:
    credential_id = str(uuid.uuid4())
    values: dict[str, object] = {
        "event_id": handlers.gateway_event_id(credential_id, 1),
        "change": "issued",
        "revision": 1,
        "occurred_at": datetime.now(UTC),
        "credential_id": credential_id,
        "public_id": "af_0badcafe",
        "app_id": "acme-checkout",
        "consumer_id": "acme",
        "kind": "api_key",
        "status": "active",
        "product_ids": ("payments",),
        "rate_limit_per_minute": 60,
        "monthly_quota": None,
        "secret_hash": "sha256:" + "cd" * 32,
    }
    values.update(overrides)
    return CredentialChange(**values)  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[GatewayServer]:
    with gateway_server() as running:
        yield running


@pytest.fixture
def secret() -> str:
    return new_secret()


def gateway_to(server: GatewayServer, *secrets: str, timeout: float = 5.0) -> StandardWebhookGateway:
    return StandardWebhookGateway(server.url, list(secrets), timeout)


class TestAPushTheGatewayTakes:
    def test_arrives_signed_and_an_independent_implementation_verifies_it(
        self, server: GatewayServer, secret: str
    ) -> None:
        # Given a change, and a gateway that takes it
        pushed = change()

        # When it is pushed
        gateway_to(server, secret).push(pushed)

        # Then the server got one POST on the configured path, which standardwebhooks verifies
        [received] = server.requests()
        assert received.path == "/accessflow/credentials"
        assert received.headers["content-type"] == "application/json"
        assert received.webhook_id == pushed.event_id
        assert abs(int(received.headers["webhook-timestamp"]) - time.time()) < 60
        body = received.verified(secret)
        assert body["type"] == "credential.issued"
        assert body["data"]["credential_id"] == pushed.credential_id
        assert body["data"]["secret_hash"] == pushed.secret_hash
        assert (body["data"]["rate_limit_per_minute"], body["data"]["monthly_quota"]) == (60, None)

    def test_a_tampered_copy_or_another_secret_fails_verification(
        self, server: GatewayServer, secret: str
    ) -> None:
        gateway_to(server, secret).push(change())
        [received] = server.requests()

        forged = dataclasses.replace(received, body=received.body.replace(b'"active"', b'"revoked"'))
        assert forged.body != received.body
        with pytest.raises(WebhookVerificationError):
            forged.verified(secret)
        replayed_as_another = dataclasses.replace(received, headers={**received.headers, "webhook-id": "x"})
        with pytest.raises(WebhookVerificationError):
            replayed_as_another.verified(secret)
        with pytest.raises(WebhookVerificationError):
            received.verified(new_secret())

    def test_during_a_rotation_it_carries_a_signature_by_each_secret(
        self, server: GatewayServer, secret: str
    ) -> None:
        old = new_secret()
        gateway_to(server, secret, old).push(change())

        [received] = server.requests()
        assert len(received.headers["webhook-signature"].split(" ")) == 2
        for either in (secret, old):
            received.verified(either)


class TestAnswersThatARetryMayChange:
    @pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
    def test_are_transient(self, server: GatewayServer, secret: str, status: int) -> None:
        server.answer(status, b"busy")
        with pytest.raises(TransientError, match=str(status)):
            gateway_to(server, secret).push(change())

    def test_a_gateway_that_does_not_answer_in_time_is_transient_and_the_push_ends_at_its_deadline(
        self, server: GatewayServer, secret: str
    ) -> None:
        server.answering.clear()  # the server takes the request and sits on it
        started = time.monotonic()
        with pytest.raises(TransientError, match="no answer"):
            gateway_to(server, secret, timeout=0.5).push(change())
        assert time.monotonic() - started < 5

    def test_no_server_listening_is_transient(self, secret: str) -> None:
        gateway = StandardWebhookGateway(f"http://127.0.0.1:{svc.free_port()}/hook", [secret], 2.0)
        with pytest.raises(TransientError, match="no answer"):
            gateway.push(change())


class TestAnswersNoRetryChanges:
    def test_a_4xx_is_permanent_with_what_the_gateway_said(self, server: GatewayServer, secret: str) -> None:
        server.answer(400, b'{"error": "unknown product payments"}')
        with pytest.raises(PermanentDeliveryError, match=r"400 Bad Request .*unknown product payments"):
            gateway_to(server, secret).push(change())

    def test_a_redirect_is_not_followed_and_is_permanent(self, server: GatewayServer, secret: str) -> None:
        server.answer(307, location="http://elsewhere.example/steal")
        with pytest.raises(PermanentDeliveryError, match="redirects are not followed"):
            gateway_to(server, secret).push(change())
        assert len(server.requests()) == 1


# --- through a real worker ------------------------------------------------------------------------


@pytest.fixture
def worker_services(integration_settings: Settings, server: GatewayServer, secret: str) -> Iterator[Services]:
    """Services with the gateway configured, on queues of this test's own, wired as a worker wires them."""
    prefix = f"{integration_settings.queue_prefix}-gw-{uuid.uuid4().hex[:6]}"
    settings = integration_settings.model_copy(
        update={
            "queue_prefix": prefix,
            "gateway_webhook_url": server.url,
            "gateway_webhook_secret": SecretStr(secret),
            "gateway_webhook_timeout_seconds": 5.0,
        }
    )
    built = build(settings)
    try:
        wire(built)
        declare_topology(built)  # the events exchange, for the credentials.issued event of the issue
        yield built
    finally:
        built.broker.close()
        built.close()
        svc.delete_queues(settings.broker_url, prefix, [route.queue for route in ROUTES])


@pytest.fixture
def worker(worker_services: Services) -> Iterator[dramatiq.Worker]:
    """One dramatiq worker thread on the gateway queue (and its delay queue) only."""
    running = dramatiq.Worker(
        worker_services.broker,
        queues={PUSH.queue_name(worker_services.settings.queue_prefix)},
        worker_threads=1,
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def issued(services: Services) -> Credential:
    """An auto-approved request's credential, issued by the real handler with the gateway configured."""
    request_id = routed(services, plan_id="starter")
    credential = handlers.issue_credentials(
        commands.IssueCredentials(request_id),
        uow=services.uow(),
        issuer=services.issuer,
        sealer=services.sealer(),
        portal_sealer=services.portal_sealer,
        gateway_configured=services.gateway is not None,
    )
    assert credential is not None
    return credential


class TestThroughAWorker:
    def test_an_issued_credential_reaches_the_gateway_verified_with_its_stored_values(
        self, worker_services: Services, worker: dramatiq.Worker, server: GatewayServer, secret: str
    ) -> None:
        # When a credential is issued with the gateway configured
        credential = issued(worker_services)

        # Then the worker pushes it, once, signed, with the values stored
        [received] = svc.wait_until(lambda: server.about(credential.id), timeout=DEADLINE, what="the push")
        data = received.verified(secret)["data"]
        assert received.webhook_id == handlers.gateway_event_id(credential.id, 1)
        assert data["public_id"] == credential.public_id
        assert data["secret_hash"] == credential.secret_hash
        assert (data["app_id"], data["consumer_id"]) == ("acme-checkout", "acme")
        assert data["product_ids"] == credential.product_ids
        assert data["rate_limit_per_minute"] == credential.rate_limit_per_minute

    def test_a_500_is_retried_and_the_retry_delivers_it_with_the_same_webhook_id(
        self, worker_services: Services, worker: dramatiq.Worker, server: GatewayServer, secret: str
    ) -> None:
        # Given a gateway that fails the first attempt
        server.answer(500, b"try again")

        # When a credential is issued
        credential = issued(worker_services)

        # Then the retry (after dramatiq's backoff) delivers it, under the same id, signed anew
        first, retry = svc.wait_until(
            lambda: server.about(credential.id) if len(server.about(credential.id)) >= 2 else None,
            timeout=DEADLINE,
            what="the push and its retry",
        )
        assert first.webhook_id == retry.webhook_id == handlers.gateway_event_id(credential.id, 1)
        assert first.body == retry.body
        for attempt in (first, retry):
            attempt.verified(secret)
        # And nothing is dead-lettered
        xq = f"{PUSH.queue_name(worker_services.settings.queue_prefix)}.XQ"
        assert svc.queue_depth(worker_services.settings.broker_url, xq) == 0

    def test_a_4xx_lands_in_the_dead_letter_queue_at_once_with_the_gateways_reason(
        self, worker_services: Services, worker: dramatiq.Worker, server: GatewayServer
    ) -> None:
        # Given a gateway that refuses the change
        server.answer(422, b"plan free unknown here", times=10)
        settings = worker_services.settings
        xq = f"{PUSH.queue_name(settings.queue_prefix)}.XQ"

        # When a credential is issued
        credential = issued(worker_services)

        # Then its push is dead-lettered after one attempt, not retried
        svc.wait_until(
            lambda: svc.queue_depth(settings.broker_url, xq) == 1, timeout=DEADLINE, what="the dead letter"
        )
        assert len(server.about(credential.id)) == 1
        # And `dlq list` shows why, in the gateway's words
        [letter] = dead_letters.peek(settings.broker_url, worker_services.session_factory, xq)
        assert letter.actor_name == PUSH.actor_name
        assert letter.reason.startswith("refused for good, not retried: PermanentDeliveryError:")
        assert "422 Unprocessable Entity (plan free unknown here)" in letter.reason
        assert svc.queue_depth(settings.broker_url, xq) == 1  # looking leaves it there
