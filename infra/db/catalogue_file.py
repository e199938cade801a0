"""The catalogue file that ``accessflow catalog load`` reads (YAML or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from domain.model import AdminKey, App, AuthMethod, Consumer, Plan, Portal, Product, utcnow
from domain.ports import UnitOfWork
from domain.rules import InvalidRule, Rule, parse_rules
from infra.credentials import signing
from infra.credentials.sealing import portal_public_key
from infra.messaging.topology import check_portal_id
from messages.v1 import Email, Identifier, Name, Text


class Entry(BaseModel):
    """One entry of the file; the CLI's ``portals add`` and ``admins`` commands validate with these too."""

    model_config = ConfigDict(extra="forbid")


def _ed25519_public_key(text: str) -> str:
    return signing.public_key_text(signing.parse_public_key(text))


class ProductEntry(Entry):
    id: Identifier
    name: Name
    auth_method: AuthMethod


class PlanEntry(Entry):
    id: Identifier
    name: Name
    auto_approve: bool
    rate_limit_per_minute: int = Field(gt=0)
    monthly_quota: int | None = Field(None, gt=0)
    products: list[Identifier] = Field(min_length=1)
    #: Days each credential issued under the plan lives; none: for ever.
    credential_lifetime_days: int | None = Field(None, gt=0, le=36_500)
    #: Hours a request parked for review waits for a decision before it expires; none: the
    #: deployment's ACCESSFLOW_REVIEW_DEADLINE_HOURS.
    review_deadline_hours: float | None = Field(None, gt=0, le=87_600)
    #: Approval rules, evaluated in order, first match decides (README, "Approval rules").
    rules: list[dict[str, Any]] = []
    #: Throttles per consumer on this plan; none: no limit.
    max_open_requests_per_consumer: int | None = Field(None, gt=0, le=100_000)
    max_requests_per_consumer_per_hour: int | None = Field(None, gt=0, le=100_000)

    @model_validator(mode="after")
    def _rules_are_valid(self) -> PlanEntry:
        try:
            parse_rules(self.rules)
        except InvalidRule as error:
            raise ValueError(f"plan {self.id!r}: {error}") from None
        return self

    def parsed_rules(self) -> list[Rule]:
        return parse_rules(self.rules)


class ConsumerEntry(Entry):
    id: Identifier
    email: Email
    name: Name
    #: This consumer's own throttles, in place of each plan's; none: the plan's.
    max_open_requests: int | None = Field(None, gt=0, le=100_000)
    max_requests_per_hour: int | None = Field(None, gt=0, le=100_000)


class AppEntry(Entry):
    id: Identifier
    consumer: Identifier
    name: Name
    description: Text = ""


class PortalEntry(Entry):
    #: A word of the routing keys and a part of the queue names: checked as the broker's topology wants it.
    id: Annotated[Identifier, AfterValidator(check_portal_id)]
    name: Name
    #: The AMQP user it publishes as; RabbitMQ stamps it on each message as the validated user_id.
    broker_user: Identifier
    #: X25519, base64: credential secrets are sealed to it.
    public_key: Annotated[str, AfterValidator(portal_public_key)]
    url: Annotated[str, Field(max_length=500, pattern=r"^(https?://[^\s<>\"]*)?$")] = ""
    consumers: list[Identifier] = []

    def to_portal(self) -> Portal:
        return Portal(
            id=self.id,
            name=self.name,
            broker_user=self.broker_user,
            public_key=self.public_key,
            consumer_ids=frozenset(self.consumers),
            url=self.url,
        )


class AdminKeyEntry(Entry):
    key_id: Identifier
    #: Ed25519: ``ed25519:<base64>`` or a PEM public key.
    public_key: Annotated[str, AfterValidator(_ed25519_public_key)]


class AdminEntry(Entry):
    id: Identifier
    email: Email
    keys: list[AdminKeyEntry] = []


class CatalogueFile(Entry):
    products: list[ProductEntry] = []
    plans: list[PlanEntry] = []
    consumers: list[ConsumerEntry] = []
    apps: list[AppEntry] = []
    portals: list[PortalEntry] = []
    admins: list[AdminEntry] = []

    @model_validator(mode="after")
    def _references_resolve(self) -> CatalogueFile:
        product_ids = {p.id for p in self.products}
        consumer_ids = {c.id for c in self.consumers}
        for plan in self.plans:
            unknown = sorted(set(plan.products) - product_ids)
            if unknown:
                raise ValueError(f"plan {plan.id!r} offers products not in this file: {', '.join(unknown)}")
        for app in self.apps:
            if app.consumer not in consumer_ids:
                raise ValueError(
                    f"app {app.id!r} belongs to consumer {app.consumer!r}, who is not in this file"
                )
        for portal in self.portals:
            unknown = sorted(set(portal.consumers) - consumer_ids)
            if unknown:
                raise ValueError(
                    f"portal {portal.id!r} speaks for consumers not in this file: {', '.join(unknown)}"
                )
        return self


class CatalogueFileError(ValueError):
    """The file cannot be read or does not describe a valid catalogue."""


def read(path: Path) -> CatalogueFile:
    try:
        text = path.read_text()
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return CatalogueFile.model_validate(data)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise CatalogueFileError(f"cannot read {path}: {error}") from None
    except ValidationError as error:
        raise CatalogueFileError(f"{path} is not a valid catalogue:\n{error}") from None


def load(catalogue: CatalogueFile, uow: UnitOfWork) -> dict[str, int]:
    """Insert or update every entry in one transaction. Returns counts per kind."""
    with uow:
        for p in catalogue.products:
            uow.catalogue.upsert(Product(id=p.id, name=p.name, auth_method=p.auth_method))
        for c in catalogue.consumers:
            uow.catalogue.upsert(
                Consumer(
                    id=c.id,
                    email=str(c.email),
                    name=c.name,
                    max_open_requests=c.max_open_requests,
                    max_requests_per_hour=c.max_requests_per_hour,
                )
            )
        for plan in catalogue.plans:
            uow.catalogue.upsert(
                Plan(
                    id=plan.id,
                    name=plan.name,
                    auto_approve=plan.auto_approve,
                    rate_limit_per_minute=plan.rate_limit_per_minute,
                    monthly_quota=plan.monthly_quota,
                    product_ids=list(plan.products),
                    credential_lifetime_days=plan.credential_lifetime_days,
                    review_deadline_hours=plan.review_deadline_hours,
                    rules=plan.parsed_rules(),
                    max_open_requests_per_consumer=plan.max_open_requests_per_consumer,
                    max_requests_per_consumer_per_hour=plan.max_requests_per_consumer_per_hour,
                )
            )
        for a in catalogue.apps:
            uow.catalogue.upsert(App(id=a.id, consumer_id=a.consumer, name=a.name, description=a.description))
        for portal in catalogue.portals:
            uow.portals.upsert(portal.to_portal())
        for admin in catalogue.admins:
            uow.admin_keys.upsert_admin(admin.id, str(admin.email))
            for key in admin.keys:
                uow.admin_keys.add_key(AdminKey(key.key_id, admin.id, key.public_key, utcnow()))
        uow.commit()
    return {
        "products": len(catalogue.products),
        "plans": len(catalogue.plans),
        "consumers": len(catalogue.consumers),
        "apps": len(catalogue.apps),
        "portals": len(catalogue.portals),
        "admins": len(catalogue.admins),
    }
