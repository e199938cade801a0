"""Orders given to accessflow, one per actor, as plain frozen dataclasses.

They are what the wire messages in ``messages`` decode into; the domain never sees JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from domain.model import CredentialOperationKind, NotificationKind, OperationTarget


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
    #: The portal the message names (contract v2); ``None`` for a v1 submission, which names none.
    portal_id: str | None = None
    #: The AMQP user that published the message, as RabbitMQ validated it; ``None`` if unknown.
    sender: str | None = None
    #: A plan change of this credential rather than a new one (contract v2).
    credential_id: str | None = None


@dataclass(frozen=True)
class Signature:
    """An admin's signature over a decision's canonical bytes (``messages/asyncapi.yaml``)."""

    key_id: str
    value: str
    #: The exact bytes the signature covers, rebuilt from the message.
    signed_bytes: bytes = field(repr=False)
    #: The deployment the signer meant; a decision signed for staging must not count in production.
    audience: str


@dataclass(frozen=True)
class DecideRequest(Command):
    decision_id: str
    request_id: str
    approve: bool
    admin_id: str
    admin_email: str
    reason: str
    decided_at: datetime
    #: ``None`` for an unsigned (v1) decision, which is refused.
    signature: Signature | None = None
    sender: str | None = None


@dataclass(frozen=True)
class IssueCredentials(Command):
    request_id: str


@dataclass(frozen=True)
class SendNotification(Command):
    request_id: str
    kind: NotificationKind
    #: Tells apart emails of one kind about one request (an expiry notice's credential, point and date).
    topic: str = ""


@dataclass(frozen=True)
class PushCredentialChange(Command):
    """Tell the gateway about one change of a credential (:class:`domain.ports.Gateway`)."""

    credential_id: str
    #: What happened: ``issued`` (the lifecycle adds ``rotated``, ``revoked``, ``suspended``...).
    change: str
    #: The credential's count of changes, 1 at issue; one push per revision, so that the gateway
    #: can keep the newest it has seen, and the webhook id derived from it stays the same on a retry.
    revision: int


@dataclass(frozen=True)
class RetryProvisioning(Command):
    """An operator's retry of a request whose provisioning failed; given on the deployment, by the CLI."""

    request_id: str
    #: Who asked: their login on the machine the CLI ran on.
    operator: str
    reason: str


@dataclass(frozen=True)
class DecideBulk(Command):
    """An admin's signed decision on many pending requests: named by id, or selected by a filter."""

    bulk_id: str
    approve: bool
    admin_id: str
    reason: str
    decided_at: datetime
    #: The requests named; empty when a filter selects them.
    request_ids: tuple[str, ...] = ()
    plan_id: str | None = None
    consumer_id: str | None = None
    #: Only requests received before this moment.
    submitted_before: datetime | None = None
    signature: Signature | None = None
    sender: str | None = None


@dataclass(frozen=True)
class OperateCredentials(Command):
    """An admin's signed operation on credentials: rotate, revoke, suspend, resume, set expiry, change plan."""

    operation_id: str
    operation: CredentialOperationKind
    target: OperationTarget
    target_id: str
    admin_id: str
    reason: str
    issued_at: datetime
    #: Rotate: how long the previous secret still verifies.
    grace: timedelta = timedelta(0)
    #: Change plan: the plan to move to.
    plan_id: str | None = None
    #: Set expiry: the new end of life; ``None`` for none.
    expires_at: datetime | None = None
    signature: Signature | None = None
    sender: str | None = None
