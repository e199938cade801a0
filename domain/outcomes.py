"""What a handler did with a command, told to whoever watches: the infra side logs each one.

Unlike :mod:`domain.events`, which drive follow-up work and the portal, an outcome only
reports. Each is a frozen dataclass of ids and primitives, never a secret, with a stable
dotted ``name`` (the structured log line's event) and a ``level``. A handler records it
with :meth:`domain.ports.UnitOfWork.record_outcome`:

- an outcome about a state change (``committed_only``) is told once its transaction
  commits, and not at all if it rolls back: no line claims what did not happen;
- an outcome about something ignored or refused is told at once, committed or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

Level = Literal["info", "warning"]


@dataclass(frozen=True)
class Outcome:
    #: The event name of the log line, dotted: ``request.routed``.
    name: ClassVar[str]
    #: ``warning`` for refusals and failures an operator should see, ``info`` otherwise.
    level: ClassVar[Level] = "info"
    #: Told only once the transaction that made the change commits.
    committed_only: ClassVar[bool] = True


@dataclass(frozen=True)
class RequestRouted(Outcome):
    """A submission was routed: ``outcome`` is ``auto_approved``, ``pending_review``, ``rejected``
    (by an approval rule) or ``invalid`` (a throttle's too); ``routed_by`` names what decided it."""

    name: ClassVar[str] = "request.routed"
    request_id: str
    outcome: str
    portal_id: str | None
    consumer_id: str
    plan_id: str
    app_id: str | None
    reason: str
    routed_by: str = ""


@dataclass(frozen=True)
class RequestDuplicateIgnored(Outcome):
    """A submission already routed, or routed by a twin delivery at the same moment (``concurrent``)."""

    name: ClassVar[str] = "request.duplicate_ignored"
    committed_only: ClassVar[bool] = False
    request_id: str
    status: str
    concurrent: bool


@dataclass(frozen=True)
class RequestDecided(Outcome):
    """An authentic decision was recorded: ``applied``, or ``ignored`` with its reason (not pending...)."""

    name: ClassVar[str] = "request.decided"
    request_id: str
    decision_id: str
    admin_id: str
    approve: bool
    outcome: str
    status: str | None
    reason: str


@dataclass(frozen=True)
class DecisionDuplicateIgnored(Outcome):
    """A decision already recorded, or recorded by a twin delivery at the same moment (``concurrent``)."""

    name: ClassVar[str] = "decision.duplicate_ignored"
    committed_only: ClassVar[bool] = False
    decision_id: str
    request_id: str
    concurrent: bool


@dataclass(frozen=True)
class DecisionRefused(Outcome):
    """A decision not shown to come from an admin: recorded as refused, nothing changed."""

    name: ClassVar[str] = "decision.refused"
    level: ClassVar[Level] = "warning"
    committed_only: ClassVar[bool] = False
    decision_id: str
    request_id: str
    admin_id: str
    reason: str


@dataclass(frozen=True)
class CredentialsIssued(Outcome):
    """A credential was issued for an approved request; ``public_id`` is its public part only."""

    name: ClassVar[str] = "credentials.issued"
    request_id: str
    credential_id: str
    public_id: str
    app_id: str
    kind: str
    portal_id: str | None


@dataclass(frozen=True)
class CredentialsNotDue(Outcome):
    """An issue command for a request that is not approved (gone, or provisioned already): nothing to do."""

    name: ClassVar[str] = "credentials.not_due"
    committed_only: ClassVar[bool] = False
    request_id: str
    status: str | None


@dataclass(frozen=True)
class ProvisioningFailed(Outcome):
    """No credential can be issued: the request ends in ``provisioning_failed`` with ``reason``."""

    name: ClassVar[str] = "provisioning.failed"
    level: ClassVar[Level] = "warning"
    request_id: str
    reason: str


@dataclass(frozen=True)
class ProvisioningRedriven(Outcome):
    """The sweep of requests stuck in ``approved``: how many it issued again, and gave up on."""

    name: ClassVar[str] = "provisioning.redriven"
    level: ClassVar[Level] = "warning"
    redriven: int
    failed: int
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class EmailSent(Outcome):
    """The server took an email: ``outcome`` is ``sent``, or ``partial`` with ``refused`` recipients."""

    name: ClassVar[str] = "email.sent"
    request_id: str
    kind: str
    #: The email's RFC 5322 Message-ID (``message_id`` on a line is the broker message's).
    email_message_id: str
    outcome: str
    recipients: int
    refused: int


@dataclass(frozen=True)
class EmailFailed(Outcome):
    """An email that will not be sent: refused for good, or nobody to send it to."""

    name: ClassVar[str] = "email.failed"
    level: ClassVar[Level] = "warning"
    request_id: str
    kind: str
    #: The email's RFC 5322 Message-ID (``message_id`` on a line is the broker message's).
    email_message_id: str
    reason: str


@dataclass(frozen=True)
class EmailDuplicateIgnored(Outcome):
    """A twin delivery of an email command created the email at the same moment, and sends it."""

    name: ClassVar[str] = "email.duplicate_ignored"
    committed_only: ClassVar[bool] = False
    request_id: str
    kind: str


@dataclass(frozen=True)
class EmailDropped(Outcome):
    """An email command about a request that does not exist: dropped."""

    name: ClassVar[str] = "email.dropped"
    level: ClassVar[Level] = "warning"
    committed_only: ClassVar[bool] = False
    request_id: str
    kind: str


@dataclass(frozen=True)
class NotificationsRedriven(Outcome):
    """The sweep of emails stuck in ``sending``: how many it queued again, and gave up on."""

    name: ClassVar[str] = "notifications.redriven"
    level: ClassVar[Level] = "warning"
    redriven: int
    failed: int
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class CredentialsOperated(Outcome):
    """An authentic admin operation on credentials was recorded: ``applied``, or ``ignored`` with its reason."""

    name: ClassVar[str] = "credentials.operated"
    operation_id: str
    operation: str
    target: str
    target_id: str
    admin_id: str
    outcome: str
    reason: str
    #: Per credential reached (or the plan-change request opened): ``applied``, or why not.
    results: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CredentialOperationDuplicateIgnored(Outcome):
    """An operation already recorded, or recorded by a twin delivery at the same moment."""

    name: ClassVar[str] = "credentials.operation_duplicate_ignored"
    committed_only: ClassVar[bool] = False
    operation_id: str
    concurrent: bool


@dataclass(frozen=True)
class BulkDecided(Outcome):
    """An authentic bulk decision was recorded, with a result per request it selected."""

    name: ClassVar[str] = "access_request.bulk_decided"
    bulk_id: str
    admin_id: str
    approve: bool
    selection: str
    #: Per request selected: applied, counted, already_decided, ignored or not_found.
    results: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class BulkDecisionDuplicateIgnored(Outcome):
    """A bulk decision already recorded, or recorded by a twin delivery at the same moment."""

    name: ClassVar[str] = "access_request.bulk_duplicate_ignored"
    committed_only: ClassVar[bool] = False
    bulk_id: str
    concurrent: bool


@dataclass(frozen=True)
class BulkDecisionRefused(Outcome):
    """A bulk decision not shown to come from the admin it names; recorded, and nothing decided."""

    name: ClassVar[str] = "access_request.bulk_refused"
    level: ClassVar[Level] = "warning"
    committed_only: ClassVar[bool] = False
    bulk_id: str
    admin_id: str
    reason: str


@dataclass(frozen=True)
class CredentialOperationRefused(Outcome):
    """An operation not shown to come from the admin it names; recorded, and nothing changed."""

    name: ClassVar[str] = "credentials.operation_refused"
    level: ClassVar[Level] = "warning"
    committed_only: ClassVar[bool] = False
    operation_id: str
    admin_id: str
    reason: str


@dataclass(frozen=True)
class GatewayPushed(Outcome):
    """The gateway took a credential's change (a 2xx answer to its webhook)."""

    name: ClassVar[str] = "gateway.pushed"
    committed_only: ClassVar[bool] = False
    credential_id: str
    change: str
    revision: int
    event_id: str


@dataclass(frozen=True)
class GatewayPushRefused(Outcome):
    """The gateway refused a credential's change for good (a 4xx): dead-lettered with ``reason``."""

    name: ClassVar[str] = "gateway.push_refused"
    level: ClassVar[Level] = "warning"
    committed_only: ClassVar[bool] = False
    credential_id: str
    change: str
    revision: int
    event_id: str
    reason: str


@dataclass(frozen=True)
class CredentialExpirySwept(Outcome):
    """The expiry sweep expired some credentials and queued notices for others."""

    name: ClassVar[str] = "credentials.expiry_swept"
    expired: int
    noticed: int
    credential_ids: tuple[str, ...]


@dataclass(frozen=True)
class ReviewDeadlinesSwept(Outcome):
    """The review-deadline sweep expired some pending requests and queued reminders or escalations."""

    name: ClassVar[str] = "requests.review_deadlines_swept"
    expired: int
    reminded: int
    escalated: int
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class GatewayPushDropped(Outcome):
    """A push for a credential that does not exist: nothing to tell the gateway."""

    name: ClassVar[str] = "gateway.push_dropped"
    level: ClassVar[Level] = "warning"
    committed_only: ClassVar[bool] = False
    credential_id: str
    change: str
    revision: int
