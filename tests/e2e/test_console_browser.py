"""The review console in a real headless browser: the system's Chromium, driven by Playwright.

The console is served by uvicorn (in a thread) and publishes, as the admin tool's AMQP user,
to the session's real worker pools. The admin logs in, approves one request, rejects one
with a reason and bulk-approves two by a filter; the test then reads the database (statuses,
and decisions applied in that admin's name) and the SMTP sink. Screenshots at a laptop's and
a phone's width are saved under ``tests/e2e/screenshots/`` (printed).
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import uvicorn

from domain.model import Status
from infra.bootstrap import Services, build
from infra.cli.producer import AmqpWire
from infra.console import auth
from infra.console.app import CONTENT_SECURITY_POLICY, Console, create_app
from infra.db import orm
from infra.messaging.topology import Topology
from infra.settings import Settings
from tests import services as svc
from tests.conftest import Boundary, Parties
from tests.e2e.conftest import ACCESSFLOW, PortalClient, request_payload, wait_for_status

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "screenshots"
PASSWORD = "a long console password"
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}


def admins_file(path: Path, parties: Parties) -> Path:
    """A console admins file listing the test admin, with their registered signing key."""
    entry = {
        "admin_id": parties.admin_id,
        "password_hash": auth.hash_password(PASSWORD),
        "key_file": str(parties.admin_key_file),
        "key_id": parties.admin_key_id,
    }
    path.write_text(json.dumps([entry]))
    return path


@pytest.fixture
def console_url(settings: Settings, boundary: Boundary, parties: Parties, tmp_path: Path) -> Iterator[str]:
    """The console, served by uvicorn in a thread, reading the run's database and publishing as the admin tool."""
    reads = build(settings)
    app = create_app(
        Console(
            reads=reads.uow,
            wire=AmqpWire(boundary.url(boundary.accounts.admin_tool), Topology(settings.queue_prefix)),
            admins=auth.read_admins(admins_file(tmp_path / "console-admins.json", parties)),
            audience=settings.queue_prefix,
        ),
        session_secret="console-test-session-secret-0123456789",
        secure_cookie=False,
    )
    port = svc.free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    try:
        svc.wait_until(lambda: server.started, timeout=20, what="the console to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        reads.close()


def decisions_of(services: Services, request_id: str) -> list[sa.Row[tuple[object, ...]]]:
    with services.engine.connect() as connection:
        return list(
            connection.execute(sa.select(orm.decisions).where(orm.decisions.c.request_id == request_id))
        )


class TestTheConsoleInABrowser:
    def test_an_admin_approves_rejects_and_bulk_approves_and_the_workers_apply_it(
        self,
        worker_pools: Path,
        portal: PortalClient,
        other_portal: PortalClient,
        console_url: str,
        services: Services,
        smtp: svc.SmtpSink,
        parties: Parties,
    ) -> None:
        if not CHROMIUM.exists():
            svc.unavailable(f"no {CHROMIUM}: apt-get install chromium (scripts/ensure-services.sh does)")
        sync_api = pytest.importorskip("playwright.sync_api")

        # Given four requests parked for review: two of Acme's, two of Globex's
        approve_me = portal.submit(request_payload(plan_id="partner", justification="launch <next week>"))
        reject_me = portal.submit(request_payload(plan_id="partner", justification="just looking"))
        globex = {"id": "globex", "email": "api@globex.example", "name": "Globex API Team"}
        bulk = [
            other_portal.submit(
                request_payload(plan_id="partner", consumer=globex, app_id="globex-backoffice")
            )
            for _ in range(2)
        ]
        for request_id in [approve_me, reject_me, *bulk]:
            wait_for_status(services, request_id, Status.PENDING_REVIEW)

        SCREENSHOTS.mkdir(exist_ok=True)
        refused: list[str] = []
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_context(viewport=LAPTOP).new_page()
                # A CSP violation (an inline script or style slipping in) is reported on the console.
                page.on("console", lambda m: refused.append(m.text) if "Content Security" in m.text else None)

                # When the admin logs in
                response = page.goto(f"{console_url}/login")
                assert response is not None
                assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
                page.fill("input[name=admin_id]", parties.admin_id)
                page.fill("input[name=password]", PASSWORD)
                page.click("button:has-text('Log in')")
                page.wait_for_url(f"{console_url}/queue")
                for request_id in [approve_me, reject_me, *bulk]:
                    assert page.locator(f"a[href='/requests/{request_id}']").count() == 1
                assert "launch <next week>" in page.inner_text("table.queue")
                page.screenshot(path=str(SCREENSHOTS / "queue-laptop.png"), full_page=True)
                page.set_viewport_size(PHONE)
                page.screenshot(path=str(SCREENSHOTS / "queue-phone.png"), full_page=True)
                page.set_viewport_size(LAPTOP)

                # And approves one request from its page
                page.click(f"a[href='/requests/{approve_me}']")
                page.screenshot(path=str(SCREENSHOTS / "pending-request-laptop.png"), full_page=True)
                page.set_viewport_size(PHONE)
                page.screenshot(path=str(SCREENSHOTS / "pending-request-phone.png"), full_page=True)
                page.set_viewport_size(LAPTOP)
                page.fill("form[action$='/approve'] input[name=reason]", "launch approved")
                page.click("button.approve")
                assert "Your approval of" in page.inner_text(".flash")

                # And rejects one with a reason
                page.goto(f"{console_url}/requests/{reject_me}")
                page.fill("form[action$='/reject'] input[name=reason]", "Partner plan is <contracted> only")
                page.click("button.reject")
                assert "Your rejection of" in page.inner_text(".flash")

                # And bulk-approves Globex's two by a filter
                page.goto(f"{console_url}/queue")
                page.fill("input[name=consumer_id]", "globex")
                page.fill("input[name=plan_id]", "partner")
                page.click("button:has-text('Filter')")
                page.fill("form.bulk input[name=reason]", "globex backlog")
                page.click("form.bulk button.approve")
                assert "One approval of 2 requests was published" in page.inner_text(".flash")
                # And sees the bulk's page fill in, one result per request, as the workers record it
                page.wait_for_selector("table.bulk-results", timeout=30_000)
                results = page.inner_text("table.bulk-results")
                for request_id in bulk:
                    assert request_id in results
                assert results.count("applied") == 2, results
                page.screenshot(path=str(SCREENSHOTS / "bulk-laptop.png"), full_page=True)
                page.set_viewport_size(PHONE)
                page.screenshot(path=str(SCREENSHOTS / "bulk-phone.png"), full_page=True)
                page.set_viewport_size(LAPTOP)

                # Then the workers apply each decision, in the admin's name
                wait_for_status(services, approve_me, Status.PROVISIONED)
                wait_for_status(services, reject_me, Status.REJECTED)
                for request_id in bulk:
                    wait_for_status(services, request_id, Status.PROVISIONED)

                page.goto(f"{console_url}/requests/{approve_me}")
                page.wait_for_selector("text=provisioned")
                page.screenshot(path=str(SCREENSHOTS / "request-laptop.png"), full_page=True)
                page.goto(f"{console_url}/requests/{reject_me}")
                page.set_viewport_size(PHONE)
                page.screenshot(path=str(SCREENSHOTS / "request-phone.png"), full_page=True)
            finally:
                browser.close()
        print(f"\nconsole screenshots: {SCREENSHOTS}")

        for request_id, approve, reason in [
            (approve_me, True, "launch approved"),
            (reject_me, False, "Partner plan is <contracted> only"),
            *[(request_id, True, "globex backlog") for request_id in bulk],
        ]:
            [decision] = decisions_of(services, request_id)
            assert (decision.approve, decision.reason) == (approve, reason)
            assert decision.admin_id == parties.admin_id and decision.key_id == parties.admin_key_id
            assert decision.outcome == "applied"

        # And the consumers got their emails: the rejection with its reason
        def emails_with(request_id: str, word: str) -> list[object]:
            return [m for m in smtp.about(request_id) if word in m["Subject"]]

        svc.wait_until(lambda: emails_with(reject_me, "declined"), what="the rejection email")
        [declined] = emails_with(reject_me, "declined")
        assert declined["To"] == "dev@acme.example"  # type: ignore[index]
        assert "Partner plan is <contracted> only" in declined.get_body(("plain",)).get_content()  # type: ignore[attr-defined]
        for request_id in [approve_me, *bulk]:
            svc.wait_until(
                lambda r=request_id: emails_with(r, "approved"), what=f"the approval email of {request_id}"
            )
        assert refused == [], f"the browser refused content under the CSP: {refused}"


class TestTheConsoleCommand:
    def test_serves_the_login_page_with_its_headers_and_refuses_a_forged_post(
        self, admin_env: dict[str, str], parties: Parties, tmp_path: Path
    ) -> None:
        # Given `accessflow console` started as an operator would, as the admin tool's AMQP user
        port = svc.free_port()
        env = {
            **admin_env,
            "ACCESSFLOW_CONSOLE_PORT": str(port),
            "ACCESSFLOW_CONSOLE_SESSION_SECRET": "console-command-test-secret-0123456789",
            "ACCESSFLOW_CONSOLE_ADMINS_FILE": str(admins_file(tmp_path / "admins.json", parties)),
        }
        log = (tmp_path / "console.log").open("w")
        process = subprocess.Popen([ACCESSFLOW, "console"], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:

            def login_page() -> tuple[int, dict[str, str]] | None:
                try:
                    with urllib.request.urlopen(f"{url}/login", timeout=2) as response:  # noqa: S310 - our own loopback URL
                        response.read()
                        return response.status, {k.lower(): v for k, v in response.headers.items()}
                except OSError:
                    return None

            # When it is asked for the login page
            status, headers = svc.wait_until(login_page, timeout=30, what="accessflow console to serve")

            # Then the page comes with the strict CSP and a strict, HttpOnly session cookie
            assert status == 200
            assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert headers["x-content-type-options"] == "nosniff"
            cookie = headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie
            # And a POST without the session's CSRF token is refused
            forged = urllib.request.Request(f"{url}/login", data=b"admin_id=dana&password=x", method="POST")  # noqa: S310
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(forged, timeout=5)  # noqa: S310
            assert refused.value.code == 403
            refused.value.close()
        finally:
            process.terminate()
            process.wait(timeout=15)
            log.close()
