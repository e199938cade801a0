"""The ports the handlers need; ``infra`` implements them, ``tests/unit/fakes.py`` fakes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Protocol, Self

from domain.commands import Command
from domain.events import BulkDecisionSettled, PortalEvent
from domain.model import (
    AccessRequest,
    AdminKey,
    App,
    AuthMethod,
    BulkDecision,
    Catalogue,
    Consumer,
    Credential,
    CredentialOperation,
    Decision,
    Notification,
    NotificationKind,
    OperationTarget,
    Plan,
    Portal,
    Product,
)
from domain.outcomes import Outcome
from domain.rules import RequestCounts


class RequestRepository(Protocol):
    def add(self, request: AccessRequest) -> None: ...

    def get(self, request_id: str, *, for_update: bool = False) -> AccessRequest | None: ...

    def stuck_approved(self, *, before: datetime, limit: int) -> list[AccessRequest]:
        """Up to ``limit`` requests still ``approved`` whose last change (or re-drive) was before
        ``before``; held for this transaction, and skipped by any other that asks."""
        ...

    def review_due(self, *, before: datetime, limit: int) -> list[AccessRequest]:
        """Up to ``limit`` requests pending review whose deadline is before ``before``, soonest first;
        held for this transaction, and skipped by any other that asks."""
        ...

    def counts_for_throttle(self, *, consumer_id: str, plan_id: str, since: datetime) -> RequestCounts:
        """The consumer's open requests on the plan and those received since ``since`` (not invalid),
        counted after taking a lock per consumer that is held until the transaction ends."""
        ...

    def pending_matching(
        self,
        *,
        plan_id: str | None,
        consumer_id: str | None,
        received_before: datetime | None,
        limit: int,
    ) -> list[str]:
        """The ids of up to ``limit`` requests pending review that match every filter given, oldest first."""
        ...


class CatalogueRepository(Protocol):
    def slice_for(
        self, *, plan_id: str, product_ids: Sequence[str], consumer_id: str, app_id: str | None
    ) -> Catalogue: ...

    def plan(self, plan_id: str) -> Plan | None: ...

    def products(self, product_ids: Sequence[str]) -> list[Product]: ...

    def consumer(self, consumer_id: str) -> Consumer | None: ...

    def app(self, app_id: str) -> App | None: ...

    def add_app(self, app: App) -> None: ...

    def upsert(self, entity: Product | Plan | Consumer | App) -> None: ...


class DecisionRepository(Protocol):
    def get(self, decision_id: str) -> Decision | None: ...

    def approvers_of(self, request_id: str) -> set[str]:
        """The admins whose approvals of the request were counted (outcome ``counted``)."""
        ...

    def add(self, decision: Decision) -> None: ...


class CredentialRepository(Protocol):
    def add(self, credential: Credential) -> None: ...

    def for_request(self, request_id: str) -> Credential | None: ...

    def get(self, credential_id: str, *, for_update: bool = False) -> Credential | None: ...

    def holds_active(self, *, consumer_id: str, plan_id: str) -> bool:
        """Whether the consumer holds an active, unexpired credential on the plan."""
        ...

    def targets(self, target: OperationTarget, target_id: str) -> list[Credential]:
        """The credentials an operation names (one, an app's, a consumer's), locked for this transaction."""
        ...

    def expiring(self, *, before: datetime, limit: int) -> list[Credential]:
        """Up to ``limit`` live credentials that expire before ``before``, soonest first; held for this
        transaction, and skipped by any other that asks."""
        ...


class BulkDecisionRepository(Protocol):
    def get(self, bulk_id: str) -> BulkDecision | None: ...

    def add(self, bulk: BulkDecision) -> None: ...


class CredentialOperationRepository(Protocol):
    def get(self, operation_id: str) -> CredentialOperation | None: ...

    def add(self, operation: CredentialOperation) -> None: ...


class NotificationRepository(Protocol):
    def get(
        self, request_id: str, kind: NotificationKind, topic: str = "", *, for_update: bool = False
    ) -> Notification | None: ...

    def add(self, notification: Notification) -> None: ...

    def stuck(self, *, before: datetime, limit: int) -> list[Notification]:
        """Up to ``limit`` emails still ``sending`` whose lease ran out (or, never leased, that were
        created) before ``before``; held for this transaction, and skipped by any other that asks."""
        ...


class PortalRepository(Protocol):
    def get(self, portal_id: str) -> Portal | None: ...

    def by_broker_user(self, broker_user: str) -> Portal | None: ...

    def upsert(self, portal: Portal) -> None: ...


class AdminKeyRepository(Protocol):
    def key(self, key_id: str) -> AdminKey | None: ...

    def admin_email(self, admin_id: str) -> str | None: ...

    def upsert_admin(self, admin_id: str, email: str) -> None: ...

    def add_key(self, key: AdminKey) -> None:
        """Register a key; the same key again changes nothing, another key under its id raises ValueError."""
        ...


class Outbox(Protocol):
    def put(self, command: Command) -> None:
        """Queue a command to be published once, and only once, the transaction commits."""
        ...

    def announce(self, event: PortalEvent) -> None:
        """Queue an event for its portal, published once the transaction commits."""
        ...

    def tell_admins(self, event: BulkDecisionSettled) -> None:
        """Queue an event for the admins' tools, published once the transaction commits."""
        ...


class UnitOfWork(Protocol):
    """One transaction. Leaving the ``with`` block without ``commit()`` rolls everything back."""

    # Read-only properties, so that an implementation may hold more specific repositories.
    @property
    def requests(self) -> RequestRepository: ...

    @property
    def catalogue(self) -> CatalogueRepository: ...

    @property
    def decisions(self) -> DecisionRepository: ...

    @property
    def credentials(self) -> CredentialRepository: ...

    @property
    def credential_operations(self) -> CredentialOperationRepository: ...

    @property
    def bulk_decisions(self) -> BulkDecisionRepository: ...

    @property
    def notifications(self) -> NotificationRepository: ...

    @property
    def portals(self) -> PortalRepository: ...

    @property
    def admin_keys(self) -> AdminKeyRepository: ...

    @property
    def outbox(self) -> Outbox: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def record_outcome(self, outcome: Outcome) -> None:
        """Report what the handler did (:mod:`domain.outcomes`).

        One that is ``committed_only`` is told when this transaction commits, and dropped if
        it rolls back; any other is told at once, inside a transaction or not. The unit of
        work reports them, rather than a port of their own, because only it knows whether,
        and when, the change an outcome speaks of committed; and every handler has it already.
        """
        ...


@dataclass(frozen=True)
class IssuedSecret:
    """A freshly generated credential secret. ``secret`` must never be logged or stored as is."""

    public_id: str
    secret: str = field(repr=False)
    secret_hash: str


class CredentialIssuer(Protocol):
    """Makes credentials. A gateway or identity-provider adapter implements this port too.

    Raises :class:`~domain.errors.IssuerRefused` when it refuses for good, and
    :class:`~domain.errors.TransientError` when a later attempt may succeed.
    """

    def issue(self, kind: AuthMethod) -> IssuedSecret: ...


class SecretSealer(Protocol):
    """Encrypts a secret at rest until its single reveal."""

    def seal(self, secret: str) -> bytes: ...

    def unseal(self, sealed: bytes) -> str: ...


class SignatureVerifier(Protocol):
    """Checks an Ed25519 signature with a public key; never raises on hostile input."""

    def __call__(self, public_key: str, signature: str, data: bytes) -> bool: ...


class PortalSealer(Protocol):
    """Encrypts a secret to a portal's public key, so only that portal can read it."""

    def seal_to(self, public_key: str, secret: str) -> Mapping[str, str]:
        """The sealed secret as the event carries it: algorithm, recipient key and value."""
        ...


@dataclass(frozen=True)
class Email:
    """An email to send: the template kind, its recipients and a typed context."""

    kind: NotificationKind
    to: tuple[str, ...]
    #: Stable RFC 5322 Message-ID, derived from the request and the kind, so duplicates are recognisable.
    message_id: str
    context: object


@dataclass(frozen=True)
class Sent:
    """What the server did with an :class:`Email` it took: for whom it refused it, if anyone."""

    #: Each recipient the server refused while it took the message for the others, with its reply
    #: (``"550 5.1.1 no such user"``). Empty when every recipient was taken.
    refused: Mapping[str, str] = field(default_factory=dict)


class Mailer(Protocol):
    """Renders and delivers an :class:`Email`, within a bounded time.

    Returns:
      What was sent; a refusal of some recipients, but not all, is not an error.

    Raises:
      TransientError: the server may accept it later (4xx, dropped connection, the send's deadline).
      PermanentDeliveryError: the server refused it for good (5xx), or every recipient.
    """

    @property
    def lease(self) -> timedelta:
        """How long a worker holds an email it sends before another may take it over.

        Part of the email settings (``ACCESSFLOW_EMAIL_LEASE_SECONDS``), longer than the
        longest one send may take, so that no send outlives its lease.
        """
        ...

    def send(self, email: Email) -> Sent: ...


@dataclass(frozen=True)
class CredentialChange:
    """One change of a credential, as a gateway needs it to let the credential's calls through.

    It carries the credential's state when it is pushed, and never its secret: ``secret_hash``
    (``sha256:<hex>``) lets the gateway check a presented key itself.
    """

    #: Derived from the credential's id and ``revision``: the same on every retry of one push, so
    #: the gateway can drop a repeat (the Standard Webhooks ``webhook-id``).
    event_id: str
    #: ``issued``, ``rotated``, ``revoked``, ``suspended``, ``resumed``, ``expiry_set``, ``expiring``,
    #: ``expired`` or ``plan_changed`` (:class:`~domain.model.CredentialChangeKind`).
    change: str
    #: Increases with each change of the credential: a gateway keeps the highest it has seen.
    revision: int
    occurred_at: datetime
    credential_id: str
    #: The API key's lookup prefix, or the OAuth2 client id.
    public_id: str
    app_id: str
    consumer_id: str
    #: ``api_key`` or ``oauth2_client_credentials``.
    kind: str
    #: ``active``, ``suspended``, ``revoked`` or ``expired``: a gateway lets only ``active`` through.
    status: str
    product_ids: tuple[str, ...]
    rate_limit_per_minute: int
    #: Requests per calendar month; ``None`` is unlimited.
    monthly_quota: int | None
    secret_hash: str = field(repr=False)
    expires_at: datetime | None = None
    plan_id: str = ""
    #: After a rotation with a grace period: the previous secret's public id and hash, which verify
    #: until ``previous_valid_until``; ``None`` otherwise.
    previous_public_id: str | None = None
    previous_secret_hash: str | None = field(default=None, repr=False)
    previous_valid_until: datetime | None = None


class Gateway(Protocol):
    """Where credential changes are pushed, so that an API gateway enforces them.

    Raises:
      TransientError: a later attempt may succeed (a timeout, a refused connection, 5xx, 408, 429).
      PermanentDeliveryError: the gateway refused the change for good (any other 4xx); the
        message is dead-lettered at once, with the reason.
    """

    def push(self, change: CredentialChange) -> None: ...
