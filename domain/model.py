"""Catalogue entities and the :class:`AccessRequest` aggregate with its state machine.

The state machine::

    SUBMITTED --validate--> INVALID (final, with a reason)
        |
        +--auto-approve plan--> APPROVED --credentials issued--> PROVISIONED (final)
        |                          ^
        +--manual plan--> PENDING_REVIEW --admin rejects--> REJECTED (final, with the admin's reason)
                                   |
                                   +--admin approves--> APPROVED

Every transition appends an :class:`AuditEntry` and records a domain event in
``events``; the aggregate never publishes anything itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from domain import events
from domain.errors import IllegalTransition, RuleViolation


def utcnow() -> datetime:
    return datetime.now(UTC)


class AuthMethod(enum.StrEnum):
    API_KEY = "api_key"
    OAUTH2_CLIENT_CREDENTIALS = "oauth2_client_credentials"


class Status(enum.StrEnum):
    SUBMITTED = "submitted"
    PENDING_REVIEW = "pending_review"
    APPROVED = "approved"
    PROVISIONED = "provisioned"
    REJECTED = "rejected"
    INVALID = "invalid"
    #: Approved, but no credential could be issued (the plan is gone, the issuer refused for
    #: good); waits for an operator, who fixes the cause and retries (``requests retry``).
    PROVISIONING_FAILED = "provisioning_failed"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({Status.PROVISIONED, Status.REJECTED, Status.INVALID})

#: Which states each state may move to. Anything else raises IllegalTransition.
ALLOWED_TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SUBMITTED: frozenset({Status.INVALID, Status.PENDING_REVIEW, Status.APPROVED}),
    Status.PENDING_REVIEW: frozenset({Status.APPROVED, Status.REJECTED}),
    Status.APPROVED: frozenset({Status.PROVISIONED, Status.PROVISIONING_FAILED}),
    Status.PROVISIONING_FAILED: frozenset({Status.APPROVED}),
    Status.PROVISIONED: frozenset(),
    Status.REJECTED: frozenset(),
    Status.INVALID: frozenset(),
}


class ActorKind(enum.StrEnum):
    """Who caused a state change, for the audit trail."""

    SYSTEM = "system"
    ADMIN = "admin"
    #: Someone running accessflow's CLI on the deployment (a retry), named by their login.
    OPERATOR = "operator"


@dataclass
class Product:
    id: str
    name: str
    auth_method: AuthMethod


@dataclass
class Plan:
    id: str
    name: str
    auto_approve: bool
    #: Requests per minute the gateway allows each credential of this plan.
    rate_limit_per_minute: int
    #: Requests per calendar month; ``None`` means unlimited.
    monthly_quota: int | None
    product_ids: list[str] = field(default_factory=list)


@dataclass
class Consumer:
    id: str
    email: str
    name: str


@dataclass
class App:
    id: str
    consumer_id: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class Portal:
    """A developer portal: it submits requests for its own consumers and hears back about them.

    ``broker_user`` is the AMQP user it publishes as; RabbitMQ stamps that user on every
    message (validated ``user_id``), so a submission proves which portal sent it.
    ``public_key`` is the X25519 key that credential secrets are sealed to, so only the
    portal can open them.
    """

    id: str
    name: str
    broker_user: str
    public_key: str
    consumer_ids: frozenset[str]
    #: Where consumers sign in to see their credentials; named in the approve email.
    url: str = ""

    def refuses_submission(self, *, consumer_id: str, sender: str | None) -> str | None:
        """Why this portal may not submit this request, or ``None`` if it may."""
        if sender != self.broker_user:
            return (
                f"portal {self.id!r} publishes as AMQP user {self.broker_user!r}, "
                f"but this came from {sender!r}"
            )
        if consumer_id not in self.consumer_ids:
            return f"portal {self.id!r} may not submit for consumer {consumer_id!r}"
        return None


@dataclass(frozen=True)
class AdminKey:
    """An Ed25519 public key an admin signs decisions with; an admin may hold several."""

    key_id: str
    admin_id: str
    public_key: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass
class NewApp:
    """An app the consumer asked us to create along with the request."""

    name: str
    description: str = ""


@dataclass
class Catalogue:
    """The slice of the catalogue that one request refers to, loaded by the handler."""

    plan: Plan | None
    products: dict[str, Product]
    consumer: Consumer | None
    app: App | None


@dataclass
class AuditEntry:
    request_id: str
    from_status: Status | None
    to_status: Status
    actor_kind: ActorKind
    actor_id: str
    reason: str
    at: datetime
    id: int | None = None


def check_rules(
    *,
    plan_id: str,
    product_ids: Sequence[str],
    consumer_id: str,
    app_id: str | None,
    catalogue: Catalogue,
) -> AuthMethod:
    """Check a request against the catalogue.

    Returns:
      The one authentication method all requested products share.

    Raises:
      RuleViolation: with a reason a human can act on.
    """
    if catalogue.consumer is None:
        raise RuleViolation(f"unknown consumer {consumer_id!r}")
    if catalogue.plan is None:
        raise RuleViolation(f"unknown plan {plan_id!r}")
    if not product_ids:
        raise RuleViolation("a request needs at least one product")
    missing = [p for p in product_ids if p not in catalogue.products]
    if missing:
        raise RuleViolation(f"unknown product(s): {', '.join(sorted(missing))}")
    not_offered = [p for p in product_ids if p not in catalogue.plan.product_ids]
    if not_offered:
        raise RuleViolation(
            f"product(s) {', '.join(sorted(not_offered))} not offered under plan {catalogue.plan.id!r}"
        )
    methods = {catalogue.products[p].auth_method for p in product_ids}
    if len(methods) > 1:
        listed = ", ".join(f"{p}={catalogue.products[p].auth_method.value}" for p in sorted(product_ids))
        raise RuleViolation(f"products must share one authentication method, got {listed}")
    if app_id is not None:
        if catalogue.app is None:
            raise RuleViolation(f"unknown app {app_id!r}")
        if catalogue.app.consumer_id != consumer_id:
            raise RuleViolation(f"app {app_id!r} does not belong to consumer {consumer_id!r}")
    return methods.pop()


class AccessRequest:
    """One consumer's request for products under a plan, for one app.

    Parameters:
      id: the request id chosen by the portal; also the idempotency key.
      app_id: the existing app, or ``None`` while a requested new app is not yet created.
      new_app: the app to create when the request is accepted, if the portal asked for one.
    """

    def __init__(
        self,
        *,
        id: str,
        consumer_id: str,
        plan_id: str,
        product_ids: list[str],
        app_id: str | None,
        new_app_name: str | None = None,
        new_app_description: str | None = None,
        justification: str | None = None,
        submitted_at: datetime,
        received_at: datetime | None = None,
        status: Status = Status.SUBMITTED,
        auth_method: AuthMethod | None = None,
        status_reason: str = "",
        updated_at: datetime | None = None,
        portal_id: str | None = None,
        provision_attempts: int = 0,
    ) -> None:
        self.id = id
        self.consumer_id = consumer_id
        self.plan_id = plan_id
        self.product_ids = list(product_ids)
        self.app_id = app_id
        self.new_app_name = new_app_name
        self.new_app_description = new_app_description
        self.justification = justification
        self.submitted_at = submitted_at
        self.received_at = received_at or utcnow()
        self.status = status
        self.auth_method = auth_method
        self.status_reason = status_reason
        self.updated_at = updated_at or self.received_at
        self.portal_id = portal_id
        #: How many times the sweep issued this approved request's credentials again, its first
        #: IssueCredentials command lost or dead-lettered (:meth:`redrive_provisioning`).
        self.provision_attempts = provision_attempts
        #: The sequence number of the last event the portal was sent about this request.
        self.event_seq = 0
        self.history: list[AuditEntry] = []
        self.events: list[events.Event] = []

    # --- transitions -------------------------------------------------------------------------

    def _move(self, to: Status, *, actor_kind: ActorKind, actor_id: str, reason: str) -> None:
        if to not in ALLOWED_TRANSITIONS[self.status]:
            raise IllegalTransition(f"request {self.id} cannot go from {self.status} to {to}")
        now = utcnow()
        self.history.append(
            AuditEntry(
                request_id=self.id,
                from_status=self.status,
                to_status=to,
                actor_kind=actor_kind,
                actor_id=actor_id,
                reason=reason,
                at=now,
            )
        )
        self.status = to
        self.status_reason = reason
        self.updated_at = now

    def record_submission(self) -> None:
        """Write the first audit row: the request exists, as the portal sent it."""
        self.history.append(
            AuditEntry(
                request_id=self.id,
                from_status=None,
                to_status=Status.SUBMITTED,
                actor_kind=ActorKind.SYSTEM,
                actor_id="router",
                reason=f"received from portal {self.portal_id}" if self.portal_id else "received from portal",
                at=self.received_at,
            )
        )
        self.events.append(events.RequestSubmitted(self.id))

    def next_event_sequence(self) -> int:
        """Number the next event the portal hears about this request: 1, 2, 3, ..."""
        self.event_seq += 1
        return self.event_seq

    def route(self, catalogue: Catalogue) -> None:
        """Validate against the catalogue, then approve at once or park for review.

        The auto-approve flag comes from ``catalogue.plan``, which the caller loaded
        from the database; nothing in the message can set it.
        """
        if self.status is not Status.SUBMITTED:
            raise IllegalTransition(f"request {self.id} was routed already; it is {self.status}")
        try:
            auth_method = check_rules(
                plan_id=self.plan_id,
                product_ids=self.product_ids,
                consumer_id=self.consumer_id,
                app_id=self.app_id,
                catalogue=catalogue,
            )
        except RuleViolation as violation:
            self.invalidate(violation.reason)
            return
        self.auth_method = auth_method
        assert catalogue.plan is not None  # check_rules guarantees it
        if catalogue.plan.auto_approve:
            self._move(
                Status.APPROVED,
                actor_kind=ActorKind.SYSTEM,
                actor_id="router",
                reason=f"plan {catalogue.plan.id!r} is auto-approve",
            )
            self.events.append(events.RequestApproved(self.id, automatically=True))
        else:
            self.park_for_review()

    def invalidate(self, reason: str) -> None:
        self._move(Status.INVALID, actor_kind=ActorKind.SYSTEM, actor_id="router", reason=reason)
        self.events.append(events.RequestInvalidated(self.id, reason))

    def park_for_review(self) -> None:
        self._move(
            Status.PENDING_REVIEW,
            actor_kind=ActorKind.SYSTEM,
            actor_id="router",
            reason="plan requires manual approval",
        )
        self.events.append(events.RequestParkedForReview(self.id))

    def approve(self, *, admin_id: str, reason: str) -> None:
        self._move(Status.APPROVED, actor_kind=ActorKind.ADMIN, actor_id=admin_id, reason=reason)
        self.events.append(events.RequestApproved(self.id, automatically=False))

    def reject(self, *, admin_id: str, reason: str) -> None:
        self._move(Status.REJECTED, actor_kind=ActorKind.ADMIN, actor_id=admin_id, reason=reason)
        self.events.append(events.RequestRejected(self.id, reason))

    def fail_provisioning(self, reason: str, *, by: str = "issuer") -> None:
        """No credential can be issued; the request waits, visibly, for an operator's retry.

        ``by`` names the system part that gave up, for the audit trail: the ``issuer``, or the
        ``provisioning-sweep`` once its re-drives are spent.
        """
        self._move(Status.PROVISIONING_FAILED, actor_kind=ActorKind.SYSTEM, actor_id=by, reason=reason)
        self.events.append(events.ProvisioningFailed(self.id, reason))

    def redrive_provisioning(self, now: datetime) -> None:
        """Count one more issue of the credentials by the sweep; ``updated_at`` dates it.

        The request stays ``approved``: only a credential, or a failure, moves it on.
        """
        if self.status is not Status.APPROVED:
            raise IllegalTransition(f"request {self.id} is {self.status}: only an approved one is re-driven")
        self.provision_attempts += 1
        self.updated_at = now

    def retry_provisioning(self, *, operator: str, reason: str) -> None:
        """Back to approved, once the cause is fixed: the credential is issued again from there.

        The sweep's count of re-drives starts again.
        """
        self._move(Status.APPROVED, actor_kind=ActorKind.OPERATOR, actor_id=operator, reason=reason)
        self.provision_attempts = 0
        self.events.append(events.RequestApproved(self.id, automatically=False))

    def mark_provisioned(self, credential_id: str) -> None:
        self._move(
            Status.PROVISIONED,
            actor_kind=ActorKind.SYSTEM,
            actor_id="issuer",
            reason=f"credential {credential_id} issued",
        )
        self.events.append(events.CredentialsProvisioned(self.id, credential_id))


class DecisionOutcome(enum.StrEnum):
    APPLIED = "applied"
    #: Authentic, but moot: a second decision, or one about a request not pending review.
    IGNORED = "ignored"
    #: Not shown to come from an admin: unsigned, badly signed, stale, or an unknown or revoked key.
    REFUSED = "refused"


@dataclass
class Decision:
    """An admin's decision as received, kept whether or not it was applied."""

    id: str
    request_id: str
    approve: bool
    admin_id: str
    admin_email: str
    reason: str
    decided_at: datetime
    outcome: DecisionOutcome
    outcome_reason: str = ""
    received_at: datetime = field(default_factory=utcnow)
    #: The admin key whose signature was verified; ``None`` when none was.
    key_id: str | None = None


@dataclass
class Credential:
    """Credentials issued to an app for one request.

    The plaintext secret is never stored: ``secret_hash`` lets a gateway check a
    presented secret, and ``sealed_secret`` (encrypted) exists only until the
    consumer's side reveals it once.
    """

    id: str
    request_id: str
    app_id: str
    kind: AuthMethod
    #: The API key's lookup prefix, or the OAuth2 client id; safe to show and log.
    public_id: str
    secret_hash: str
    sealed_secret: bytes | None
    product_ids: list[str]
    rate_limit_per_minute: int
    monthly_quota: int | None
    created_at: datetime = field(default_factory=utcnow)
    revealed_at: datetime | None = None
    revoked_at: datetime | None = None

    def reveal(self, unseal: Callable[[bytes], str]) -> str | None:
        """Return the plaintext secret once, then forget it; ``None`` on every later call."""
        if self.sealed_secret is None:
            return None
        secret = unseal(self.sealed_secret)
        self.sealed_secret = None
        self.revealed_at = utcnow()
        return secret


class NotificationKind(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    REVIEW = "review"


class DeliveryStatus(enum.StrEnum):
    SENDING = "sending"
    SENT = "sent"
    #: Sent, but some recipients were refused; ``last_error`` names them.
    PARTIAL = "partial"
    FAILED = "failed"


@dataclass
class Notification:
    """One email we owe about one request; at most one per (request, kind)."""

    request_id: str
    kind: NotificationKind
    message_id: str
    status: DeliveryStatus = DeliveryStatus.SENDING
    attempts: int = 0
    last_error: str = ""
    created_at: datetime = field(default_factory=utcnow)
    sent_at: datetime | None = None
    #: While a worker is talking SMTP for this email, others leave it alone until this time.
    lease_expires_at: datetime | None = None
    id: int | None = None

    def leased_by_another(self, now: datetime) -> bool:
        lease = self.lease_expires_at
        if lease is None:
            return False
        if lease.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
            lease = lease.replace(tzinfo=UTC)
        return lease > now
