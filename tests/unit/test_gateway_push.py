"""Pushing credential changes to the gateway: the handler through fakes, and the webhook's signing rules.

The webhook itself talks to a real HTTP server in tests/integration/test_gateway_webhook.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from domain.commands import IssueCredentials, PushCredentialChange
from domain.errors import PermanentDeliveryError, TransientError
from domain.handlers import derived_id, gateway_event_id, issue_credentials, push_to_gateway, route_request
from domain.ports import CredentialChange
from infra.gateway.webhook import StandardWebhookGateway, body_of, sign
from infra.settings import Settings, webhook_key
from messages import v1
from messages.routes import PUSH, route_for_command
from tests.unit.fakes import (
    FakeGateway,
    FakeIssuer,
    FakePortalSealer,
    FakeSealer,
    FakeUnitOfWork,
    make_route_request,
)

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()


def issued(uow: FakeUnitOfWork, issuer: FakeIssuer, *, gateway_configured: bool) -> str:
    """An auto-approved request of Acme's portal, its credential issued; its request id."""
    command = make_route_request()
    route_request(command, uow=uow)
    issue_credentials(
        IssueCredentials(command.request_id),
        uow=uow,
        issuer=issuer,
        sealer=FakeSealer(),
        portal_sealer=FakePortalSealer(),
        gateway_configured=gateway_configured,
    )
    return command.request_id


def pushes(uow: FakeUnitOfWork) -> list[PushCredentialChange]:
    return [c for c in uow.published if isinstance(c, PushCredentialChange)]


def a_change(**overrides: object) -> CredentialChange:
    values: dict[str, object] = {
        "event_id": gateway_event_id("c-1", 1),
        "change": "issued",
        "revision": 1,
        "occurred_at": datetime(2026, 11, 27, 13, 0, tzinfo=UTC),
        "credential_id": "c-1",
        "public_id": "af_12345678",
        "app_id": "acme-web",
        "consumer_id": "acme",
        "kind": "api_key",
        "status": "active",
        "product_ids": ("payments",),
        "rate_limit_per_minute": 60,
        "monthly_quota": 10_000,
        "secret_hash": "sha256:" + "ab" * 32,
    }
    values.update(overrides)
    return CredentialChange(**values)  # type: ignore[arg-type]


class TestIssuingWithAGatewayConfigured:
    def test_queues_one_push_of_the_new_credential_in_the_same_transaction(self) -> None:
        # Given a gateway configured
        uow, issuer = FakeUnitOfWork(), FakeIssuer()

        # When a credential is issued
        request_id = issued(uow, issuer, gateway_configured=True)

        # Then one push, revision 1, was committed with it
        assert pushes(uow) == [PushCredentialChange(derived_id("credential", request_id), "issued", 1)]

    def test_a_redelivered_issue_queues_no_second_push(self) -> None:
        uow, issuer = FakeUnitOfWork(), FakeIssuer()
        request_id = issued(uow, issuer, gateway_configured=True)

        issue_credentials(
            IssueCredentials(request_id),
            uow=uow,
            issuer=issuer,
            sealer=FakeSealer(),
            portal_sealer=FakePortalSealer(),
            gateway_configured=True,
        )

        assert len(pushes(uow)) == 1


class TestIssuingWithoutAGateway:
    def test_queues_nothing_for_it(self) -> None:
        uow = FakeUnitOfWork()
        issued(uow, FakeIssuer(), gateway_configured=False)
        assert pushes(uow) == []


class TestPushingACredentialChange:
    def test_pushes_the_stored_credential_with_its_limits_and_hash_and_never_its_secret(self) -> None:
        # Given an issued credential
        uow, issuer, gateway = FakeUnitOfWork(), FakeIssuer(), FakeGateway()
        request_id = issued(uow, issuer, gateway_configured=True)
        [command] = pushes(uow)

        # When its push is handled
        pushed = push_to_gateway(command, uow=uow, gateway=gateway)

        # Then the gateway got the credential as stored, with the plan's limits
        credential = uow.credentials.saved(request_id)
        assert credential is not None
        assert gateway.pushed == [pushed]
        assert pushed == CredentialChange(
            event_id=gateway_event_id(credential.id, 1),
            change="issued",
            revision=1,
            occurred_at=credential.created_at,
            credential_id=credential.id,
            public_id="key-1",
            app_id="acme-web",
            consumer_id="acme",
            kind="api_key",
            status="active",
            product_ids=("payments",),
            rate_limit_per_minute=60,
            monthly_quota=10_000,
            secret_hash=credential.secret_hash,
            expires_at=None,
            plan_id="free",
        )
        # And the hash, never the secret, anywhere in it or in what was told
        assert issuer.secrets[0] not in repr(dataclasses.asdict(pushed))
        assert issuer.secrets[0] not in repr(uow.outcomes)
        assert uow.told[-1] == "gateway.pushed"

    def test_every_attempt_at_one_revision_has_the_same_event_id_and_the_next_revision_another(
        self,
    ) -> None:
        uow, gateway = FakeUnitOfWork(), FakeGateway()
        issued(uow, FakeIssuer(), gateway_configured=True)
        [command] = pushes(uow)

        first = push_to_gateway(command, uow=uow, gateway=gateway)
        again = push_to_gateway(command, uow=uow, gateway=gateway)
        later = push_to_gateway(dataclasses.replace(command, revision=2), uow=uow, gateway=gateway)

        assert first is not None and again is not None and later is not None
        assert first.event_id == again.event_id != later.event_id

    def test_a_credential_that_is_gone_is_dropped_quietly(self) -> None:
        uow, gateway = FakeUnitOfWork(), FakeGateway()

        pushed = push_to_gateway(PushCredentialChange("no-such", "issued", 1), uow=uow, gateway=gateway)

        assert pushed is None
        assert gateway.attempts == 0
        assert uow.told == ["gateway.push_dropped"]

    def test_a_transient_failure_is_raised_for_a_retry(self) -> None:
        uow, gateway = FakeUnitOfWork(), FakeGateway()
        issued(uow, FakeIssuer(), gateway_configured=True)
        gateway.fail_next(TransientError, "503 Service Unavailable")

        with pytest.raises(TransientError):
            push_to_gateway(pushes(uow)[0], uow=uow, gateway=gateway)

        assert gateway.pushed == []

    def test_a_refusal_is_told_with_its_reason_and_raised_for_the_dead_letter(self) -> None:
        uow, gateway = FakeUnitOfWork(), FakeGateway()
        issued(uow, FakeIssuer(), gateway_configured=True)
        gateway.fail_next(PermanentDeliveryError, "400 Bad Request (unknown product)")

        with pytest.raises(PermanentDeliveryError):
            push_to_gateway(pushes(uow)[0], uow=uow, gateway=gateway)

        assert uow.told[-1] == "gateway.push_refused"
        assert "unknown product" in str(uow.outcomes[-1])

    def test_a_worker_without_a_gateway_refuses_it_for_the_dead_letter_queue(self) -> None:
        uow = FakeUnitOfWork()
        issued(uow, FakeIssuer(), gateway_configured=True)

        with pytest.raises(PermanentDeliveryError, match="ACCESSFLOW_GATEWAY_WEBHOOK_URL"):
            push_to_gateway(pushes(uow)[0], uow=uow, gateway=None)


class TestTheWireContract:
    def test_the_command_travels_on_the_gateway_queue_and_comes_back_the_same(self) -> None:
        command = PushCredentialChange(derived_id("credential", "r"), "issued", 1)

        route, payload = route_for_command(command)

        assert route is PUSH
        assert payload == {
            "version": 1,
            "type": "gateway.push",
            "credential_id": command.credential_id,
            "change": "issued",
            "revision": 1,
        }
        assert v1.PushCredentialChange.model_validate(payload).to_command() == command

    @pytest.mark.parametrize(
        "changes", [{"revision": 0}, {"change": "Issued\n"}, {"credential_id": "x"}, {"extra": 1}]
    )
    def test_a_bad_payload_is_refused(self, changes: dict[str, object]) -> None:
        payload = {
            "credential_id": derived_id("credential", "r"),
            "change": "issued",
            "revision": 1,
            **changes,
        }
        with pytest.raises(ValidationError):
            v1.PushCredentialChange.model_validate(payload)


class TestTheSignature:
    def test_an_independent_implementation_verifies_it_and_reads_the_body(self) -> None:
        change = a_change()
        body = body_of(change)
        timestamp = int(datetime.now(UTC).timestamp())
        headers = {
            "webhook-id": change.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign([KEY], change.event_id, timestamp, body),
        }

        verified = Webhook(SECRET).verify(body, headers)

        assert verified["type"] == "credential.issued"
        assert verified["data"]["secret_hash"] == change.secret_hash
        assert verified["data"]["product_ids"] == ["payments"]

    def test_a_tampered_body_id_or_timestamp_fails_it(self) -> None:
        change = a_change()
        body = body_of(change)
        timestamp = int(datetime.now(UTC).timestamp())
        good = {
            "webhook-id": change.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign([KEY], change.event_id, timestamp, body),
        }
        tampered_body = body.replace(b'"rate_limit_per_minute":60', b'"rate_limit_per_minute":6000')
        assert tampered_body != body
        for data, headers in [
            (tampered_body, good),
            (body, {**good, "webhook-id": gateway_event_id("c-1", 2)}),
            (body, {**good, "webhook-timestamp": str(timestamp - 1)}),
        ]:
            with pytest.raises(WebhookVerificationError):
                Webhook(SECRET).verify(data, headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(OTHER_SECRET).verify(body, good)

    def test_during_a_rotation_either_secret_verifies_it(self) -> None:
        body, timestamp = body_of(a_change()), int(datetime.now(UTC).timestamp())
        signature = sign([webhook_key(SECRET), webhook_key(OTHER_SECRET)], "id-1", timestamp, body)
        headers = {"webhook-id": "id-1", "webhook-timestamp": str(timestamp), "webhook-signature": signature}

        assert len(signature.split(" ")) == 2
        for secret in (SECRET, OTHER_SECRET):
            Webhook(secret).verify(body, headers)

    def test_the_body_is_compact_sorted_json_with_the_hash_and_no_other_secret_field(self) -> None:
        body = body_of(a_change())
        assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
        data = json.loads(body)["data"]
        # Hashes only: the current secret's, and during a rotation's grace the previous one's.
        assert {k for k in data if "secret" in k} == {"secret_hash", "previous_secret_hash"}


class TestTheSettings:
    def base(self, **values: object) -> Settings:
        return Settings(database_url="sqlite://", broker_url="stub://", **values)  # type: ignore[arg-type]

    def test_no_url_is_no_gateway(self) -> None:
        assert StandardWebhookGateway.from_settings(self.base()) is None
        assert StandardWebhookGateway.from_settings(self.base(gateway_webhook_url="")) is None

    def test_a_url_and_secrets_make_one_that_never_shows_its_keys(self) -> None:
        settings = self.base(
            gateway_webhook_url="https://gateway.example/hooks",
            gateway_webhook_secret=f"{SECRET}, {OTHER_SECRET}",
        )
        gateway = StandardWebhookGateway.from_settings(settings)
        assert gateway is not None
        assert settings.gateway_webhook_secrets() == [SECRET, OTHER_SECRET]
        assert SECRET not in repr(gateway) and SECRET not in repr(settings)

    def test_errors_show_the_url_without_its_query_which_may_hold_a_token(self) -> None:
        gateway = StandardWebhookGateway("http://127.0.0.1:9/hook?token=s3cr3t", [SECRET], 1.0)
        assert gateway.shown_url == "http://127.0.0.1:9/hook"
        assert "s3cr3t" not in repr(gateway)

    @pytest.mark.parametrize(
        ("values", "why"),
        [
            ({"gateway_webhook_url": "ftp://gateway.example/", "gateway_webhook_secret": SECRET}, "http"),
            ({"gateway_webhook_url": "file:///etc/passwd", "gateway_webhook_secret": SECRET}, "http"),
            ({"gateway_webhook_url": "https:///no-host", "gateway_webhook_secret": SECRET}, "http"),
            (
                {"gateway_webhook_url": "https://u:p@gateway.example/", "gateway_webhook_secret": SECRET},
                "user",
            ),
            ({"gateway_webhook_url": "https://gateway.example/"}, "needs"),
            ({"gateway_webhook_secret": SECRET}, "without"),
            ({"gateway_webhook_url": "https://g.example/", "gateway_webhook_secret": "plain"}, "whsec_"),
            ({"gateway_webhook_url": "https://g.example/", "gateway_webhook_secret": "whsec_!!"}, "base64"),
            (
                {"gateway_webhook_url": "https://g.example/", "gateway_webhook_secret": "whsec_AAAA"},
                "24 to 64",
            ),
        ],
    )
    def test_refuses_at_load_what_could_not_push_safely(self, values: dict[str, object], why: str) -> None:
        with pytest.raises(ValidationError, match=why) as refused:
            self.base(**values)
        assert SECRET not in str(refused.value)
