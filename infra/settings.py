"""Every setting, read from ``ACCESSFLOW_*`` environment variables (README: Settings)."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import timedelta
from typing import Annotated, Literal, Self
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: How much longer than the SMTP send deadline an email's lease must last, at least.
EMAIL_LEASE_MARGIN_SECONDS = 5.0
#: Where ACCESSFLOW_BROKER_URL holds another address: a comma that starts a new amqp:// or amqps:// URL,
#: so that a comma inside a password or a query stays part of its URL.
BROKER_URL_SEPARATOR = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)


def split_broker_urls(value: str) -> list[str]:
    """The AMQP URLs in an ``ACCESSFLOW_BROKER_URL`` value: one, or several separated by commas.

    Several name the nodes of one RabbitMQ cluster; clients connect to the first that
    answers, in this order, and to the next surviving one when that connection is lost.

    Returns:
      The URLs, stripped, in their order; one URL comes back unchanged as a list of one.
    """
    return [url for url in BROKER_URL_SEPARATOR.split(value.strip()) if url]


#: Standard Webhooks: a secret is ``whsec_`` and the base64 of 24 to 64 random bytes.
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
WEBHOOK_KEY_BYTES = (24, 64)


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64); ValueError if it is not one.

    The message never repeats the secret: a settings error is printed, and may be logged.
    """
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("a gateway webhook secret must start with whsec_ (Standard Webhooks)")
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a gateway webhook secret must be whsec_ followed by base64") from None
    low, high = WEBHOOK_KEY_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"a gateway webhook secret must hold {low} to {high} bytes, not {len(key)}")
    return key


def _vhost(path: str) -> str:
    return unquote(path[1:]) if len(path) > 1 else "/"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACCESSFLOW_", extra="ignore")

    database_url: str = Field(
        "postgresql+psycopg://accessflow_runtime@127.0.0.1:5432/accessflow",
        description="SQLAlchemy URL of the database, as the runtime role (accessflow_runtime): workers, relay, CLI.",
    )
    migration_database_url: str | None = Field(
        None,
        description="SQLAlchemy URL `accessflow db upgrade` connects with: as accessflow_migrator, or as a "
        "superuser (or CREATEROLE role), which also creates the roles. Unset: ACCESSFLOW_DATABASE_URL.",
    )
    readonly_database_url: str | None = Field(
        None,
        description="SQLAlchemy URL `accessflow status`, `requests list` and `requests show` read with "
        "(accessflow_readonly). Unset: ACCESSFLOW_DATABASE_URL.",
    )
    db_connect_timeout_seconds: int = Field(
        5, ge=1, description="Give up connecting to the database after this."
    )
    db_statement_timeout_ms: int = Field(
        15_000, ge=100, description="PostgreSQL statement_timeout per session."
    )
    db_pool_size: int = Field(
        12,
        ge=1,
        description="Database connections a process keeps open: at least a worker's threads plus 3 "
        "(the outbox's sweep, marks and pruning), or connections are opened and closed per message.",
    )
    broker_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        description="AMQP URL of RabbitMQ, or stub:// for the in-memory broker. Comma-separate the URLs "
        "of several nodes of one cluster (same user and vhost): clients connect to the first that answers, "
        "and reconnect to a surviving one.",
    )
    queue_prefix: str = Field(
        "accessflow",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every queue name: <prefix>.requests ...",
    )
    seal_key: SecretStr | None = Field(
        None,
        description="Fernet key that seals credential secrets until their one reveal "
        "(accessflow keys generate). Comma-separate several to rotate: the first seals, all unseal.",
    )
    admin_emails: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses that get the review emails. Who may decide is the admins "
        "registry and their signing keys (`accessflow admins`).",
    )
    escalation_emails: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses told once when a pending request's review deadline is "
        "near (ACCESSFLOW_REVIEW_ESCALATION_HOURS); empty: no escalation.",
    )
    review_deadline_hours: float | None = Field(
        None,
        gt=0,
        description="Hours a request parked for review waits for a decision before it expires, for "
        "plans that set no `review_deadline_hours` of their own; unset: no deadline.",
    )
    review_reminder_hours: str = Field(
        "24,4",
        pattern=r"^\s*(\d+(\.\d+)?\s*(,\s*\d+(\.\d+)?\s*)*)?$",
        description="Hours before a pending request's review deadline at which the admins "
        "(ACCESSFLOW_ADMIN_EMAILS) are reminded, each once: comma-separated, e.g. `24,4`; empty for none.",
    )
    review_escalation_hours: float = Field(
        2.0,
        ge=0,
        description="Hours before a pending request's review deadline at which the escalation list "
        "(ACCESSFLOW_ESCALATION_EMAILS) is told, once.",
    )
    review_sweep_seconds: float = Field(
        60.0,
        gt=0,
        description="How often each pool that applies decisions reminds, escalates and expires the "
        "requests pending review by their deadline; safe with many replicas.",
    )
    accept_v1_submissions: bool = Field(
        False,
        description="Accept contract v1 submissions, which name no portal: no sender check, no "
        "events. Only while portals move to v2.",
    )
    decision_max_skew_seconds: int = Field(
        300,
        ge=1,
        description="Refuse a signed decision whose decided_at is further than this from the worker's clock.",
    )
    broker_internal_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated AMQP users whose messages count as accessflow's own (workers, ops "
        "replaying dead letters); only they may write to the internal queues. Default: the user of "
        "ACCESSFLOW_BROKER_URL.",
    )
    mail_transport: Literal["smtp", "file"] = Field("smtp", description="smtp, or file to write .eml files.")
    mail_dir: str = Field("var/mail", description="Where the file transport writes .eml files.")
    mail_from: str = Field(
        "accessflow <no-reply@accessflow.local>", description="From header of every email."
    )
    smtp_host: str = Field("127.0.0.1", description="SMTP server host.")
    smtp_port: int = Field(25, ge=1, le=65535, description="SMTP server port.")
    smtp_tls: Literal["none", "starttls", "ssl"] = Field("none", description="none, starttls or ssl.")
    smtp_username: str | None = Field(None, description="SMTP user, if the server wants a login.")
    smtp_password: SecretStr | None = Field(None, description="SMTP password.")
    smtp_timeout_seconds: float = Field(
        10.0, gt=0, description="Socket timeout for one SMTP operation; the send deadline bounds them all."
    )
    smtp_send_deadline_seconds: float = Field(
        30.0,
        gt=0,
        description="The longest one email's send may take, all its SMTP steps together (connect, TLS, "
        "login, NOOP, MAIL, RCPT, DATA); then it stops and is retried.",
    )
    email_lease_seconds: float = Field(
        60.0,
        gt=0,
        description="While a worker sends an email, a redelivery of it waits this long before sending it "
        "too; at least the send deadline plus 5 s, so no send outlives its lease.",
    )
    notification_sweep_seconds: float = Field(
        60.0,
        gt=0,
        description="How often workers that consume the notifications queue look for stuck emails.",
    )
    notification_stale_seconds: float = Field(
        900.0,
        gt=0,
        description="An email still `sending` this long after its lease ran out (its message dead-lettered "
        "or lost) is sent again through the outbox.",
    )
    notification_max_attempts: int = Field(
        20,
        ge=1,
        description="Attempts (sends and re-drives) after which a stuck email is marked failed "
        "instead of re-driven.",
    )
    provisioning_sweep_seconds: float = Field(
        60.0,
        gt=0,
        description="How often workers that consume the credentials queue look for requests stuck in "
        "`approved`.",
    )
    provisioning_stale_seconds: float = Field(
        900.0,
        gt=0,
        description="A request still `approved` this long after its approval or its last re-drive (its "
        "IssueCredentials dead-lettered or lost) has its credentials issued again through the outbox.",
    )
    provisioning_max_attempts: int = Field(
        5,
        ge=1,
        description="Re-drives after which a request stuck in `approved` ends `provisioning_failed`, with "
        "the reason, instead of re-driven.",
    )
    subject_approve: str = Field(
        "Your access request for {{ app_name }} is approved",
        description="Jinja2 subject of the approve email.",
    )
    subject_reject: str = Field(
        "Your access request for {{ app_name }} was declined",
        description="Jinja2 subject of the reject email.",
    )
    subject_review: str = Field(
        "Access request {{ request_id }} awaits review",
        description="Jinja2 subject of the review email to admins.",
    )
    subject_expiry_notice: str = Field(
        "The credential of {{ app_name }} expires on {{ expires_at }}",
        description="Jinja2 subject of the notice to a consumer before a credential expires.",
    )
    subject_expired: str = Field(
        "The credential of {{ app_name }} has expired",
        description="Jinja2 subject of the email to a consumer when a credential has expired.",
    )
    subject_review_reminder: str = Field(
        "Reminder: access request {{ request_id }} expires unreviewed at {{ deadline }}",
        description="Jinja2 subject of the reminder to admins before a review deadline.",
    )
    subject_review_escalation: str = Field(
        "Escalation: access request {{ request_id }} expires unreviewed at {{ deadline }}",
        description="Jinja2 subject of the escalation before a review deadline.",
    )
    subject_review_expired: str = Field(
        "Your access request for {{ app_name }} expired unreviewed",
        description="Jinja2 subject of the email to a consumer whose request expired unreviewed.",
    )
    expiry_notice_days: str = Field(
        "14,3",
        pattern=r"^\s*(\d+(\.\d+)?\s*(,\s*\d+(\.\d+)?\s*)*)?$",
        description="Days before a credential expires at which its consumer is told, by email and by "
        "the portal's event: comma-separated, e.g. `14,3`; empty for no notices.",
    )
    expiry_sweep_seconds: float = Field(
        60.0,
        gt=0,
        description="How often each pool that issues credentials expires the credentials whose "
        "lifetime ended and queues the notices due; safe with many replicas.",
    )
    message_id_domain: str = Field(
        "accessflow.local", description="Right-hand side of each email's Message-ID."
    )
    max_retries: int = Field(8, ge=0, description="Retries of a failing message before it is dead-lettered.")
    min_backoff_ms: int = Field(1_000, ge=0, description="First retry delay; doubles each retry.")
    max_backoff_ms: int = Field(60_000, ge=0, description="Longest retry delay.")
    max_deliveries: int = Field(
        5,
        ge=1,
        description="A message that starts this many runs without finishing one (it kills its worker) is dead-lettered.",
    )
    dead_letter_ttl_days: int = Field(
        0, ge=0, description="Drop dead letters after this many days; 0 keeps them until replayed or purged."
    )
    shutdown_timeout_seconds: int = Field(
        60,
        ge=1,
        description="On SIGTERM, how long workers may finish in-flight messages before they are requeued.",
    )
    restart_pause_max_seconds: float = Field(
        30.0, gt=0, description="Longest pause before a worker pool that keeps dying is started again."
    )
    actor_time_limit_ms: int = Field(
        120_000,
        ge=1_000,
        description="Kill an actor run after this; far below RabbitMQ's 30 min consumer_timeout.",
    )
    outbox_sweep_seconds: float = Field(
        5.0, gt=0, description="How often workers and the relay republish unsent outbox rows."
    )
    outbox_max_attempts: int = Field(
        10,
        ge=1,
        description="Tries of an outbox row the broker refuses (unroutable, say) before the sweep parks it "
        "for an operator (accessflow outbox list --parked); tries while the broker is unreachable do not count.",
    )
    outbox_retain_hours: float = Field(
        24.0, gt=0, description="Delete outbox rows this long after they were sent."
    )
    outbox_prune_seconds: float = Field(
        300.0, gt=0, description="How often the relay and the workers delete sent outbox rows past their age."
    )
    outbox_mark_seconds: float = Field(
        0.1,
        gt=0,
        le=1.0,
        description="How often workers mark the rows they published sent, all in one statement.",
    )
    gil_switch_interval_ms: float = Field(
        5.0,
        gt=0,
        le=100,
        description="Python's thread switch interval in worker processes (sys.setswitchinterval): "
        "lower trades throughput for latency under load.",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of a worker pool's (or `accessflow metrics`') HTTP endpoint: /metrics, "
        "/healthz/live and /healthz/ready; 0 turns it off.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics and health endpoint listens on (0.0.0.0 in a container).",
    )
    metrics_dir: str = Field(
        "",
        description="Directory where a pool's processes keep their Prometheus multiprocess files and "
        "heartbeats; emptied when the pool starts. Empty: a fresh temporary directory per pool.",
    )
    metrics_refresh_seconds: float = Field(
        15.0,
        gt=0,
        description="`accessflow metrics` reads the database and queue series at most this often, "
        "whatever the scrape rate.",
    )
    health_stuck_seconds: float = Field(
        300.0,
        gt=0,
        description="Liveness fails when a worker thread has been on one message longer than this "
        "(keep it above the actor time limit).",
    )
    status_pending_review_max_seconds: float = Field(
        86_400.0,
        gt=0,
        description="accessflow status exits 2 when a request has waited for review longer than this.",
    )
    status_approved_max_seconds: float = Field(
        900.0,
        gt=0,
        description="accessflow status exits 2 when a request has been approved longer than this "
        "without its credential.",
    )
    status_outbox_max_age_seconds: float = Field(
        300.0,
        gt=0,
        description="accessflow status exits 2 when an unsent outbox row is older than this "
        "(no relay or worker is sweeping, or the broker is away).",
    )
    gateway_webhook_url: str | None = Field(
        None,
        description="http(s) URL the workers post every credential change to, as a signed Standard "
        "Webhooks request (gateway queue); unset, nothing is pushed. Redirects are not followed.",
    )
    gateway_webhook_secret: SecretStr | None = Field(
        None,
        description="The webhook's signing secret, whsec_ and base64 of 24 to 64 random bytes. "
        "Comma-separate several to rotate: each request carries a signature by each.",
    )
    gateway_webhook_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=60,
        description="The longest one push may take, connect to answer; then it is retried with backoff.",
    )
    console_host: str = Field(
        "127.0.0.1",
        description="Address `accessflow console` (the admins' review console) listens on. Off loopback, "
        "its session cookie is sent over HTTPS only: put it behind a TLS proxy.",
    )
    console_port: int = Field(8080, ge=1, le=65535, description="Port `accessflow console` listens on.")
    console_session_secret: SecretStr | None = Field(
        None,
        description="Key the console signs its session cookies with, at least 32 characters "
        "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`); required to run it.",
    )
    console_admins_file: str | None = Field(
        None,
        description='JSON file listing who may log in to the console: `[{"admin_id", "password_hash" '
        '(accessflow console hash-password), "key_file", "key_id"}]`; each admin\'s decisions are '
        "signed with their own registered Ed25519 key. Required to run it.",
    )
    log_level: str = Field("INFO", description="Log level.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise."
    )

    @model_validator(mode="after")
    def _lease_outlives_the_send(self) -> Self:
        # The margin covers what the lease guards besides SMTP: rendering, and recording the outcome.
        if self.email_lease_seconds < self.smtp_send_deadline_seconds + EMAIL_LEASE_MARGIN_SECONDS:
            raise ValueError(
                f"ACCESSFLOW_EMAIL_LEASE_SECONDS ({self.email_lease_seconds:g}) must be at least "
                f"ACCESSFLOW_SMTP_SEND_DEADLINE_SECONDS ({self.smtp_send_deadline_seconds:g}) plus "
                f"{EMAIL_LEASE_MARGIN_SECONDS:g}: a send that outlives its lease lets a redelivery send a "
                "second copy"
            )
        return self

    @model_validator(mode="after")
    def _gateway_url_and_secret_together(self) -> Self:
        if self.gateway_webhook_url is not None:
            parts = urlsplit(self.gateway_webhook_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    "ACCESSFLOW_GATEWAY_WEBHOOK_URL must be an http:// or https:// URL with a host"
                )
            if parts.username is not None or parts.password is not None:
                # It would travel, and be logged, as part of the URL; the signature authenticates us.
                raise ValueError("ACCESSFLOW_GATEWAY_WEBHOOK_URL must not carry a user or password")
            if not self.gateway_webhook_secrets():
                raise ValueError(
                    "ACCESSFLOW_GATEWAY_WEBHOOK_URL needs ACCESSFLOW_GATEWAY_WEBHOOK_SECRET: every push is signed"
                )
        elif self.gateway_webhook_secret is not None:
            raise ValueError(
                "ACCESSFLOW_GATEWAY_WEBHOOK_SECRET is set without ACCESSFLOW_GATEWAY_WEBHOOK_URL"
            )
        for secret in self.gateway_webhook_secrets():
            webhook_key(secret)  # refused here, at start, rather than at the first push
        return self

    @field_validator("broker_url")
    @classmethod
    def _one_user_and_vhost_across_nodes(cls, value: str) -> str:
        urls = split_broker_urls(value)
        if not urls:
            raise ValueError("ACCESSFLOW_BROKER_URL is empty")
        if len(urls) > 1:
            if any(not url.lower().startswith(("amqp://", "amqps://")) for url in urls):
                raise ValueError("only amqp:// and amqps:// URLs may be listed together")
            # user_id is validated per connection: a node reached as another user would refuse our publishes.
            parts = {(urlsplit(url).username, _vhost(urlsplit(url).path)) for url in urls}
            if len(parts) > 1:
                raise ValueError("the URLs of ACCESSFLOW_BROKER_URL must share one user and one vhost")
        return value

    @field_validator("gateway_webhook_url", "gateway_webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose and Kubernetes pass an optional variable as empty: that means no gateway.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("admin_emails", "escalation_emails", "broker_internal_users", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def migration_url(self) -> str:
        """The URL ``db upgrade`` connects with: ``migration_database_url``, else ``database_url``."""
        return self.migration_database_url or self.database_url

    def readonly_url(self) -> str:
        """The URL read-only commands connect with: ``readonly_database_url``, else ``database_url``."""
        return self.readonly_database_url or self.database_url

    def gateway_webhook_secrets(self) -> list[str]:
        """The gateway webhook's signing secrets, in order: one, or several during a rotation."""
        if self.gateway_webhook_secret is None:
            return []
        return [
            part.strip() for part in self.gateway_webhook_secret.get_secret_value().split(",") if part.strip()
        ]

    def broker_urls(self) -> list[str]:
        """The AMQP URL of each broker node in ``broker_url``, in order (:func:`split_broker_urls`)."""
        return split_broker_urls(self.broker_url)

    def internal_users(self) -> frozenset[str]:
        """The AMQP users trusted as accessflow's own: the configured ones, or the broker URL's."""
        if self.broker_internal_users:
            return frozenset(self.broker_internal_users)
        return frozenset({unquote(urlsplit(self.broker_urls()[0]).username or "guest")})

    def expiry_notice_points(self) -> list[timedelta]:
        """The points before a credential's expiry at which its consumer is told (``expiry_notice_days``)."""
        return [timedelta(days=float(part)) for part in self.expiry_notice_days.split(",") if part.strip()]

    def review_reminder_points(self) -> list[timedelta]:
        """The points before a review deadline at which the admins are reminded (``review_reminder_hours``)."""
        return [
            timedelta(hours=float(part)) for part in self.review_reminder_hours.split(",") if part.strip()
        ]

    def review_escalation_point(self) -> timedelta | None:
        """The point before a review deadline at which the escalation list is told; ``None``: no list, none."""
        return timedelta(hours=self.review_escalation_hours) if self.escalation_emails else None
