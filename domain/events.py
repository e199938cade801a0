"""What happened to an access request, recorded by the aggregate, handled after commit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Event:
    request_id: str


@dataclass(frozen=True)
class RequestSubmitted(Event):
    pass


@dataclass(frozen=True)
class RequestApproved(Event):
    automatically: bool


@dataclass(frozen=True)
class RequestParkedForReview(Event):
    pass


@dataclass(frozen=True)
class RequestRejected(Event):
    reason: str


@dataclass(frozen=True)
class RequestInvalidated(Event):
    reason: str


@dataclass(frozen=True)
class CredentialsProvisioned(Event):
    credential_id: str


@dataclass(frozen=True)
class ProvisioningFailed(Event):
    reason: str


@dataclass(frozen=True)
class ReviewReminderDue(Event):
    #: How long before the deadline, as recorded: ``24h``.
    point: str
    deadline: datetime


@dataclass(frozen=True)
class ReviewEscalated(Event):
    deadline: datetime


@dataclass(frozen=True)
class RequestExpired(Event):
    reason: str


@dataclass(frozen=True)
class PortalEvent:
    """What the owning portal is told about its request, in order, through the outbox.

    ``sequence`` counts 1, 2, 3... per request, so a portal can drop duplicates (the
    broker delivers at least once) and put events in order. ``details`` holds what the
    event adds: the credential's public part and its secret sealed to the portal's key.
    """

    portal_id: str
    request_id: str
    sequence: int
    #: access_request.submitted, .pending_review, .approved, .rejected, .invalid, .provisioned,
    #: .provisioning_failed, .expired, or credentials.issued
    name: str
    status: str
    reason: str
    occurred_at: datetime
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class BulkDecisionSettled:
    """What the admins are told once a bulk decision is recorded, through the outbox.

    Told for a refused bulk too: whoever signed it learns that nothing was decided, and why.
    ``results`` pairs each request selected with what was done to it (a bulk item result).
    """

    bulk_id: str
    admin_id: str
    approve: bool
    #: ``ids``, or the filter: ``plan_id=gold consumer_id=acme``.
    selection: str
    #: ``applied``, ``ignored`` (nothing selected) or ``refused``.
    outcome: str
    #: Why it was ignored or refused; empty when applied.
    outcome_reason: str
    results: tuple[tuple[str, str], ...]
    occurred_at: datetime
