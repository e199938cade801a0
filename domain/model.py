r"""Catalogue entities and the :class:`AccessRequest` aggregate with its state machine.

The state machine::

    SUBMITTED --validate, or over a throttle--> INVALID (final, with a reason)
        |
        +--an approval rule refuses the email domain--> REJECTED (final, with the rule's reason)
        |
        +--auto-approve plan or rule--> APPROVED --credentials issued--> PROVISIONED (final)
        |                          ^
        +--manual plan--> PENDING_REVIEW --admin rejects--> REJECTED (final, with the admin's reason)
                                   |
                                   +--admin approves--> APPROVED
                                   |
                                   +--review deadline passes--> EXPIRED (final, by the sweep)

Every transition appends an :class:`AuditEntry` and records a domain event in
``events``; the aggregate never publishes anything itself.

A request of kind ``plan_change`` travels the same states: it asks to move an issued
credential to another plan, is approved at once or reviewed as the new plan says, and is
``provisioned`` when the credential carries the new plan's limits; no new key is made.

An issued :class:`Credential` has a life of its own::

    ACTIVE <--suspend/resume--> SUSPENDED
      |  \                        |
      |   +--expires_at passes--> EXPIRED (final) <--+
      +--revoke--> REVOKED (final) <--revoke--------+

Rotation gives an active or suspended credential a new secret, and may let the old one
verify until a grace period ends; a change of plan gives it the new plan's limits.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from domain import events
from domain.errors import IllegalTransition, RuleViolation
from domain.rules import Action, RequestCounts, Rule, Throttle, evaluate, throttle_refusal


def utcnow() -> datetime:
    return datetime.now(UTC)


#: Who expires a request unreviewed by its deadline, in the audit trail.
REVIEW_SWEEP = "review-deadline-sweep"
#: The mark in ``AccessRequest.review_notices`` of the escalation sent.
ESCALATED = "escalated"


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
    #: Parked for review, and no admin decided before its review deadline.
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({Status.PROVISIONED, Status.REJECTED, Status.INVALID, Status.EXPIRED})

#: Which states each state may move to. Anything else raises IllegalTransition.
ALLOWED_TRANSITIONS: dict[Status, frozenset[Status]] = {
    # Straight to rejected: an approval rule refuses the consumer's email domain.
    Status.SUBMITTED: frozenset({Status.INVALID, Status.PENDING_REVIEW, Status.APPROVED, Status.REJECTED}),
    Status.PENDING_REVIEW: frozenset({Status.APPROVED, Status.REJECTED, Status.EXPIRED}),
    Status.APPROVED: frozenset({Status.PROVISIONED, Status.PROVISIONING_FAILED}),
    Status.PROVISIONING_FAILED: frozenset({Status.APPROVED}),
    Status.PROVISIONED: frozenset(),
    Status.REJECTED: frozenset(),
    Status.INVALID: frozenset(),
    Status.EXPIRED: frozenset(),
}


class RequestKind(enum.StrEnum):
    #: A consumer asks for products under a plan: a new credential when approved.
    ACCESS = "access"
    #: A consumer (or an admin on their behalf) asks to move an issued credential to another plan.
    PLAN_CHANGE = "plan_change"


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
    #: How long each credential issued under this plan lives, in days; ``None``: for ever.
    credential_lifetime_days: int | None = None
    #: Approval rules, first match decides (:mod:`domain.rules`); none: ``auto_approve`` decides.
    rules: list[Rule] = field(default_factory=list)
    #: Throttles per consumer on this plan; ``None``: no limit.
    max_open_requests_per_consumer: int | None = None
    max_requests_per_consumer_per_hour: int | None = None
    #: How long a request parked for review may wait for a decision, in hours; ``None``: the
    #: deployment's default (``ACCESSFLOW_REVIEW_DEADLINE_HOURS``), and none if that is unset.
    review_deadline_hours: float | None = None


def review_deadline(plan: Plan, default_hours: float | None, parked_at: datetime) -> datetime | None:
    """When a request parked at ``parked_at`` under ``plan`` expires unreviewed; ``None``: never.

    The plan's own ``review_deadline_hours`` wins over ``default_hours``; zero or less is none.
    """
    hours = plan.review_deadline_hours if plan.review_deadline_hours is not None else default_hours
    if hours is None or hours <= 0:
        return None
    return parked_at + timedelta(hours=hours)


@dataclass
class Consumer:
    id: str
    email: str
    name: str
    #: This consumer's own throttles, in place of each plan's (higher or lower); ``None``: the plan's.
    max_open_requests: int | None = None
    max_requests_per_hour: int | None = None


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
    #: For a plan change: the credential it would change (``None`` if there is no such credential).
    credential: Credential | None = None
    #: Whether the consumer holds an active credential on the plan; loaded only when a rule asks.
    holds_active_credential: bool = False
    #: The consumer's requests on the plan, counted under a lock; loaded only when the plan throttles.
    counts: RequestCounts | None = None


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


def throttle_for(plan: Plan, consumer: Consumer) -> Throttle:
    """The limits a consumer's requests on a plan are held to: the consumer's own where set, else the plan's."""
    return Throttle(
        max_open=(
            consumer.max_open_requests
            if consumer.max_open_requests is not None
            else plan.max_open_requests_per_consumer
        ),
        max_per_hour=(
            consumer.max_requests_per_hour
            if consumer.max_requests_per_hour is not None
            else plan.max_requests_per_consumer_per_hour
        ),
    )


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
        kind: RequestKind = RequestKind.ACCESS,
        credential_id: str | None = None,
        review_deadline_at: datetime | None = None,
        review_notices: str = "",
        routed_by: str = "",
        approvals_required: int = 1,
        approvers: Sequence[str] = (),
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
        self.kind = kind
        #: The credential whose plan a ``plan_change`` request would change; ``None`` for access.
        self.credential_id = credential_id
        #: When a request parked for review expires if no admin decides; ``None``: never.
        self.review_deadline_at = review_deadline_at
        #: The reminders (hours before the deadline, "24h,4h") and escalation ("escalated") already
        #: queued for the current deadline, as ``Credential.expiry_notices`` does for expiry.
        self.review_notices = review_notices
        #: Which rule (or plan flag, or throttle, or check) decided the routing, in words.
        self.routed_by = routed_by
        #: How many distinct admins must approve it while pending review, and which may (empty: any).
        self.approvals_required = approvals_required
        self.approvers = list(approvers)
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

    def record_submission(self, reason: str | None = None) -> None:
        """Write the first audit row: the request exists, as the portal (or ``reason`` says who) sent it."""
        if reason is None:
            reason = f"received from portal {self.portal_id}" if self.portal_id else "received from portal"
        self.history.append(
            AuditEntry(
                request_id=self.id,
                from_status=None,
                to_status=Status.SUBMITTED,
                actor_kind=ActorKind.SYSTEM,
                actor_id="router",
                reason=reason,
                at=self.received_at,
            )
        )
        self.events.append(events.RequestSubmitted(self.id))

    def next_event_sequence(self) -> int:
        """Number the next event the portal hears about this request: 1, 2, 3, ..."""
        self.event_seq += 1
        return self.event_seq

    def route(self, catalogue: Catalogue) -> None:
        """Validate against the catalogue, check the throttle, then let the plan's rules decide.

        In order: an invalid request, or one over its throttle (``catalogue.counts``, counted
        by the caller only when a throttle applies), is invalid; else the plan's rules, first
        match first, approve, reject or park it, and the auto-approve flag decides when none
        matches. ``routed_by`` records what decided. The plan, its rules and flag come from
        ``catalogue.plan``, which the caller loaded from the database; nothing in the message
        can set them.
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
        if self.kind is RequestKind.PLAN_CHANGE:
            refusal = self._plan_change_refusal(catalogue.credential, auth_method)
            if refusal is not None:
                self.invalidate(refusal)
                return
        self.auth_method = auth_method
        plan, consumer = catalogue.plan, catalogue.consumer
        assert plan is not None and consumer is not None  # check_rules guarantees them
        if catalogue.counts is not None:
            throttled = throttle_refusal(
                throttle_for(plan, consumer), catalogue.counts, consumer_id=self.consumer_id, plan_id=plan.id
            )
            if throttled is not None:
                self.invalidate(throttled)
                return
        verdict = evaluate(
            plan.rules,
            plan_id=plan.id,
            auto_approve=plan.auto_approve,
            consumer_id=self.consumer_id,
            email=consumer.email,
            holds_active_credential=catalogue.holds_active_credential,
        )
        self.routed_by = verdict.why
        if verdict.action is Action.APPROVE:
            self._move(Status.APPROVED, actor_kind=ActorKind.SYSTEM, actor_id="router", reason=verdict.why)
            self.events.append(events.RequestApproved(self.id, automatically=True))
        elif verdict.action is Action.REJECT:
            # The audit trail names the rule; the consumer's email and the portal get its reason.
            self._move(Status.REJECTED, actor_kind=ActorKind.SYSTEM, actor_id="router", reason=verdict.why)
            self.status_reason = verdict.reason
            self.events.append(events.RequestRejected(self.id, verdict.reason))
        else:
            self.approvals_required = verdict.approvals_required
            self.approvers = list(verdict.approvers)
            self.park_for_review(verdict.why)

    def _plan_change_refusal(self, credential: Credential | None, auth_method: AuthMethod) -> str | None:
        if credential is None:
            return f"unknown credential {self.credential_id!r}"
        if credential.app_id != self.app_id:
            return f"credential {credential.id!r} is not app {self.app_id!r}'s"
        if credential.status not in LIVE_CREDENTIAL_STATUSES:
            return f"credential {credential.id!r} is {credential.status.value}: its plan cannot change"
        if sorted(credential.product_ids) != sorted(self.product_ids):
            return (
                f"a plan change keeps credential {credential.id!r}'s products "
                f"({', '.join(sorted(credential.product_ids))}); ask for others with a new request"
            )
        if credential.plan_id == self.plan_id:
            return f"credential {credential.id!r} is on plan {self.plan_id!r} already"
        if credential.kind is not auth_method:
            return (
                f"credential {credential.id!r} is {credential.kind.value}, "
                f"but plan {self.plan_id!r}'s products use {auth_method.value}"
            )
        return None

    def invalidate(self, reason: str) -> None:
        self.routed_by = reason
        self._move(Status.INVALID, actor_kind=ActorKind.SYSTEM, actor_id="router", reason=reason)
        self.events.append(events.RequestInvalidated(self.id, reason))

    def park_for_review(self, why: str = "plan requires manual approval") -> None:
        self._move(Status.PENDING_REVIEW, actor_kind=ActorKind.SYSTEM, actor_id="router", reason=why)
        self.events.append(events.RequestParkedForReview(self.id))

    # --- the review deadline ------------------------------------------------------------------

    def set_review_deadline(self, deadline: datetime | None) -> None:
        """Give a request parked for review its deadline (``None``: none); its reminders start again."""
        if self.status is not Status.PENDING_REVIEW:
            raise IllegalTransition(
                f"request {self.id} is {self.status}: only one pending review has a deadline"
            )
        self.review_deadline_at = deadline
        self.review_notices = ""

    def _sent_review_notices(self) -> set[str]:
        return set(self.review_notices.split(",")) - {""}

    def review_reminders_due(self, points: Sequence[timedelta], now: datetime) -> list[timedelta]:
        """The reminder points (time before the deadline) reached at ``now`` and not yet sent, longest first."""
        if self.status is not Status.PENDING_REVIEW or self.review_deadline_at is None:
            return []
        deadline = _aware(self.review_deadline_at)
        if now >= deadline:
            return []
        sent = self._sent_review_notices()
        return [p for p in sorted(points, reverse=True) if now >= deadline - p and _hours(p) not in sent]

    def note_review_reminder(self, due: Sequence[timedelta], *, now: datetime) -> None:
        """Record the reminder points reached (:meth:`review_reminders_due`); one reminder goes out, for the nearest.

        A request first seen 2 hours before its deadline needs no 24-hour reminder as well.
        """
        assert due and self.review_deadline_at is not None
        self.review_notices = ",".join(filter(None, [self.review_notices, *(_hours(p) for p in due)]))
        self.events.append(
            events.ReviewReminderDue(self.id, _hours(due[-1]), _aware(self.review_deadline_at))
        )

    def escalation_due(self, point: timedelta | None, now: datetime) -> bool:
        """Whether the escalation, ``point`` before the deadline (``None``: none), is due at ``now`` and not yet sent."""
        if point is None or self.status is not Status.PENDING_REVIEW or self.review_deadline_at is None:
            return False
        deadline = _aware(self.review_deadline_at)
        return deadline - point <= now < deadline and ESCALATED not in self._sent_review_notices()

    def escalate_review(self, *, now: datetime) -> None:
        """Record the escalation; the escalation list is told once per deadline."""
        assert self.review_deadline_at is not None
        self.review_notices = ",".join(filter(None, [self.review_notices, ESCALATED]))
        self.events.append(events.ReviewEscalated(self.id, _aware(self.review_deadline_at)))

    def review_overdue(self, now: datetime) -> bool:
        return (
            self.status is Status.PENDING_REVIEW
            and self.review_deadline_at is not None
            and now >= _aware(self.review_deadline_at)
        )

    def expire_review(self, *, now: datetime) -> None:
        """No admin decided by the deadline: the request ends ``expired``, by the sweep, with the reason."""
        deadline = self.review_deadline_at
        if self.status is Status.PENDING_REVIEW and not self.review_overdue(now):
            raise IllegalTransition(
                f"request {self.id} waits for review until {deadline}: not expired at {now}"
            )
        when = f"{_aware(deadline):%Y-%m-%dT%H:%M:%SZ}" if deadline is not None else "none"
        reason = f"no review decision by the deadline, {when}; submit a new request to ask again"
        self._move(Status.EXPIRED, actor_kind=ActorKind.SYSTEM, actor_id=REVIEW_SWEEP, reason=reason)
        self.events.append(events.RequestExpired(self.id, reason))

    def approve(self, *, admin_id: str, reason: str) -> None:
        self._move(Status.APPROVED, actor_kind=ActorKind.ADMIN, actor_id=admin_id, reason=reason)
        self.events.append(events.RequestApproved(self.id, automatically=False))

    @property
    def needs_several_approvals(self) -> bool:
        """Whether an approval is counted (:meth:`count_approval`) rather than applied at once."""
        return self.approvals_required > 1 or bool(self.approvers)

    def approval_refusal(self, admin_id: str, approved_by: Collection[str]) -> str | None:
        """Why ``admin_id``'s approval does not count, given the admins who approved already; ``None``: it does."""
        if self.approvers and admin_id not in self.approvers:
            return f"admin {admin_id!r} is not one of this request's approvers ({', '.join(self.approvers)})"
        if admin_id in approved_by:
            return f"admin {admin_id!r} approved already: an admin's approvals count once"
        return None

    def count_approval(self, *, admin_id: str, reason: str, approved_by: Collection[str]) -> bool:
        """Count one more distinct admin's approval; the ``approvals_required``-th approves the request.

        Each approval is a row of the audit trail of its own, the request still pending until the last.

        Returns:
          Whether this approval approved the request.
        """
        count = len(approved_by) + 1
        counted = f"approval {count} of {self.approvals_required}: {reason}"
        if count >= self.approvals_required:
            self.approve(admin_id=admin_id, reason=counted)
            return True
        if self.status is not Status.PENDING_REVIEW:
            raise IllegalTransition(
                f"request {self.id} is {self.status}: only a pending one counts approvals"
            )
        now = utcnow()
        self.history.append(
            AuditEntry(
                request_id=self.id,
                from_status=self.status,
                to_status=self.status,
                actor_kind=ActorKind.ADMIN,
                actor_id=admin_id,
                reason=counted,
                at=now,
            )
        )
        self.updated_at = now
        return False

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
    #: An approval counted towards the several a request needs (an ``approvers`` rule), not yet the last.
    COUNTED = "counted"
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


class CredentialStatus(enum.StrEnum):
    ACTIVE = "active"
    #: Stops verifying until resumed; the secret is kept.
    SUSPENDED = "suspended"
    #: Stops verifying for good.
    REVOKED = "revoked"
    #: Its lifetime ran out; stops verifying for good (a new request gets a new one).
    EXPIRED = "expired"


class CredentialChangeKind(enum.StrEnum):
    """What happened to a credential: the portal's event is ``credentials.<value>``, the gateway's change too."""

    ISSUED = "issued"
    ROTATED = "rotated"
    REVOKED = "revoked"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    EXPIRY_SET = "expiry_set"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    PLAN_CHANGED = "plan_changed"


@dataclass(frozen=True)
class CredentialChanged:
    """A credential changed; recorded by the credential, handled after commit like any domain event."""

    credential_id: str
    change: CredentialChangeKind
    #: The credential's revision after the change: gateways apply a change only over an older one.
    revision: int
    reason: str
    actor_kind: ActorKind
    actor_id: str
    at: datetime
    from_status: CredentialStatus
    to_status: CredentialStatus
    #: The admin operation (its id) or request that caused it, if any.
    cause_id: str | None = None


@dataclass(frozen=True)
class Attribution:
    """Who makes a change, when and why, and what caused it (an admin operation's or a request's id)."""

    at: datetime
    actor_kind: ActorKind
    actor_id: str
    reason: str
    cause_id: str | None = None


#: The statuses a credential can still be used, rotated or moved from (if not past its expiry).
LIVE_CREDENTIAL_STATUSES = (CredentialStatus.ACTIVE, CredentialStatus.SUSPENDED)
#: Who expires credentials and sends their notices, in their audit trail.
EXPIRY_SWEEP = "expiry-sweep"


@dataclass
class Credential:
    """Credentials issued to an app for one request, through their whole life.

    The plaintext secret is never stored: ``secret_hash`` lets a gateway check a
    presented secret, and ``sealed_secret`` (encrypted) exists only until the
    consumer's side reveals it once. After a rotation with a grace period, the previous
    secret (``previous_public_id``, ``previous_secret_hash``) verifies too until
    ``previous_valid_until``.
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
    status: CredentialStatus = CredentialStatus.ACTIVE
    #: The plan whose limits it carries; changes with a plan change.
    plan_id: str = ""
    consumer_id: str = ""
    #: When it stops verifying; ``None``: never.
    expires_at: datetime | None = None
    previous_public_id: str | None = None
    previous_secret_hash: str | None = None
    previous_valid_until: datetime | None = None
    #: 1 when issued, one more with every change.
    revision: int = 1
    updated_at: datetime | None = None
    #: The expiry notices already queued for the current ``expires_at``, as days before it ("14,3").
    expiry_notices: str = ""
    changes: list[CredentialChanged] = field(default_factory=list, repr=False, compare=False)

    def record_issue(self, *, now: datetime, reason: str) -> CredentialChanged:
        """The first row of its trail: issued at revision 1, by the issuer."""
        recorded = CredentialChanged(
            credential_id=self.id,
            change=CredentialChangeKind.ISSUED,
            revision=self.revision,
            reason=reason,
            actor_kind=ActorKind.SYSTEM,
            actor_id="issuer",
            at=now,
            from_status=self.status,
            to_status=self.status,
            cause_id=self.request_id,
        )
        self.changes.append(recorded)
        return recorded

    def reveal(self, unseal: Callable[[bytes], str]) -> str | None:
        """Return the plaintext secret once, then forget it; ``None`` on every later call."""
        if self.sealed_secret is None:
            return None
        secret = unseal(self.sealed_secret)
        self.sealed_secret = None
        self.revealed_at = utcnow()
        return secret

    # --- what verifies ------------------------------------------------------------------------

    def usable_at(self, now: datetime) -> bool:
        """Active and not past its expiry: whether any secret of it may verify at ``now``."""
        if self.status is not CredentialStatus.ACTIVE:
            return False
        return self.expires_at is None or now < _aware(self.expires_at)

    def hashes_for(self, public_id: str, now: datetime) -> list[str]:
        """The stored hashes a secret presented under ``public_id`` may match at ``now``; none: it cannot verify.

        The current secret verifies while the credential is usable; the previous one, after a
        rotation, only until its grace period ends. An OAuth2 client keeps its id through a
        rotation, so both may be under the same id.
        """
        if not self.usable_at(now):
            return []
        hashes = [self.secret_hash] if public_id == self.public_id else []
        grace_ends = self.previous_valid_until
        if (
            public_id == self.previous_public_id
            and self.previous_secret_hash is not None
            and grace_ends is not None
            and now < _aware(grace_ends)
        ):
            hashes.append(self.previous_secret_hash)
        return hashes

    # --- changes ------------------------------------------------------------------------------

    def _change(
        self,
        change: CredentialChangeKind,
        by: Attribution,
        *,
        to: CredentialStatus | None = None,
        reason: str | None = None,
    ) -> CredentialChanged:
        """Count one change, to status ``to`` if given, and record it for the credential's trail."""
        before = self.status
        if to is not None:
            self.status = to
        self.revision += 1
        self.updated_at = by.at
        recorded = CredentialChanged(
            credential_id=self.id,
            change=change,
            revision=self.revision,
            reason=by.reason if reason is None else reason,
            actor_kind=by.actor_kind,
            actor_id=by.actor_id,
            at=by.at,
            from_status=before,
            to_status=self.status,
            cause_id=by.cause_id,
        )
        self.changes.append(recorded)
        return recorded

    def _refuse_unless(self, action: str, *allowed: CredentialStatus) -> None:
        if self.status not in allowed:
            raise IllegalTransition(f"credential {self.id} is {self.status.value}: it cannot be {action}")

    def rotate(
        self, *, public_id: str, secret_hash: str, grace: timedelta, by: Attribution
    ) -> CredentialChanged:
        """Take a new secret; the old one verifies until ``by.at + grace`` (not at all with no grace)."""
        self._refuse_unless("rotated", *LIVE_CREDENTIAL_STATUSES)
        reason = by.reason
        if grace > timedelta(0):
            self.previous_public_id, self.previous_secret_hash = self.public_id, self.secret_hash
            self.previous_valid_until = by.at + grace
            reason += f" (the previous secret verifies until {by.at + grace:%Y-%m-%dT%H:%M:%SZ})"
        else:
            self.previous_public_id = self.previous_secret_hash = self.previous_valid_until = None
        self.public_id, self.secret_hash = public_id, secret_hash
        return self._change(CredentialChangeKind.ROTATED, by, reason=reason)

    def revoke(self, by: Attribution) -> CredentialChanged:
        self._refuse_unless("revoked", *LIVE_CREDENTIAL_STATUSES, CredentialStatus.EXPIRED)
        self.revoked_at = by.at
        self.previous_valid_until = None  # nothing of a revoked credential verifies
        return self._change(CredentialChangeKind.REVOKED, by, to=CredentialStatus.REVOKED)

    def suspend(self, by: Attribution) -> CredentialChanged:
        self._refuse_unless("suspended", CredentialStatus.ACTIVE)
        return self._change(CredentialChangeKind.SUSPENDED, by, to=CredentialStatus.SUSPENDED)

    def resume(self, by: Attribution) -> CredentialChanged:
        self._refuse_unless("resumed", CredentialStatus.SUSPENDED)
        return self._change(CredentialChangeKind.RESUMED, by, to=CredentialStatus.ACTIVE)

    def set_expiry(self, expires_at: datetime | None, by: Attribution) -> CredentialChanged:
        """Give it a new end of life (``None``: none); the notices start again for the new date."""
        self._refuse_unless("given an expiry", *LIVE_CREDENTIAL_STATUSES)
        self.expires_at = expires_at
        self.expiry_notices = ""
        until = f"{expires_at:%Y-%m-%dT%H:%M:%SZ}" if expires_at else "never"
        return self._change(CredentialChangeKind.EXPIRY_SET, by, reason=f"{by.reason} (expires: {until})")

    def notices_due(self, points: Sequence[timedelta], now: datetime) -> list[timedelta]:
        """The notice points (time before expiry) reached at ``now`` and not yet noticed, longest first."""
        if self.expires_at is None or self.status not in LIVE_CREDENTIAL_STATUSES:
            return []
        expires_at = _aware(self.expires_at)
        if now >= expires_at:
            return []
        sent = set(self.expiry_notices.split(",")) - {""}
        return [p for p in sorted(points, reverse=True) if now >= expires_at - p and _days(p) not in sent]

    def note_expiry_notice(self, due: Sequence[timedelta], *, now: datetime) -> CredentialChanged:
        """Record the notice points reached (:meth:`notices_due`); one notice goes out, for the nearest.

        A credential first seen 2 days before its end needs no 14-day notice as well.
        """
        assert due and self.expires_at is not None
        self.expiry_notices = ",".join(filter(None, [self.expiry_notices, *(_days(p) for p in due)]))
        ends = f"{_aware(self.expires_at):%Y-%m-%dT%H:%M:%SZ}"
        by = Attribution(now, ActorKind.SYSTEM, EXPIRY_SWEEP, f"expires at {ends} ({_days(due[-1])} notice)")
        return self._change(CredentialChangeKind.EXPIRING, by)

    def has_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= _aware(self.expires_at)

    def expire(self, *, now: datetime) -> CredentialChanged:
        self._refuse_unless("expired", *LIVE_CREDENTIAL_STATUSES)
        if self.expires_at is None or not self.has_expired(now):
            raise IllegalTransition(f"credential {self.id} does not expire before {self.expires_at}")
        self.previous_valid_until = None
        ends = f"{_aware(self.expires_at):%Y-%m-%dT%H:%M:%SZ}"
        by = Attribution(now, ActorKind.SYSTEM, EXPIRY_SWEEP, f"its lifetime ended at {ends}")
        return self._change(CredentialChangeKind.EXPIRED, by, to=CredentialStatus.EXPIRED)

    def change_plan(self, plan: Plan, by: Attribution) -> CredentialChanged:
        """Carry ``plan``'s limits from now on; the key stays the same."""
        self._refuse_unless("moved to another plan", *LIVE_CREDENTIAL_STATUSES)
        before = self.plan_id
        self.plan_id = plan.id
        self.rate_limit_per_minute = plan.rate_limit_per_minute
        self.monthly_quota = plan.monthly_quota
        return self._change(
            CredentialChangeKind.PLAN_CHANGED, by, reason=f"plan {before!r} -> {plan.id!r}: {by.reason}"
        )


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _hours(point: timedelta) -> str:
    """A reminder point as the notices list spells it: ``24h``, or ``90s`` for one not a whole hour."""
    seconds = int(point.total_seconds())
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds}s"


def _days(point: timedelta) -> str:
    """A notice point as the notices list spells it: ``14d``, or ``90s`` for one shorter than a day."""
    seconds = int(point.total_seconds())
    return f"{seconds // 86400}d" if seconds % 86400 == 0 else f"{seconds}s"


class CredentialOperationKind(enum.StrEnum):
    """What an admin may do to credentials, by a signed operation."""

    ROTATE = "rotate"
    REVOKE = "revoke"
    SUSPEND = "suspend"
    RESUME = "resume"
    SET_EXPIRY = "set_expiry"
    CHANGE_PLAN = "change_plan"


class OperationTarget(enum.StrEnum):
    """Which credentials an operation names: one, every one of an app, or every one of a consumer."""

    CREDENTIAL = "credential"
    APP = "app"
    CONSUMER = "consumer"


@dataclass
class CredentialOperation:
    """An admin's operation on credentials as received, kept whether or not it was applied.

    ``results`` says, per credential it reached, what happened to it: ``applied``, or why not
    (``credential ... is revoked: it cannot be suspended``); a plan change names the request
    it opened.
    """

    id: str
    operation: CredentialOperationKind
    target: OperationTarget
    target_id: str
    admin_id: str
    reason: str
    issued_at: datetime
    outcome: DecisionOutcome
    outcome_reason: str = ""
    results: dict[str, str] = field(default_factory=dict)
    received_at: datetime = field(default_factory=utcnow)
    key_id: str | None = None


class BulkItemResult(enum.StrEnum):
    """What a bulk decision did to one request it selected."""

    APPLIED = "applied"
    #: An approval counted towards the several the request needs, not yet the last.
    COUNTED = "counted"
    #: The request is no longer pending review: decided, expired or withdrawn before.
    ALREADY_DECIDED = "already_decided"
    #: Pending, but this approval does not count (an ``approvers`` rule: not a listed admin, or twice).
    IGNORED = "ignored"
    NOT_FOUND = "not_found"
    #: The bulk was not shown to come from the admin it names: nothing was decided.
    REFUSED = "refused"


#: At most this many requests in one bulk decision, whether named by id or selected by a filter.
MAX_BULK_ITEMS = 200


@dataclass
class BulkDecision:
    """An admin's bulk decision as received, kept whether or not it was applied.

    ``selection`` says what it named (``ids`` or the filter, as ``plan_id=gold consumer_id=...``);
    ``results`` says, per request selected, a :class:`BulkItemResult`. Each item is also a
    decision of its own (its id derived from the bulk's and the request's), in the request's trail.
    """

    id: str
    approve: bool
    admin_id: str
    reason: str
    decided_at: datetime
    selection: str
    outcome: DecisionOutcome
    outcome_reason: str = ""
    results: dict[str, str] = field(default_factory=dict)
    received_at: datetime = field(default_factory=utcnow)
    key_id: str | None = None

    def settled(self) -> events.BulkDecisionSettled:
        """What the admins are told of it once it is recorded."""
        return events.BulkDecisionSettled(
            bulk_id=self.id,
            admin_id=self.admin_id,
            approve=self.approve,
            selection=self.selection,
            outcome=self.outcome.value,
            outcome_reason=self.outcome_reason,
            results=tuple(self.results.items()),
            occurred_at=self.received_at,
        )


class NotificationKind(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    REVIEW = "review"
    #: To the consumer, at each configured point before a credential expires.
    EXPIRY_NOTICE = "expiry_notice"
    #: To the consumer, when a credential has expired.
    EXPIRED = "expired"
    #: To the admins, at each configured point before a pending request's review deadline.
    REVIEW_REMINDER = "review_reminder"
    #: To the escalation list, once, when a pending request's review deadline is near.
    REVIEW_ESCALATION = "review_escalation"
    #: To the consumer, when their request expired unreviewed.
    REVIEW_EXPIRED = "review_expired"


class DeliveryStatus(enum.StrEnum):
    SENDING = "sending"
    SENT = "sent"
    #: Sent, but some recipients were refused; ``last_error`` names them.
    PARTIAL = "partial"
    FAILED = "failed"


@dataclass
class Notification:
    """One email we owe about one request; at most one per (request, kind, topic)."""

    request_id: str
    kind: NotificationKind
    message_id: str
    status: DeliveryStatus = DeliveryStatus.SENDING
    #: Tells apart emails of one kind about one request (``credential-id/14d/2026-12-11``); usually empty.
    topic: str = ""
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
