"""One typed context per email template. They hold no secret, by construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProductLine:
    id: str
    name: str


@dataclass(frozen=True)
class ApproveContext:
    request_id: str
    consumer_name: str
    app_id: str
    app_name: str
    plan_name: str
    products: tuple[ProductLine, ...]
    rate_limit_per_minute: int
    monthly_quota: int | None
    credential_kind: str
    #: The API key prefix or the OAuth2 client id; never the secret.
    credential_public_id: str
    #: Where the consumer finds the secret: the portal it was sealed to. Empty for a v1
    #: request, whose secret an operator reveals once (``accessflow credentials show``).
    portal_name: str = ""
    portal_url: str = ""


@dataclass(frozen=True)
class RejectContext:
    request_id: str
    consumer_name: str
    app_name: str
    plan_name: str
    products: tuple[ProductLine, ...]
    reason: str


@dataclass(frozen=True)
class ReviewContext:
    request_id: str
    consumer_id: str
    consumer_name: str
    consumer_email: str
    app_name: str
    plan_name: str
    products: tuple[ProductLine, ...]
    justification: str


@dataclass(frozen=True)
class ExpiryContext:
    """A credential's coming end (the notice), or its end (expired); to the consumer."""

    request_id: str
    consumer_name: str
    app_name: str
    plan_name: str
    credential_kind: str
    #: The API key prefix or the OAuth2 client id; never the secret.
    credential_public_id: str
    #: ``2026-12-11 09:00 UTC``
    expires_at: str
    portal_name: str = ""
    portal_url: str = ""


@dataclass(frozen=True)
class ReviewDeadlineContext:
    """A pending request's review deadline is near: a reminder to the admins, or the escalation."""

    request_id: str
    consumer_id: str
    consumer_name: str
    consumer_email: str
    app_name: str
    plan_name: str
    products: tuple[ProductLine, ...]
    justification: str
    #: ``2026-12-11 09:00 UTC``
    received_at: str
    deadline: str


@dataclass(frozen=True)
class ReviewExpiredContext:
    """No admin decided by the deadline: the request expired; to the consumer."""

    request_id: str
    consumer_name: str
    app_name: str
    plan_name: str
    products: tuple[ProductLine, ...]
    #: ``2026-12-11 09:00 UTC``
    deadline: str
    portal_name: str = ""
    portal_url: str = ""
