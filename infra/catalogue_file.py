"""The catalogue file that ``accessflow catalog load`` reads (YAML or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from domain.model import App, AuthMethod, Consumer, Plan, Product
from domain.ports import UnitOfWork
from messages.v1 import Email, Identifier, Name, Text


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProductEntry(_Entry):
    id: Identifier
    name: Name
    auth_method: AuthMethod


class PlanEntry(_Entry):
    id: Identifier
    name: Name
    auto_approve: bool
    rate_limit_per_minute: int = Field(gt=0)
    monthly_quota: int | None = Field(None, gt=0)
    products: list[Identifier] = Field(min_length=1)


class ConsumerEntry(_Entry):
    id: Identifier
    email: Email
    name: Name


class AppEntry(_Entry):
    id: Identifier
    consumer: Identifier
    name: Name
    description: Text = ""


class CatalogueFile(_Entry):
    products: list[ProductEntry] = []
    plans: list[PlanEntry] = []
    consumers: list[ConsumerEntry] = []
    apps: list[AppEntry] = []

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
            uow.catalogue.upsert(Consumer(id=c.id, email=str(c.email), name=c.name))
        for plan in catalogue.plans:
            uow.catalogue.upsert(
                Plan(
                    id=plan.id,
                    name=plan.name,
                    auto_approve=plan.auto_approve,
                    rate_limit_per_minute=plan.rate_limit_per_minute,
                    monthly_quota=plan.monthly_quota,
                    product_ids=list(plan.products),
                )
            )
        for a in catalogue.apps:
            uow.catalogue.upsert(App(id=a.id, consumer_id=a.consumer, name=a.name, description=a.description))
        uow.commit()
    return {
        "products": len(catalogue.products),
        "plans": len(catalogue.plans),
        "consumers": len(catalogue.consumers),
        "apps": len(catalogue.apps),
    }
