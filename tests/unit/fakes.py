"""Hand-written fakes of the ports in :mod:`domain.ports`, for the unit tests.

The repositories behave like a database session, not like a shared dict: what a
handler loads is a copy of the committed row, and only ``commit()`` writes it
back. Leaving the unit of work without committing discards every change and every
queued command, so a handler that forgets to commit leaves no trace at all. Tests
read committed state with the ``saved(...)`` helpers, never through the handler's
own objects.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Hashable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Protocol, Self, TypeVar

from domain.commands import Command, DecideRequest, RouteRequest, Signature
from domain.errors import AccessflowError, IssuerRefused
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
    CredentialChanged,
    CredentialOperation,
    CredentialStatus,
    Decision,
    DecisionOutcome,
    DeliveryStatus,
    Notification,
    NotificationKind,
    OperationTarget,
    Plan,
    Portal,
    Product,
    Status,
    utcnow,
)
from domain.outcomes import Outcome
from domain.ports import CredentialChange, Email, IssuedSecret, Sent
from domain.rules import RequestCounts

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

SUBMITTED_AT = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
ADMIN_EMAIL = "admin@accessflow.example"
ADMIN_EMAILS = (ADMIN_EMAIL, "second-admin@accessflow.example")
ACME_EMAIL = "dev@acme.example"
GLOBEX_EMAIL = "api@globex.example"


class DuplicateKey(Exception):
    """What a unique constraint in the real database would raise."""


class _Transactional(Protocol):
    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class _Table(Generic[K, V]):
    """Committed rows plus the copies one open transaction has loaded or added."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: dict[K, V] = {}
        self._session: dict[K, V] = {}

    def load(self, key: K) -> V | None:
        if key in self._session:
            return self._session[key]
        if key in self.rows:
            loaded = copy.deepcopy(self.rows[key])
            self._session[key] = loaded
            return loaded
        return None

    def insert(self, key: K, value: V) -> None:
        if key in self._session or key in self.rows:
            raise DuplicateKey(f"{self.name}: {key!r} already exists")
        self._session[key] = value

    def upsert(self, key: K, value: V) -> None:
        self._session[key] = value

    def commit(self) -> None:
        for key, value in self._session.items():
            self.rows[key] = copy.deepcopy(value)

    def rollback(self) -> None:
        self._session.clear()


class FakeRequestRepository:
    def __init__(self) -> None:
        self._table: _Table[str, AccessRequest] = _Table("access_requests")
        #: How many times a router counted for a throttle.
        self.throttle_counts = 0

    def add(self, request: AccessRequest) -> None:
        self._table.insert(request.id, request)

    def get(self, request_id: str, *, for_update: bool = False) -> AccessRequest | None:
        return self._table.load(request_id)

    def stuck_approved(self, *, before: datetime, limit: int) -> list[AccessRequest]:
        found = sorted(
            (r for r in self._table.rows.values() if r.status is Status.APPROVED and r.updated_at < before),
            key=lambda r: r.updated_at,
        )
        return [loaded for r in found[:limit] if (loaded := self._table.load(r.id)) is not None]

    def review_due(self, *, before: datetime, limit: int) -> list[AccessRequest]:
        found = sorted(
            (
                (r.review_deadline_at, r.id)
                for r in self._table.rows.values()
                if r.status is Status.PENDING_REVIEW
                and r.review_deadline_at is not None
                and r.review_deadline_at < before
            ),
        )
        return [loaded for _, key in found[:limit] if (loaded := self._table.load(key)) is not None]

    def counts_for_throttle(self, *, consumer_id: str, plan_id: str, since: datetime) -> RequestCounts:
        """Counted over the committed requests (one test thread: the lock has nothing to serialise)."""
        self.throttle_counts += 1
        mine = [r for r in self._table.rows.values() if r.consumer_id == consumer_id and r.plan_id == plan_id]
        opened = (Status.SUBMITTED, Status.PENDING_REVIEW, Status.APPROVED)
        return RequestCounts(
            open=sum(r.status in opened for r in mine),
            last_hour=sum(r.received_at >= since and r.status is not Status.INVALID for r in mine),
        )

    def pending_matching(
        self,
        *,
        plan_id: str | None,
        consumer_id: str | None,
        received_before: datetime | None,
        limit: int,
    ) -> list[str]:
        found = sorted(
            (r.received_at, r.id)
            for r in self._table.rows.values()
            if r.status is Status.PENDING_REVIEW
            and plan_id in (None, r.plan_id)
            and consumer_id in (None, r.consumer_id)
            and (received_before is None or r.received_at < received_before)
        )
        return [key for _, key in found[:limit]]

    def saved(self, request_id: str) -> AccessRequest | None:
        """The committed request, as a fresh transaction would see it."""
        return self._table.rows.get(request_id)

    def __len__(self) -> int:
        return len(self._table.rows)


class FakeCatalogueRepository:
    def __init__(
        self,
        *,
        products: Iterable[Product] = (),
        plans: Iterable[Plan] = (),
        consumers: Iterable[Consumer] = (),
        apps: Iterable[App] = (),
    ) -> None:
        self._products: _Table[str, Product] = _Table("products")
        self._plans: _Table[str, Plan] = _Table("plans")
        self._consumers: _Table[str, Consumer] = _Table("consumers")
        self._apps: _Table[str, App] = _Table("apps")
        for product in products:
            self._products.upsert(product.id, product)
        for plan in plans:
            self._plans.upsert(plan.id, plan)
        for consumer in consumers:
            self._consumers.upsert(consumer.id, consumer)
        for app in apps:
            self._apps.upsert(app.id, app)
        self.commit()

    def slice_for(
        self, *, plan_id: str, product_ids: Sequence[str], consumer_id: str, app_id: str | None
    ) -> Catalogue:
        return Catalogue(
            plan=self.plan(plan_id),
            products={p.id: p for p in self.products(product_ids)},
            consumer=self.consumer(consumer_id),
            app=self.app(app_id) if app_id is not None else None,
        )

    def plan(self, plan_id: str) -> Plan | None:
        return self._plans.load(plan_id)

    def products(self, product_ids: Sequence[str]) -> list[Product]:
        found = [self._products.load(p) for p in product_ids]
        return [p for p in found if p is not None]

    def consumer(self, consumer_id: str) -> Consumer | None:
        return self._consumers.load(consumer_id)

    def app(self, app_id: str) -> App | None:
        return self._apps.load(app_id)

    def add_app(self, app: App) -> None:
        self._apps.insert(app.id, app)

    def upsert(self, entity: Product | Plan | Consumer | App) -> None:
        match entity:
            case Product():
                self._products.upsert(entity.id, entity)
            case Plan():
                self._plans.upsert(entity.id, entity)
            case Consumer():
                self._consumers.upsert(entity.id, entity)
            case App():
                self._apps.upsert(entity.id, entity)

    def saved_app(self, app_id: str) -> App | None:
        return self._apps.rows.get(app_id)

    def remove_plan(self, plan_id: str) -> None:
        """An operator deleting a plan from the catalogue, outside any request's transaction."""
        del self._plans.rows[plan_id]

    def saved_apps(self) -> list[App]:
        return list(self._apps.rows.values())

    def commit(self) -> None:
        for table in self._tables():
            table.commit()

    def rollback(self) -> None:
        for table in self._tables():
            table.rollback()

    def _tables(self) -> tuple[_Transactional, ...]:
        return (self._products, self._plans, self._consumers, self._apps)


class FakeDecisionRepository:
    def __init__(self) -> None:
        self._table: _Table[str, Decision] = _Table("decisions")

    def get(self, decision_id: str) -> Decision | None:
        return self._table.load(decision_id)

    def add(self, decision: Decision) -> None:
        self._table.insert(decision.id, decision)

    def approvers_of(self, request_id: str) -> set[str]:
        return {
            d.admin_id
            for d in self._table.rows.values()
            if d.request_id == request_id and d.outcome is DecisionOutcome.COUNTED and d.approve
        }

    def saved(self, decision_id: str) -> Decision | None:
        return self._table.rows.get(decision_id)

    def saved_all(self) -> list[Decision]:
        return list(self._table.rows.values())


class FakeCredentialRepository:
    """One credential per request, as the real table's unique constraint on ``request_id`` keeps it."""

    def __init__(self) -> None:
        self._table: _Table[str, Credential] = _Table("credentials")
        #: Every change a committed transaction recorded, oldest first: the credential audit trail.
        self.trail: list[CredentialChanged] = []
        #: How many times a router asked whether a consumer holds an active credential.
        self.active_checks = 0

    def add(self, credential: Credential) -> None:
        if any(c.id == credential.id for c in self._table.rows.values()):
            raise DuplicateKey(f"credentials: id {credential.id!r} already exists")
        self._table.insert(credential.request_id, credential)

    def for_request(self, request_id: str) -> Credential | None:
        return self._table.load(request_id)

    def get(self, credential_id: str, *, for_update: bool = False) -> Credential | None:
        return next(
            (self._table.load(key) for key, c in self._rows_and_session() if c.id == credential_id), None
        )

    def holds_active(self, *, consumer_id: str, plan_id: str) -> bool:
        self.active_checks += 1
        return any(
            c.consumer_id == consumer_id and c.plan_id == plan_id and c.usable_at(utcnow())
            for _, c in self._rows_and_session()
        )

    def targets(self, target: OperationTarget, target_id: str) -> list[Credential]:
        field = {"credential": "id", "app": "app_id", "consumer": "consumer_id"}[target.value]
        keys = sorted(key for key, c in self._rows_and_session() if getattr(c, field) == target_id)
        return [loaded for key in keys if (loaded := self._table.load(key)) is not None]

    def expiring(self, *, before: datetime, limit: int) -> list[Credential]:
        live = (CredentialStatus.ACTIVE, CredentialStatus.SUSPENDED)
        keys = sorted(
            (c.expires_at, key)
            for key, c in self._table.rows.items()
            if c.status in live and c.expires_at is not None and c.expires_at < before
        )
        return [loaded for _, key in keys[:limit] if (loaded := self._table.load(key)) is not None]

    def _rows_and_session(self) -> list[tuple[str, Credential]]:
        return [
            *self._table.rows.items(),
            *((k, v) for k, v in self._table._session.items() if k not in self._table.rows),
        ]

    def saved(self, request_id: str) -> Credential | None:
        return self._table.rows.get(request_id)

    def saved_by_id(self, credential_id: str) -> Credential | None:
        return next((c for c in self._table.rows.values() if c.id == credential_id), None)

    def commit(self) -> None:
        for credential in self._table._session.values():
            self.trail.extend(credential.changes)
            credential.changes.clear()
        self._table.commit()

    def rollback(self) -> None:
        self._table.rollback()

    def __len__(self) -> int:
        return len(self._table.rows)


class FakeBulkDecisionRepository:
    def __init__(self) -> None:
        self._table: _Table[str, BulkDecision] = _Table("bulk_decisions")

    def get(self, bulk_id: str) -> BulkDecision | None:
        return self._table.load(bulk_id)

    def add(self, bulk: BulkDecision) -> None:
        self._table.insert(bulk.id, bulk)

    def saved(self, bulk_id: str) -> BulkDecision | None:
        return self._table.rows.get(bulk_id)


class FakeCredentialOperationRepository:
    def __init__(self) -> None:
        self._table: _Table[str, CredentialOperation] = _Table("credential_operations")

    def get(self, operation_id: str) -> CredentialOperation | None:
        return self._table.load(operation_id)

    def add(self, operation: CredentialOperation) -> None:
        self._table.insert(operation.id, operation)

    def saved(self, operation_id: str) -> CredentialOperation | None:
        return self._table.rows.get(operation_id)


class FakeNotificationRepository:
    """At most one notification per (request, kind, topic), with ids assigned on insert like a serial column."""

    def __init__(self) -> None:
        self._table: _Table[tuple[str, NotificationKind, str], Notification] = _Table("notifications")
        self._next_id = 1

    def get(
        self, request_id: str, kind: NotificationKind, topic: str = "", *, for_update: bool = False
    ) -> Notification | None:
        return self._table.load((request_id, kind, topic))

    def add(self, notification: Notification) -> None:
        self._table.insert((notification.request_id, notification.kind, notification.topic), notification)
        notification.id = self._next_id
        self._next_id += 1

    def stuck(self, *, before: datetime, limit: int) -> list[Notification]:
        found = [
            key
            for key, n in self._table.rows.items()
            if n.status is DeliveryStatus.SENDING and (n.lease_expires_at or n.created_at) < before
        ]
        return [loaded for key in found[:limit] if (loaded := self._table.load(key)) is not None]

    def saved(self, request_id: str, kind: NotificationKind, topic: str = "") -> Notification | None:
        return self._table.rows.get((request_id, kind, topic))

    def saved_all(self) -> list[Notification]:
        return list(self._table.rows.values())

    def __len__(self) -> int:
        return len(self._table.rows)


class FakePortalRepository:
    def __init__(self, portals: Iterable[Portal] = ()) -> None:
        self._table: _Table[str, Portal] = _Table("portals")
        for portal in portals:
            self._table.upsert(portal.id, portal)
        self._table.commit()

    def get(self, portal_id: str) -> Portal | None:
        return self._table.load(portal_id)

    def by_broker_user(self, broker_user: str) -> Portal | None:
        found = [p for p in self._table.rows.values() if p.broker_user == broker_user]
        return self._table.load(found[0].id) if found else None

    def upsert(self, portal: Portal) -> None:
        self._table.upsert(portal.id, portal)


class FakeAdminKeyRepository:
    def __init__(self, admins: Iterable[tuple[str, str]] = (), keys: Iterable[AdminKey] = ()) -> None:
        self._admins: _Table[str, str] = _Table("admins")
        self._keys: _Table[str, AdminKey] = _Table("admin_keys")
        for admin_id, email in admins:
            self._admins.upsert(admin_id, email)
        for key in keys:
            self._keys.upsert(key.key_id, key)
        self.commit()

    def key(self, key_id: str) -> AdminKey | None:
        return self._keys.load(key_id)

    def admin_email(self, admin_id: str) -> str | None:
        return self._admins.load(admin_id)

    def upsert_admin(self, admin_id: str, email: str) -> None:
        self._admins.upsert(admin_id, email)

    def add_key(self, key: AdminKey) -> None:
        existing = self._keys.load(key.key_id)
        if existing is not None and (existing.admin_id, existing.public_key) != (
            key.admin_id,
            key.public_key,
        ):
            raise ValueError(f"key id {key.key_id!r} is taken by another key")
        if existing is None:
            self._keys.insert(key.key_id, key)

    def commit(self) -> None:
        self._admins.commit()
        self._keys.commit()

    def rollback(self) -> None:
        self._admins.rollback()
        self._keys.rollback()


class FakeOutbox:
    """Records queued commands and portal events; they become ``published`` only when the transaction commits."""

    def __init__(self) -> None:
        self.pending: list[Command] = []
        self.published: list[Command] = []
        self.pending_events: list[PortalEvent] = []
        self.events: list[PortalEvent] = []
        self.pending_admin_events: list[BulkDecisionSettled] = []
        self.admin_events: list[BulkDecisionSettled] = []

    def put(self, command: Command) -> None:
        self.pending.append(command)

    def announce(self, event: PortalEvent) -> None:
        self.pending_events.append(event)

    def tell_admins(self, event: BulkDecisionSettled) -> None:
        self.pending_admin_events.append(event)

    def commit(self) -> None:
        self.published.extend(self.pending)
        self.events.extend(self.pending_events)
        self.admin_events.extend(self.pending_admin_events)
        self.rollback()

    def rollback(self) -> None:
        self.pending = []
        self.pending_events = []
        self.pending_admin_events = []


class FakeUnitOfWork:
    """An in-memory transaction: ``commit()`` keeps changes and publishes the outbox, leaving rolls back."""

    def __init__(self, catalogue: FakeCatalogueRepository | None = None) -> None:
        self.requests = FakeRequestRepository()
        self.catalogue = catalogue if catalogue is not None else build_catalogue()
        self.decisions = FakeDecisionRepository()
        self.credentials = FakeCredentialRepository()
        self.credential_operations = FakeCredentialOperationRepository()
        self.bulk_decisions = FakeBulkDecisionRepository()
        self.notifications = FakeNotificationRepository()
        self.portals = FakePortalRepository([ACME_PORTAL, GLOBEX_PORTAL])
        self.admin_keys = FakeAdminKeyRepository([(ADMIN_ID, ADMIN_EMAIL)], [ADMIN_KEY])
        self.outbox = FakeOutbox()
        #: Every outcome told, oldest first: a committed-only one once its transaction committed.
        self.outcomes: list[Outcome] = []
        self._pending_outcomes: list[Outcome] = []
        self.committed = False
        self.commits = 0
        self._in_transaction = False

    @property
    def published(self) -> list[Command]:
        """Every command a committed transaction released, oldest first."""
        return self.outbox.published

    def __enter__(self) -> Self:
        assert not self._in_transaction, "unit of work entered twice"
        self._in_transaction = True
        self.rollback()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.rollback()
        self._in_transaction = False

    def commit(self) -> None:
        assert self._in_transaction, "commit outside a with block"
        for table in self._tables():
            table.commit()
        self.outbox.commit()
        self.outcomes.extend(self._pending_outcomes)
        self._pending_outcomes = []
        self.committed = True
        self.commits += 1

    def rollback(self) -> None:
        for table in self._tables():
            table.rollback()
        self.outbox.rollback()
        self._pending_outcomes = []

    def record_outcome(self, outcome: Outcome) -> None:
        if outcome.committed_only:
            assert self._in_transaction, "an outcome about a change recorded outside its transaction"
            self._pending_outcomes.append(outcome)
        else:
            self.outcomes.append(outcome)

    @property
    def told(self) -> list[str]:
        """The names of the outcomes told, oldest first: ``["request.routed", ...]``."""
        return [outcome.name for outcome in self.outcomes]

    def _tables(self) -> tuple[_Transactional, ...]:
        return (
            self.requests._table,
            self.catalogue,
            self.decisions._table,
            self.credentials,
            self.credential_operations._table,
            self.bulk_decisions._table,
            self.notifications._table,
            self.portals._table,
            self.admin_keys,
        )


class FakeIssuer:
    """Issues predictable credentials: secrets ``secret-1``, ``secret-2``, ...; public ids ``key-1``, ..."""

    def __init__(self) -> None:
        self.issued: list[IssuedSecret] = []
        #: While set, the issuer refuses for good with this reason, as a gateway that says no.
        self.refusal: str | None = None

    def issue(self, kind: AuthMethod) -> IssuedSecret:
        if self.refusal is not None:
            raise IssuerRefused(self.refusal)
        n = len(self.issued) + 1
        prefix = "key" if kind is AuthMethod.API_KEY else "client"
        secret = f"secret-{n}"
        issued = IssuedSecret(
            public_id=f"{prefix}-{n}",
            secret=secret,
            secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
        )
        self.issued.append(issued)
        return issued

    @property
    def secrets(self) -> list[str]:
        return [i.secret for i in self.issued]


class FakeSealer:
    """Reversible and obviously fake: ``b"sealed:"`` plus the reversed secret, so no plaintext shows."""

    PREFIX = b"sealed:"

    def seal(self, secret: str) -> bytes:
        return self.PREFIX + secret.encode()[::-1]

    def unseal(self, sealed: bytes) -> str:
        assert sealed.startswith(self.PREFIX), f"not sealed by FakeSealer: {sealed!r}"
        return sealed[len(self.PREFIX) :][::-1].decode()


class FakePortalSealer:
    """Obviously fake sealing to a portal's key: the reversed secret, tagged with the key."""

    def seal_to(self, public_key: str, secret: str) -> dict[str, str]:
        return {"algorithm": "fake-box", "recipient_key": public_key, "value": secret[::-1]}


def fake_signature(public_key: str, data: bytes) -> str:
    """What :func:`fake_verify` accepts: a hash of the key and the bytes; a stand-in for Ed25519."""
    return hashlib.sha256(public_key.encode() + b"|" + data).hexdigest()


def fake_verify(public_key: str, signature: str, data: bytes) -> bool:
    return signature == fake_signature(public_key, data)


class FakeMailer:
    """Records every email it accepts; ``fail_next`` makes the next sends raise instead.

    ``refuse`` names recipients the server refuses while it takes the message for the others.
    """

    def __init__(self, *, lease: timedelta = timedelta(seconds=60)) -> None:
        self.lease = lease
        self.sent: list[Email] = []
        self.attempts = 0
        self.refuse: dict[str, str] = {}
        self._failures: list[tuple[type[AccessflowError], str]] = []

    def fail_next(self, error: type[AccessflowError], message: str = "refused", *, times: int = 1) -> None:
        self._failures.extend([(error, message)] * times)

    def send(self, email: Email) -> Sent:
        self.attempts += 1
        if self._failures:
            error, message = self._failures.pop(0)
            raise error(message)
        self.sent.append(email)
        return Sent(refused={a: reply for a, reply in self.refuse.items() if a in email.to})


class FakeGateway:
    """Records every change it takes; ``fail_next`` makes the next pushes raise instead."""

    def __init__(self) -> None:
        self.pushed: list[CredentialChange] = []
        self.attempts = 0
        self._failures: list[tuple[type[AccessflowError], str]] = []

    def fail_next(self, error: type[AccessflowError], message: str = "refused", *, times: int = 1) -> None:
        self._failures.extend([(error, message)] * times)

    def push(self, change: CredentialChange) -> None:
        self.attempts += 1
        if self._failures:
            error, message = self._failures.pop(0)
            raise error(message)
        self.pushed.append(change)


# --- the standard catalogue ----------------------------------------------------------------

PAYMENTS = Product(id="payments", name="Payments API", auth_method=AuthMethod.API_KEY)
LEDGER = Product(id="ledger", name="Ledger API", auth_method=AuthMethod.API_KEY)
IDENTITY = Product(id="identity", name="Identity API", auth_method=AuthMethod.OAUTH2_CLIENT_CREDENTIALS)
#: Auto-approved; API-key products only, so ``identity`` is "not offered" under it.
FREE = Plan(
    id="free",
    name="Free",
    auto_approve=True,
    rate_limit_per_minute=60,
    monthly_quota=10_000,
    product_ids=["payments", "ledger"],
)
#: Needs an admin; offers everything, so mixing auth methods is possible to ask for.
PARTNER = Plan(
    id="partner",
    name="Partner",
    auto_approve=False,
    rate_limit_per_minute=600,
    monthly_quota=None,
    product_ids=["payments", "ledger", "identity"],
)
ACME = Consumer(id="acme", email=ACME_EMAIL, name="Acme Developers")
GLOBEX = Consumer(id="globex", email=GLOBEX_EMAIL, name="Globex API Team")
ACME_WEB = App(id="acme-web", consumer_id="acme", name="Acme Web", description="The Acme web shop.")
GLOBEX_APP = App(id="globex-app", consumer_id="globex", name="Globex App")
ACME_PORTAL = Portal(
    id="acme-portal",
    name="Acme Portal",
    broker_user="portal-acme",
    public_key="acme-portal-public-key",
    consumer_ids=frozenset({"acme"}),
    url="https://portal.acme.example",
)
GLOBEX_PORTAL = Portal(
    id="globex-portal",
    name="Globex Portal",
    broker_user="portal-globex",
    public_key="globex-portal-public-key",
    consumer_ids=frozenset({"globex"}),
)
ADMIN_ID = "admin"
ADMIN_KEY = AdminKey(
    key_id="admin-key-1", admin_id=ADMIN_ID, public_key="admin-public-key-1", created_at=SUBMITTED_AT
)
#: The deployment decisions are signed for in the unit tests.
AUDIENCE = "accessflow"


def build_catalogue() -> FakeCatalogueRepository:
    """Products payments/ledger (api_key) and identity (oauth2), plans free (auto) and partner (manual),
    consumers acme and globex, apps acme-web (acme's) and globex-app (globex's)."""
    return FakeCatalogueRepository(
        products=copy.deepcopy([PAYMENTS, LEDGER, IDENTITY]),
        plans=copy.deepcopy([FREE, PARTNER]),
        consumers=copy.deepcopy([ACME, GLOBEX]),
        apps=copy.deepcopy([ACME_WEB, GLOBEX_APP]),
    )


def build_catalogue_slice(
    *,
    plan_id: str = "free",
    product_ids: Sequence[str] = ("payments",),
    consumer_id: str = "acme",
    app_id: str | None = "acme-web",
) -> Catalogue:
    """The :class:`Catalogue` the router would load for such a request, from the standard catalogue."""
    return build_catalogue().slice_for(
        plan_id=plan_id, product_ids=product_ids, consumer_id=consumer_id, app_id=app_id
    )


# --- commands --------------------------------------------------------------------------------


def make_route_request(
    *,
    request_id: str | None = None,
    consumer_id: str = "acme",
    consumer_email: str = ACME_EMAIL,
    consumer_name: str = "Acme Developers",
    plan_id: str = "free",
    product_ids: Sequence[str] = ("payments",),
    app_id: str | None = "acme-web",
    new_app_name: str | None = None,
    new_app_description: str | None = None,
    justification: str | None = None,
    submitted_at: datetime = SUBMITTED_AT,
    portal_id: str | None = "acme-portal",
    sender: str | None = "portal-acme",
    credential_id: str | None = None,
) -> RouteRequest:
    """A portal submission (by Acme's portal, as its AMQP user); a fresh random request id unless given."""
    return RouteRequest(
        request_id=request_id or str(uuid.uuid4()),
        consumer_id=consumer_id,
        consumer_email=consumer_email,
        consumer_name=consumer_name,
        plan_id=plan_id,
        product_ids=tuple(product_ids),
        app_id=app_id,
        new_app_name=new_app_name,
        new_app_description=new_app_description,
        justification=justification,
        submitted_at=submitted_at,
        portal_id=portal_id,
        sender=sender,
        credential_id=credential_id,
    )


def make_decision(
    request_id: str,
    *,
    approve: bool = True,
    decision_id: str | None = None,
    admin_email: str = "",
    admin_id: str = ADMIN_ID,
    reason: str = "looks fine",
    decided_at: datetime | None = None,
    key: AdminKey | None = ADMIN_KEY,
    audience: str = AUDIENCE,
    sender: str | None = None,
) -> DecideRequest:
    """An admin's decision, signed (with :func:`fake_signature`) by ``key``, unless ``key`` is None.

    A fresh random decision id unless one is given; decided now unless told when.
    """
    decision_id = decision_id or str(uuid.uuid4())
    decided_at = decided_at or utcnow()
    signed_bytes = "|".join(
        [decision_id, request_id, str(approve), admin_id, reason, decided_at.isoformat(), audience]
    ).encode()
    signature = (
        None
        if key is None
        else Signature(
            key_id=key.key_id,
            value=fake_signature(key.public_key, signed_bytes),
            signed_bytes=signed_bytes,
            audience=audience,
        )
    )
    return DecideRequest(
        decision_id=decision_id,
        request_id=request_id,
        approve=approve,
        admin_id=admin_id,
        admin_email=admin_email,
        reason=reason,
        decided_at=decided_at,
        signature=signature,
        sender=sender,
    )


if TYPE_CHECKING:
    from domain import ports

    _uow: ports.UnitOfWork = FakeUnitOfWork()
    _requests: ports.RequestRepository = FakeRequestRepository()
    _catalogue: ports.CatalogueRepository = FakeCatalogueRepository()
    _decisions: ports.DecisionRepository = FakeDecisionRepository()
    _credentials: ports.CredentialRepository = FakeCredentialRepository()
    _notifications: ports.NotificationRepository = FakeNotificationRepository()
    _outbox: ports.Outbox = FakeOutbox()
    _portals: ports.PortalRepository = FakePortalRepository()
    _admin_keys: ports.AdminKeyRepository = FakeAdminKeyRepository()
    _verify: ports.SignatureVerifier = fake_verify
    _portal_sealer: ports.PortalSealer = FakePortalSealer()
    _issuer: ports.CredentialIssuer = FakeIssuer()
    _sealer: ports.SecretSealer = FakeSealer()
    _mailer: ports.Mailer = FakeMailer()
    _gateway: ports.Gateway = FakeGateway()
