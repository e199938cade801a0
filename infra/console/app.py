"""The review console's web app: the pending queue, a request's page, and the decisions admins take there.

Reads come from the read models (:mod:`infra.db.views`) on the read-only database URL.
Decisions leave as the same signed v2 decision messages ``accessflow decide`` publishes
(:func:`infra.cli.producer.signed_decision`), signed with the logged-in admin's own key: the
console writes no row, and the workers verify and apply a decision made here like any other.
A bulk approve publishes one signed bulk decision (``access_request.bulk_decided``, as
``accessflow decide-bulk`` does) naming the pending requests its filter selects, among those
the page showed the admin; its page then shows the result the workers recorded per request.

Every response carries a strict Content-Security-Policy (no script, style or image from
anywhere but the console itself, and none inline), ``nosniff`` and no referrer. Sessions
are signed cookies (HttpOnly, SameSite=Strict, Secure off loopback); every POST carries the
session's CSRF token in a hidden field, and is refused with 403 without it. Templates escape
every value (Jinja2 autoescape).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from domain.model import MAX_BULK_ITEMS
from infra.cli import producer
from infra.console import auth
from infra.credentials import signing
from infra.db import views
from infra.db.unit_of_work import SqlUnitOfWork

log = structlog.get_logger()

HERE = Path(__file__).parent
#: The Content-Security-Policy of every response: nothing from another origin, nothing inline.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
#: The session cookie's name.
SESSION_COOKIE = "accessflow_console"
#: A session lasts this long after its last use, in seconds.
SESSION_MAX_AGE = 8 * 3600
#: What a publish returns: the message as sent.
Sent = TypeVar("Sent")
#: The longest reason a form may carry (the decision contract's own limit is checked when signing).
REASON_MAX = 1000


@dataclass(frozen=True)
class Console:
    """What the app needs, built once by the command (or a test).

    Attributes:
      reads: a unit of work on the read-only database URL, new per call.
      wire: where decisions are published (an :class:`infra.cli.producer.AmqpWire` in production).
      admins: who may log in, by id.
      audience: the deployment's queue prefix, which every signed decision names.
      clock: the current moment (UTC).
      throttle: how failed logins are counted; a new :class:`infra.console.auth.LoginThrottle` if None.
    """

    reads: Callable[[], SqlUnitOfWork]
    wire: producer.Wire
    admins: dict[str, auth.ConsoleAdmin]
    audience: str
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    throttle: auth.LoginThrottle | None = None


class SecurityHeaders:
    """ASGI middleware: the CSP and the other security headers on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def templates() -> Jinja2Templates:
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["age"] = format_age
    environment.filters["moment"] = format_moment
    return Jinja2Templates(env=environment)


def format_age(seconds: float | None) -> str:
    """An age as a person reads it: ``3d 4h``, ``5h 2m``, ``40s``."""
    if seconds is None:
        return ""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def format_moment(iso: str | None) -> str:
    """An ISO 8601 moment as ``2026-11-27 14:05 UTC``."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def create_app(console: Console, *, session_secret: str, secure_cookie: bool) -> Starlette:
    """The console's ASGI app.

    Parameters:
      console: its reads, wire, admins and clock.
      session_secret: the key session cookies are signed with.
      secure_cookie: send the session cookie over HTTPS only (off loopback).
    """
    pages = templates()
    throttle = console.throttle or auth.LoginThrottle()

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        session = request.session
        flash = session.pop("flash", None)
        return pages.TemplateResponse(
            request,
            name,
            {
                "admin_id": session.get("admin_id"),
                "csrf_token": _csrf_token(session),
                "flash": flash,
                "error": None,
                **context,
            },
            status_code=status_code,
        )

    def logged_in(request: Request) -> auth.ConsoleAdmin | None:
        admin_id = request.session.get("admin_id")
        return console.admins.get(admin_id) if isinstance(admin_id, str) else None

    async def checked_form(request: Request) -> FormData:
        form = await request.form()
        if not auth.csrf_matches(request.session.get("csrf"), form.get("csrf_token")):
            log.warning(
                "console.csrf_refused",
                path=request.url.path,
                admin_id=request.session.get("admin_id"),
                client=request.client.host if request.client else None,
            )
            raise HTTPException(403, "refused: the form's CSRF token is missing or wrong; reload the page")
        return form

    async def home(request: Request) -> Response:
        return RedirectResponse("/queue" if logged_in(request) else "/login", status_code=303)

    async def login_page(request: Request) -> Response:
        if logged_in(request):
            return RedirectResponse("/queue", status_code=303)
        return render(request, "login.html")

    async def login(request: Request) -> Response:
        form = await checked_form(request)
        admin_id = str(form.get("admin_id", ""))[:200]
        if throttle.blocked(admin_id):
            log.warning("console.login_throttled", admin_id=admin_id)
            return render(
                request, "login.html", status_code=429, error="Too many failed logins: try again later."
            )
        admin = await run_in_threadpool(
            auth.authenticate, console.admins, admin_id, str(form.get("password", ""))
        )
        if admin is None:
            throttle.failed(admin_id)
            log.warning("console.login_refused", admin_id=admin_id)
            return render(request, "login.html", status_code=401, error="Unknown admin or wrong password.")
        throttle.succeeded(admin_id)
        request.session.clear()  # a new session at login: no fixation
        request.session["admin_id"] = admin.admin_id
        request.session["csrf"] = auth.new_csrf_token()
        log.info("console.login", admin_id=admin.admin_id)
        return RedirectResponse("/queue", status_code=303)

    async def logout(request: Request) -> Response:
        await checked_form(request)
        log.info("console.logout", admin_id=request.session.get("admin_id"))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def queue(request: Request) -> Response:
        if logged_in(request) is None:
            return RedirectResponse("/login", status_code=303)
        chosen = QueueFilter.from_values(request.query_params)
        now = console.clock()
        rows = await run_in_threadpool(chosen.pending, console.reads, now)
        # One bulk decision names at most MAX_BULK_ITEMS requests: the oldest, as decide-bulk's filter takes them.
        return render(
            request, "queue.html", rows=rows, chosen=chosen, now=now, bulk_rows=rows[:MAX_BULK_ITEMS]
        )

    async def request_page(request: Request) -> Response:
        if logged_in(request) is None:
            return RedirectResponse("/login", status_code=303)
        request_id = request.path_params["request_id"]
        details = await run_in_threadpool(views.request_details, console.reads(), request_id)
        if details is None:
            raise HTTPException(404, "no such request")
        return render(request, "request.html", details=details)

    async def decide(request: Request) -> Response:
        admin = logged_in(request)
        form = await checked_form(request)
        if admin is None:
            return RedirectResponse("/login", status_code=303)
        request_id = request.path_params["request_id"]
        approve = request.url.path.endswith("/approve")
        reason = str(form.get("reason", "")).strip()[:REASON_MAX]
        if not approve and not reason:
            request.session["flash"] = "A rejection needs a reason: the consumer reads it."
        else:
            request.session["flash"] = await run_in_threadpool(
                publish, console, admin, request_id, approve, reason or "approved"
            )
        return RedirectResponse(f"/requests/{_quote(request_id)}", status_code=303)

    async def bulk_approve(request: Request) -> Response:
        admin = logged_in(request)
        form = await checked_form(request)
        if admin is None:
            return RedirectResponse("/login", status_code=303)
        chosen = QueueFilter.from_values(form)
        reason = str(form.get("reason", "")).strip()[:REASON_MAX] or "approved in bulk"
        if chosen.is_empty():
            request.session["flash"] = "A bulk approve needs a filter: a plan, a consumer or an age."
            return RedirectResponse("/queue", status_code=303)
        # Only what the admin saw: a request that arrived, or stopped pending, since the page was shown is left out.
        shown = set(form.getlist("request_id"))
        rows = await run_in_threadpool(chosen.pending, console.reads, console.clock())
        ids = [row["id"] for row in rows if row["id"] in shown][:MAX_BULK_ITEMS]
        if not ids:
            request.session["flash"] = "No pending request matches: nothing was published."
            return RedirectResponse(f"/queue?{chosen.query()}", status_code=303)
        flash, bulk_id = await run_in_threadpool(publish_bulk, console, admin, ids, reason)
        request.session["flash"] = flash
        log.info(
            "console.bulk_approve",
            admin_id=admin.admin_id,
            filter=chosen.query(),
            selected=len(ids),
            bulk_id=bulk_id,
        )
        if bulk_id is None:
            return RedirectResponse(f"/queue?{chosen.query()}", status_code=303)
        return RedirectResponse(f"/bulk/{_quote(bulk_id)}", status_code=303)

    async def bulk_page(request: Request) -> Response:
        if logged_in(request) is None:
            return RedirectResponse("/login", status_code=303)
        bulk_id = request.path_params["bulk_id"]
        results = await run_in_threadpool(views.bulk_results, console.reads(), bulk_id)
        return render(request, "bulk.html", bulk_id=bulk_id, results=results)

    routes = [
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/queue", queue),
        Route("/requests/{request_id}", request_page),
        Route("/requests/{request_id}/approve", decide, methods=["POST"]),
        Route("/requests/{request_id}/reject", decide, methods=["POST"]),
        Route("/bulk-approve", bulk_approve, methods=["POST"]),
        Route("/bulk/{bulk_id}", bulk_page),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=session_secret,
                session_cookie=SESSION_COOKIE,
                max_age=SESSION_MAX_AGE,
                same_site="strict",
                https_only=secure_cookie,
            ),
        ],
    )


@dataclass(frozen=True)
class QueueFilter:
    """Which pending requests the queue shows, and a bulk approve decides: by plan, consumer and age."""

    plan_id: str = ""
    consumer_id: str = ""
    older_than_hours: float | None = None

    @classmethod
    def from_values(cls, values: Any) -> QueueFilter:
        try:
            hours = float(values.get("older_than_hours") or "") if values.get("older_than_hours") else None
        except ValueError:
            hours = None
        return cls(
            plan_id=str(values.get("plan_id") or "").strip(),
            consumer_id=str(values.get("consumer_id") or "").strip(),
            older_than_hours=hours if hours is not None and hours >= 0 else None,
        )

    def is_empty(self) -> bool:
        return not self.plan_id and not self.consumer_id and self.older_than_hours is None

    def query(self) -> str:
        parts = {
            "plan_id": self.plan_id,
            "consumer_id": self.consumer_id,
            "older_than_hours": "" if self.older_than_hours is None else f"{self.older_than_hours:g}",
        }
        return "&".join(f"{k}={_quote(v)}" for k, v in parts.items() if v)

    def pending(self, reads: Callable[[], SqlUnitOfWork], now: datetime) -> list[dict[str, Any]]:
        return views.pending_queue(
            reads(),
            now=now,
            plan_id=self.plan_id or None,
            consumer_id=self.consumer_id or None,
            submitted_before=None
            if self.older_than_hours is None
            else now - timedelta(hours=self.older_than_hours),
        )


def publish(console: Console, admin: auth.ConsoleAdmin, request_id: str, approve: bool, reason: str) -> str:
    """Sign and publish ``admin``'s decision on one request; what happened, for the next page to say."""
    verb = "approval" if approve else "rejection"
    try:
        private_key = _signing_key(admin)
        decision = _sent(
            admin,
            lambda: producer.decide(
                console.wire,
                producer.signed_decision(
                    request_id=request_id,
                    approve=approve,
                    admin_id=admin.admin_id,
                    reason=reason,
                    audience=console.audience,
                    key_id=admin.key_id,
                    private_key=private_key,
                ),
            ),
        )
    except NotPublished as error:
        return str(error)
    log.info(
        "console.decision_published",
        admin_id=admin.admin_id,
        request_id=request_id,
        decision_id=decision.decision_id,
        decision=decision.decision,
    )
    return f"Your {verb} of {request_id} was published; the workers apply it in a moment."


def publish_bulk(
    console: Console, admin: auth.ConsoleAdmin, request_ids: list[str], reason: str
) -> tuple[str, str | None]:
    """Sign and publish ``admin``'s approval of ``request_ids`` as one bulk decision.

    Returns what happened, for the next page to say, and the bulk's id once published.
    """
    try:
        private_key = _signing_key(admin)
        bulk = _sent(
            admin,
            lambda: producer.decide_bulk(
                console.wire,
                producer.signed_bulk_decision(
                    approve=True,
                    admin_id=admin.admin_id,
                    reason=reason,
                    audience=console.audience,
                    key_id=admin.key_id,
                    private_key=private_key,
                    request_ids=request_ids,
                ),
            ),
        )
    except NotPublished as error:
        return str(error), None
    log.info(
        "console.bulk_decision_published",
        admin_id=admin.admin_id,
        bulk_id=bulk.bulk_id,
        selected=len(request_ids),
    )
    return (
        f"One approval of {len(request_ids)} requests was published; the workers decide each in a moment.",
        bulk.bulk_id,
    )


class NotPublished(Exception):
    """Nothing was published; the message says why, for the admin, and holds no secret."""


def _signing_key(admin: auth.ConsoleAdmin) -> Ed25519PrivateKey:
    try:
        return signing.load_private_key(admin.key_file)
    except (ValueError, signing.SigningKeyError) as error:
        log.error("console.signing_key_unreadable", admin_id=admin.admin_id, error=str(error))
        raise NotPublished(f"Nothing was published: your signing key cannot be read ({error}).") from None


def _sent(admin: auth.ConsoleAdmin, publish: Callable[[], Sent]) -> Sent:
    try:
        return publish()
    except producer.InvalidMessage as error:
        raise NotPublished(f"Nothing was published: refused: {error}") from None
    except Exception as error:  # the broker is unreachable or refused the message
        log.error("console.publish_failed", admin_id=admin.admin_id, error=str(error))
        raise NotPublished(f"Nothing was published: could not publish: {type(error).__name__}") from None


def _csrf_token(session: dict[str, Any]) -> str:
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = auth.new_csrf_token()
        session["csrf"] = token
    return token


def _quote(value: str) -> str:
    return quote(value, safe="")
