"""Every query accessflow runs lives here, one repository per aggregate or table."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.model import (
    AccessRequest,
    AdminKey,
    App,
    Catalogue,
    Consumer,
    Credential,
    Decision,
    DeliveryStatus,
    Notification,
    NotificationKind,
    Plan,
    Portal,
    Product,
    Status,
    utcnow,
)
from infra import orm


class SqlRequestRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, request: AccessRequest) -> None:
        self.session.add(request)

    def get(self, request_id: str, *, for_update: bool = False) -> AccessRequest | None:
        query = sa.select(AccessRequest).where(orm.access_requests.c.id == request_id)
        if for_update:
            query = query.with_for_update()
        return self.session.scalars(query).one_or_none()

    def list(self, *, status: Status | None = None, limit: int = 100) -> list[AccessRequest]:
        query = sa.select(AccessRequest).order_by(orm.access_requests.c.received_at.desc()).limit(limit)
        if status is not None:
            query = query.where(orm.access_requests.c.status == status)
        return list(self.session.scalars(query))

    def count_by_status(self) -> dict[str, int]:
        rows = self.session.execute(
            sa.select(orm.access_requests.c.status, sa.func.count()).group_by(orm.access_requests.c.status)
        )
        return {Status(status).value: count for status, count in rows}


class SqlCatalogueRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

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
        return self.session.get(Plan, plan_id)

    def products(self, product_ids: Sequence[str]) -> list[Product]:
        found = {
            p.id: p
            for p in self.session.scalars(sa.select(Product).where(orm.products.c.id.in_(product_ids)))
        }
        return [found[p] for p in product_ids if p in found]

    def consumer(self, consumer_id: str) -> Consumer | None:
        return self.session.get(Consumer, consumer_id)

    def app(self, app_id: str) -> App | None:
        return self.session.get(App, app_id)

    def apps_of(self, consumer_id: str) -> list[App]:
        return list(self.session.scalars(sa.select(App).where(orm.apps.c.consumer_id == consumer_id)))

    def add_app(self, app: App) -> None:
        self.session.add(app)

    def upsert(self, entity: Product | Plan | Consumer | App) -> None:
        self.session.merge(entity)
        self.session.flush()


class SqlDecisionRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, decision_id: str) -> Decision | None:
        return self.session.get(Decision, decision_id)

    def add(self, decision: Decision) -> None:
        self.session.add(decision)

    def for_request(self, request_id: str) -> list[Decision]:
        query = sa.select(Decision).where(orm.decisions.c.request_id == request_id)
        return list(self.session.scalars(query.order_by(orm.decisions.c.received_at)))


class SqlCredentialRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, credential: Credential) -> None:
        self.session.add(credential)

    def for_request(self, request_id: str) -> Credential | None:
        query = sa.select(Credential).where(orm.credentials.c.request_id == request_id)
        return self.session.scalars(query).one_or_none()

    def for_app(self, app_id: str, *, for_update: bool = False) -> list[Credential]:
        query = (
            sa.select(Credential)
            .where(orm.credentials.c.app_id == app_id)
            .order_by(orm.credentials.c.created_at)
        )
        if for_update:
            query = query.with_for_update()
        return list(self.session.scalars(query))

    def by_public_id(self, public_id: str) -> Credential | None:
        query = sa.select(Credential).where(orm.credentials.c.public_id == public_id)
        return self.session.scalars(query).one_or_none()


class SqlNotificationRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(
        self, request_id: str, kind: NotificationKind, *, for_update: bool = False
    ) -> Notification | None:
        query = sa.select(Notification).where(
            orm.notifications.c.request_id == request_id, orm.notifications.c.kind == kind
        )
        if for_update:
            query = query.with_for_update()
        return self.session.scalars(query).one_or_none()

    def add(self, notification: Notification) -> None:
        self.session.add(notification)

    def recent(self, *, status: DeliveryStatus | None = None, limit: int = 100) -> list[Notification]:
        query = sa.select(Notification).order_by(orm.notifications.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(orm.notifications.c.status == status)
        return list(self.session.scalars(query))

    def for_request(self, request_id: str) -> list[Notification]:
        query = sa.select(Notification).where(orm.notifications.c.request_id == request_id)
        return list(self.session.scalars(query.order_by(orm.notifications.c.id)))


class SqlPortalRepository:
    """Registered portals, with the consumers each may speak for."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, portal_id: str) -> Portal | None:
        return self._one(orm.portals.c.id == portal_id)

    def by_broker_user(self, broker_user: str) -> Portal | None:
        return self._one(orm.portals.c.broker_user == broker_user)

    def list(self) -> list[Portal]:
        ids = self.session.scalars(sa.select(orm.portals.c.id).order_by(orm.portals.c.id))
        return [portal for portal_id in ids if (portal := self.get(portal_id)) is not None]

    def _one(self, where: sa.ColumnElement[bool]) -> Portal | None:
        row = self.session.execute(sa.select(orm.portals).where(where)).first()
        if row is None:
            return None
        consumer_ids = self.session.scalars(
            sa.select(orm.portal_consumers.c.consumer_id).where(orm.portal_consumers.c.portal_id == row.id)
        )
        return Portal(
            id=row.id,
            name=row.name,
            broker_user=row.broker_user,
            public_key=row.public_key,
            consumer_ids=frozenset(consumer_ids),
            url=row.url,
        )

    def upsert(self, portal: Portal) -> None:
        """Register a portal, or replace what is registered for it, consumers included."""
        values = {
            "name": portal.name,
            "broker_user": portal.broker_user,
            "public_key": portal.public_key,
            "url": portal.url,
        }
        if self._exists(portal.id):
            self.session.execute(orm.portals.update().where(orm.portals.c.id == portal.id).values(**values))
        else:
            self.session.execute(orm.portals.insert().values(id=portal.id, **values))
        self.session.execute(
            orm.portal_consumers.delete().where(orm.portal_consumers.c.portal_id == portal.id)
        )
        if portal.consumer_ids:
            self.session.execute(
                orm.portal_consumers.insert(),
                [{"portal_id": portal.id, "consumer_id": c} for c in sorted(portal.consumer_ids)],
            )

    def _exists(self, portal_id: str) -> bool:
        found = self.session.execute(sa.select(orm.portals.c.id).where(orm.portals.c.id == portal_id))
        return found.first() is not None


class SqlAdminKeyRepository:
    """Admins and the public keys their decisions are verified with."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def key(self, key_id: str) -> AdminKey | None:
        row = self.session.execute(sa.select(orm.admin_keys).where(orm.admin_keys.c.key_id == key_id)).first()
        if row is None:
            return None
        return AdminKey(
            key_id=row.key_id,
            admin_id=row.admin_id,
            public_key=row.public_key,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )

    def admin_email(self, admin_id: str) -> str | None:
        query = sa.select(orm.admins.c.email).where(orm.admins.c.id == admin_id)
        return self.session.execute(query).scalar_one_or_none()

    def admins(self) -> list[tuple[str, str, list[AdminKey]]]:
        """Every admin with their keys, revoked ones included: (id, email, keys)."""
        keys: dict[str, list[AdminKey]] = {}
        for row in self.session.execute(sa.select(orm.admin_keys).order_by(orm.admin_keys.c.created_at)):
            keys.setdefault(row.admin_id, []).append(
                AdminKey(row.key_id, row.admin_id, row.public_key, row.created_at, row.revoked_at)
            )
        rows = self.session.execute(sa.select(orm.admins).order_by(orm.admins.c.id))
        return [(row.id, row.email, keys.get(row.id, [])) for row in rows]

    def upsert_admin(self, admin_id: str, email: str) -> None:
        if self.admin_email(admin_id) is None:
            self.session.execute(orm.admins.insert().values(id=admin_id, email=email))
        else:
            self.session.execute(orm.admins.update().where(orm.admins.c.id == admin_id).values(email=email))

    def add_key(self, key: AdminKey) -> None:
        """Register a key; adding the same key again changes nothing, another key under its id is refused."""
        existing = self.key(key.key_id)
        if existing is None:
            self.session.execute(
                orm.admin_keys.insert().values(
                    key_id=key.key_id,
                    admin_id=key.admin_id,
                    public_key=key.public_key,
                    created_at=key.created_at,
                    revoked_at=key.revoked_at,
                )
            )
        elif (existing.admin_id, existing.public_key) != (key.admin_id, key.public_key):
            raise ValueError(f"key id {key.key_id!r} is taken by another key")

    def revoke(self, key_id: str) -> bool:
        """Revoke a key for good (revoking it again changes nothing); return False if there is no such key."""
        if self.key(key_id) is None:
            return False
        self.session.execute(
            orm.admin_keys.update()
            .where(orm.admin_keys.c.key_id == key_id, orm.admin_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return True
