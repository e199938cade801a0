"""The review console over HTTP (Starlette's TestClient) against real PostgreSQL.

What it publishes goes through a wire of the test's own that keeps each message, so the
tests read the signed decisions themselves and verify them with the admin's public key.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from domain.model import MAX_BULK_ITEMS, ActorKind, BulkDecision, DecisionOutcome, Status
from infra.bootstrap import Services
from infra.console import auth
from infra.console.app import CONTENT_SECURITY_POLICY, Console, create_app
from infra.credentials import signing
from infra.db import orm
from messages import routes
from tests.conftest import Parties
from tests.services import RecordingWire

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
SCRIPT = "<script>alert(1)</script>"
AUDIENCE = "console-tests"


def pending(
    services: Services,
    *,
    name: str = "Initech Developers",
    plan_id: str = "partner",
    age: timedelta = timedelta(hours=1),
    consumer_id: str | None = None,
    deadline: timedelta | None = timedelta(hours=47),
) -> tuple[str, str]:
    """A consumer, its app and a request of it parked for review, written as rows; (request id, consumer id)."""
    now = datetime.now(UTC)
    consumer_id = consumer_id or f"c-{uuid.uuid4().hex[:8]}"
    app_id, request_id = f"a-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    with services.engine.begin() as connection:
        exists = connection.execute(
            sa.select(orm.consumers.c.id).where(orm.consumers.c.id == consumer_id)
        ).first()
        if exists is None:
            connection.execute(
                orm.consumers.insert().values(id=consumer_id, email=f"{consumer_id}@example.org", name=name)
            )
        connection.execute(orm.apps.insert().values(id=app_id, consumer_id=consumer_id, name=f"{name} app"))
        connection.execute(
            orm.access_requests.insert().values(
                id=request_id,
                consumer_id=consumer_id,
                plan_id=plan_id,
                product_ids=["payments", "ledger"],
                app_id=app_id,
                justification=f"{name} needs it",
                submitted_at=now - age,
                received_at=now - age,
                status=Status.PENDING_REVIEW,
                status_reason=f"plan {plan_id} requires manual review",
                updated_at=now - age,
                review_deadline_at=now + deadline if deadline is not None else None,
            )
        )
        connection.execute(
            orm.audit_log.insert().values(
                request_id=request_id,
                from_status=None,
                to_status=Status.PENDING_REVIEW,
                actor_kind=ActorKind.SYSTEM,
                actor_id="router",
                reason=f"plan {plan_id} requires manual review",
                at=now - age,
            )
        )
    return request_id, consumer_id


@pytest.fixture
def wire() -> RecordingWire:
    return RecordingWire()


@pytest.fixture
def admin(parties: Parties) -> auth.ConsoleAdmin:
    return auth.ConsoleAdmin(
        admin_id=parties.admin_id,
        password_hash=auth.hash_password(PASSWORD),
        key_file=parties.admin_key_file,
        key_id=parties.admin_key_id,
    )


@pytest.fixture
def client(services: Services, wire: RecordingWire, admin: auth.ConsoleAdmin) -> Iterator[TestClient]:
    app = create_app(
        Console(reads=services.uow, wire=wire, admins={admin.admin_id: admin}, audience=AUDIENCE),
        session_secret="s" * 40,
        secure_cookie=False,
    )
    with TestClient(app) as test_client:
        yield test_client


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "the page has no CSRF field"
    return match.group(1)


def log_in(client: TestClient, admin_id: str, password: str = PASSWORD) -> Any:
    token = csrf_of(client.get("/login").text)
    return client.post(
        "/login",
        data={"admin_id": admin_id, "password": password, "csrf_token": token},
        follow_redirects=False,
    )


@pytest.fixture
def logged_in(client: TestClient, admin: auth.ConsoleAdmin) -> TestClient:
    assert log_in(client, admin.admin_id).status_code == 303
    return client


def assert_signed_by(parties: Parties, decision: dict[str, Any]) -> None:
    public = signing.public_key_text(parties.admin_key.public_key())
    assert decision["signature"]["key_id"] == parties.admin_key_id
    assert signing.verify_signed(public, decision)
    assert decision["admin_id"] == parties.admin_id
    assert decision["audience"] == AUDIENCE


class TestLoggingIn:
    def test_the_right_password_opens_a_session_with_a_strict_httponly_cookie(
        self, client: TestClient, admin: auth.ConsoleAdmin
    ) -> None:
        response = log_in(client, admin.admin_id)
        assert response.status_code == 303
        assert response.headers["location"] == "/queue"
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert "secure" not in cookie  # loopback: no TLS to require
        assert client.get("/queue").status_code == 200

    def test_a_wrong_password_or_unknown_admin_is_refused(
        self, client: TestClient, admin: auth.ConsoleAdmin
    ) -> None:
        for admin_id, password in [(admin.admin_id, "wrong"), ("mallory", PASSWORD)]:
            response = log_in(client, admin_id, password)
            assert response.status_code == 401
            assert "Unknown admin or wrong password" in response.text
        # Still not in: the queue sends us to the login page
        response = client.get("/queue", follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"] == "/login"

    def test_too_many_failures_lock_the_admin_id_out_for_a_while(
        self, services: Services, admin: auth.ConsoleAdmin
    ) -> None:
        now = [0.0]
        throttle = auth.LoginThrottle(failures=3, window_seconds=60, clock=lambda: now[0])
        app = create_app(
            Console(services.uow, RecordingWire(), {admin.admin_id: admin}, AUDIENCE, throttle=throttle),
            session_secret="s" * 40,
            secure_cookie=False,
        )
        with TestClient(app) as client:
            assert [log_in(client, admin.admin_id, "guess").status_code for _ in range(3)] == [401] * 3
            # Even the right password is refused while the window lasts
            assert log_in(client, admin.admin_id).status_code == 429
            now[0] = 61.0
            assert log_in(client, admin.admin_id).status_code == 303

    def test_off_loopback_the_cookie_is_secure(self, services: Services, admin: auth.ConsoleAdmin) -> None:
        app = create_app(
            Console(services.uow, RecordingWire(), {admin.admin_id: admin}, AUDIENCE),
            session_secret="s" * 40,
            secure_cookie=True,
        )
        with TestClient(app, base_url="https://console.example") as client:
            response = log_in(client, admin.admin_id)
        assert "secure" in response.headers["set-cookie"].lower()

    def test_logging_out_ends_the_session(self, logged_in: TestClient) -> None:
        token = csrf_of(logged_in.get("/queue").text)
        assert (
            logged_in.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
        )
        assert logged_in.get("/queue", follow_redirects=False).headers["location"] == "/login"


class TestCsrf:
    def test_a_post_without_the_sessions_token_is_refused_and_publishes_nothing(
        self, services: Services, logged_in: TestClient, wire: RecordingWire
    ) -> None:
        request_id, _ = pending(services)
        for data in [{"reason": "ok"}, {"reason": "ok", "csrf_token": "forged"}]:
            response = logged_in.post(f"/requests/{request_id}/approve", data=data)
            assert response.status_code == 403
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert logged_in.post("/bulk-approve", data={"plan_id": "partner"}).status_code == 403
        assert logged_in.post("/logout", data={}).status_code == 403
        assert wire.sent == []

    def test_a_login_without_the_token_is_refused(self, client: TestClient, admin: auth.ConsoleAdmin) -> None:
        response = client.post("/login", data={"admin_id": admin.admin_id, "password": PASSWORD})
        assert response.status_code == 403


class TestHeaders:
    def test_every_page_carries_the_strict_csp_and_friends(
        self, services: Services, logged_in: TestClient
    ) -> None:
        request_id, _ = pending(services)
        for path in ["/login", "/queue", f"/requests/{request_id}", "/static/console.css", "/nowhere"]:
            response = logged_in.get(path, follow_redirects=False)
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in CONTENT_SECURITY_POLICY
        assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY

    def test_pages_hold_no_inline_script_or_style(self, services: Services, logged_in: TestClient) -> None:
        request_id, _ = pending(services)
        for path in ["/login", "/queue", f"/requests/{request_id}"]:
            page = logged_in.get(path).text
            assert "<script" not in page and "<style" not in page and " style=" not in page


class TestEscaping:
    def test_names_that_are_markup_are_shown_escaped(self, services: Services, logged_in: TestClient) -> None:
        # Given a consumer, app and justification named <script>alert(1)</script>
        request_id, consumer_id = pending(services, name=SCRIPT)

        # When the queue and the request's page show them
        queue = logged_in.get("/queue", params={"consumer_id": consumer_id})
        page = logged_in.get(f"/requests/{request_id}")

        # Then every one is escaped, and the CSP is there
        for response in (queue, page):
            assert "<script" not in response.text
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "&lt;script&gt;alert(1)&lt;/script&gt; app" in queue.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt; needs it" in page.text


class TestThePendingQueue:
    def test_lists_user_app_products_plan_age_justification_reason_and_deadline(
        self, services: Services, logged_in: TestClient
    ) -> None:
        request_id, consumer_id = pending(services, name="Hooli Devs", age=timedelta(hours=5))
        page = logged_in.get("/queue", params={"consumer_id": consumer_id}).text
        for shown in [
            request_id[:8],
            "Hooli Devs",
            f"{consumer_id}@example.org",
            "Hooli Devs app",
            "payments, ledger",
            "partner",
            "5h 0m",
            "Hooli Devs needs it",
            "plan partner requires manual review",
            " UTC",
        ]:
            assert shown in page, shown

    def test_filters_by_plan_consumer_and_age(self, services: Services, logged_in: TestClient) -> None:
        young, consumer_id = pending(services, age=timedelta(minutes=5))
        old, _ = pending(services, consumer_id=consumer_id, age=timedelta(hours=30))
        timed, _ = pending(services, consumer_id=consumer_id, plan_id="timed", age=timedelta(hours=30))
        by_age = logged_in.get("/queue", params={"consumer_id": consumer_id, "older_than_hours": "24"}).text
        assert old[:8] in by_age and timed[:8] in by_age and young[:8] not in by_age
        by_plan = logged_in.get("/queue", params={"consumer_id": consumer_id, "plan_id": "timed"}).text
        assert timed[:8] in by_plan and old[:8] not in by_plan and young[:8] not in by_plan

    def test_a_requests_page_shows_its_audit_trail_and_emails(
        self, services: Services, logged_in: TestClient
    ) -> None:
        request_id, _ = pending(services)
        page = logged_in.get(f"/requests/{request_id}").text
        assert "Audit trail" in page and "system:router" in page and "pending_review" in page
        assert "Emails" in page
        assert logged_in.get(f"/requests/{uuid.uuid4()}").status_code == 404


class TestDeciding:
    def test_approve_publishes_one_decision_signed_with_the_admins_key(
        self, services: Services, logged_in: TestClient, wire: RecordingWire, parties: Parties
    ) -> None:
        request_id, _ = pending(services)
        page = logged_in.get(f"/requests/{request_id}").text
        response = logged_in.post(
            f"/requests/{request_id}/approve", data={"reason": "known partner", "csrf_token": csrf_of(page)}
        )
        assert response.status_code == 200
        assert f"Your approval of {request_id} was published" in response.text
        [(route, routing_key, decision)] = wire.sent
        assert route == routes.DECIDE and routing_key == parties.admin_id
        assert decision["request_id"] == request_id
        assert decision["decision"] == "approve" and decision["reason"] == "known partner"
        assert_signed_by(parties, decision)

    def test_reject_takes_a_reason_and_publishes_it(
        self, services: Services, logged_in: TestClient, wire: RecordingWire, parties: Parties
    ) -> None:
        request_id, _ = pending(services)
        token = csrf_of(logged_in.get(f"/requests/{request_id}").text)
        refused = logged_in.post(f"/requests/{request_id}/reject", data={"reason": " ", "csrf_token": token})
        assert "A rejection needs a reason" in refused.text
        assert wire.sent == []
        logged_in.post(f"/requests/{request_id}/reject", data={"reason": "no use case", "csrf_token": token})
        [decision] = wire.decisions()
        assert decision["decision"] == "reject" and decision["reason"] == "no use case"
        assert_signed_by(parties, decision)

    def test_bulk_approve_publishes_one_signed_bulk_decision_of_the_requests_the_filter_selects(
        self, services: Services, logged_in: TestClient, wire: RecordingWire, parties: Parties
    ) -> None:
        # Given three pending requests of one consumer, two of them older than a day
        first, consumer_id = pending(services, age=timedelta(hours=30))
        second, _ = pending(services, consumer_id=consumer_id, age=timedelta(hours=26))
        young, _ = pending(services, consumer_id=consumer_id, age=timedelta(hours=1))
        filters = {"consumer_id": consumer_id, "older_than_hours": "24"}
        page = logged_in.get("/queue", params=filters).text
        assert "Approve all 2 matching" in page

        shown = re.findall(r'name="request_id" value="([^"]+)"', page)
        assert sorted(shown) == sorted([first, second])
        # And one more arrives that matches, after the page was shown
        late, _ = pending(services, consumer_id=consumer_id, age=timedelta(hours=25))

        # When the admin approves what the filter selects
        response = logged_in.post(
            "/bulk-approve",
            data={**filters, "reason": "backlog", "csrf_token": csrf_of(page), "request_id": shown},
        )

        # Then one signed bulk approval of the selected requests shown was published: not the young or late one
        assert "One approval of 2 requests was published" in response.text
        assert wire.decisions() == []
        [bulk] = wire.bulk_decisions()
        assert sorted(bulk["request_ids"].split(",")) == sorted([first, second])
        assert {young, late}.isdisjoint(bulk["request_ids"].split(","))
        assert bulk["decision"] == "approve" and bulk["reason"] == "backlog"
        assert_signed_by(parties, bulk)
        # And the admin lands on its page, which waits for the workers' results
        assert str(response.url).endswith(f"/bulk/{bulk['bulk_id']}")
        assert "Not recorded yet" in response.text and 'http-equiv="refresh"' in response.text

    def test_bulk_approve_of_more_than_one_bulk_holds_names_the_oldest_it_may(
        self, services: Services, logged_in: TestClient, wire: RecordingWire, parties: Parties
    ) -> None:
        # Given one request more pending for a consumer than one bulk decision may name
        # (without review deadlines: so many due ones would keep the deadline sweep's tests waiting)
        first, consumer_id = pending(services, age=timedelta(hours=MAX_BULK_ITEMS + 1), deadline=None)
        oldest = [first] + [
            pending(
                services, consumer_id=consumer_id, age=timedelta(hours=MAX_BULK_ITEMS - n), deadline=None
            )[0]
            for n in range(MAX_BULK_ITEMS)
        ]
        page = logged_in.get("/queue", params={"consumer_id": consumer_id}).text
        assert f"Approve the {MAX_BULK_ITEMS} oldest of {MAX_BULK_ITEMS + 1} matching" in page

        # When the admin approves them
        logged_in.post(
            "/bulk-approve",
            data={
                "consumer_id": consumer_id,
                "reason": "backlog",
                "csrf_token": csrf_of(page),
                "request_id": re.findall(r'name="request_id" value="([^"]+)"', page),
            },
        )

        # Then one signed bulk names the oldest it may, and the youngest waits for the next
        [bulk] = wire.bulk_decisions()
        assert sorted(bulk["request_ids"].split(",")) == sorted(oldest[:MAX_BULK_ITEMS])
        assert_signed_by(parties, bulk)

    def test_a_bulk_decisions_page_shows_the_result_per_request_escaped(
        self, services: Services, logged_in: TestClient
    ) -> None:
        # Given a recorded bulk decision naming a request and an id with markup in it
        request_id, _ = pending(services)
        bulk_id = str(uuid.uuid4())
        with services.uow() as uow:
            uow.bulk_decisions.add(
                BulkDecision(
                    id=bulk_id,
                    approve=True,
                    admin_id="dana",
                    reason="backlog",
                    decided_at=datetime.now(UTC),
                    selection="ids",
                    outcome=DecisionOutcome.APPLIED,
                    results={request_id: "already_decided", "<script>alert(1)</script>": "not_found"},
                )
            )
            uow.commit()

        # When the admin opens its page
        page = logged_in.get(f"/bulk/{bulk_id}")

        # Then each request has its result and its status now, every value escaped
        assert page.status_code == 200
        assert request_id in page.text and "already_decided" in page.text and "pending_review" in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
        assert "refresh" not in page.text
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY

    def test_bulk_approve_without_a_filter_publishes_nothing(
        self, logged_in: TestClient, wire: RecordingWire
    ) -> None:
        token = csrf_of(logged_in.get("/queue").text)
        response = logged_in.post("/bulk-approve", data={"csrf_token": token})
        assert "needs a filter" in response.text
        assert wire.sent == []


class TestTheAdminsFile:
    def test_reads_admins_and_hashes_verify(self, tmp_path: Any) -> None:
        path = tmp_path / "admins.json"
        entry = {
            "admin_id": "dana",
            "password_hash": auth.hash_password("pw"),
            "key_file": "dana.pem",
            "key_id": "k1",
        }
        path.write_text(json.dumps([entry]))
        [admin] = auth.read_admins(path).values()
        assert admin.key_file == tmp_path / "dana.pem"
        assert auth.verify_password("pw", admin.password_hash)
        assert not auth.verify_password("pW", admin.password_hash)
        path.write_text('[{"admin_id": "dana"}]')
        with pytest.raises(auth.ConsoleConfigError):
            auth.read_admins(path)
