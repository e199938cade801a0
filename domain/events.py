"""What happened to an access request, recorded by the aggregate, handled after commit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    request_id: str


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
