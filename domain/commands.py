"""Orders given to accessflow, one per actor, as plain frozen dataclasses.

They are what the wire messages in ``messages`` decode into; the domain never sees JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from domain.model import NotificationKind


@dataclass(frozen=True)
class Command:
    pass


@dataclass(frozen=True)
class RouteRequest(Command):
    request_id: str
    consumer_id: str
    consumer_email: str
    consumer_name: str
    plan_id: str
    product_ids: tuple[str, ...]
    app_id: str | None
    new_app_name: str | None
    new_app_description: str | None
    justification: str | None
    submitted_at: datetime


@dataclass(frozen=True)
class DecideRequest(Command):
    decision_id: str
    request_id: str
    approve: bool
    admin_id: str
    admin_email: str
    reason: str
    decided_at: datetime


@dataclass(frozen=True)
class IssueCredentials(Command):
    request_id: str


@dataclass(frozen=True)
class SendNotification(Command):
    request_id: str
    kind: NotificationKind
