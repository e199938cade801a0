"""What every command group shares: settings, services, JSON output and validation errors."""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from pydantic import ValidationError

from domain.errors import AccessflowError
from infra.bootstrap import Services, build
from infra.db import catalogue_file
from infra.settings import Settings
from messages.routes import ROUTES
from messages.validation import explain

QUEUE_CHOICES = [route.queue for route in ROUTES]


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise click.ClickException(f"invalid ACCESSFLOW_* settings:\n{error}") from None


@contextmanager
def open_services() -> Iterator[Services]:
    settings = load_settings()
    services = build(settings)
    try:
        yield services
    except AccessflowError as error:
        raise click.ClickException(str(error)) from None
    finally:
        services.close()


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=False))


def validated_entry(entry: type[catalogue_file.Entry], values: dict[str, Any]) -> Any:
    try:
        return entry.model_validate(values)
    except ValidationError as error:
        raise click.ClickException(explain(error)) from None


def operator_name() -> str:
    """Who runs this command, for the audit trail: the login of the machine's user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        return f"uid:{os.getuid()}"
