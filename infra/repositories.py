"""Every query accessflow runs lives here, one repository per aggregate or table."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain.model import (
    AccessRequest,
    App,
    Catalogue,
    Consumer,
    Credential,
    Decision,
    DeliveryStatus,
    Notification,
    NotificationKind,
    Plan,
    Product,
    Status,
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
