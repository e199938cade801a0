"""Version 1 of accessflow's message contracts.

Compatibility rule: a field is never removed or retyped within a version; a
breaking change is a new module (``v2``) and a new ``version`` literal, and the
workers accept both while producers move over.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    model_validator,
)

from domain import commands
from domain.model import NotificationKind

#: Bytes; a larger body is refused before it is parsed.
MAX_MESSAGE_BYTES = 64 * 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_EXCEPT_NEWLINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


def _no_control_characters(value: str) -> str:
    # Names end up in email headers and log lines: a newline there is an injection.
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters or line breaks")
    return value


def _no_control_characters_before_stripping(value: object) -> object:
    # strip_whitespace would quietly drop a leading or trailing "\r\n": refuse it like one inside.
    if isinstance(value, str):
        _no_control_characters(value)
    return value


def _no_encoded_words(value: str) -> str:
    # Python 3.11.7's email package decodes an RFC 2047 encoded word in a header value, and a
    # CR LF inside one ("=?utf-8?q?x=0D=0ABcc:_evil@x?=") becomes a real header line (cpython
    # #121650). No name or address needs "=?", so any is refused, well formed or not.
    if "=?" in value:
        raise ValueError(
            "must not contain '=?': it starts an RFC 2047 encoded word, which can inject email headers"
        )
    return value


def _printable_text(value: str) -> str:
    if _CONTROL_EXCEPT_NEWLINES.search(value):
        raise ValueError("must not contain control characters")
    return value


def _uuid_string(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("must be a UUID") from None


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must carry a timezone offset, e.g. 2026-11-26T10:00:00Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:30+01:00 has no UTC equivalent
        raise ValueError("is out of range") from None


def _not_a_bool(value: object) -> object:
    # JSON true would pass as 1: a version is an integer, not a flag.
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    return value


def _not_a_number(value: object) -> object:
    # pydantic would read a JSON number as Unix time; the contract says an ISO 8601 string.
    if isinstance(value, int | float):
        raise ValueError("must be an ISO 8601 date-time string, not a number")
    return value


Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"),
]
RequestId = Annotated[str, StringConstraints(min_length=32, max_length=36), AfterValidator(_uuid_string)]
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
    AfterValidator(_no_control_characters),
    AfterValidator(_no_encoded_words),
    BeforeValidator(_no_control_characters_before_stripping),  # last, so it runs first
]
Text = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_printable_text)]
Email = Annotated[
    EmailStr,
    StringConstraints(max_length=254),
    AfterValidator(_no_control_characters),
    AfterValidator(_no_encoded_words),
]
Timestamp = Annotated[datetime, BeforeValidator(_not_a_number), AfterValidator(_aware)]


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    version: Annotated[Literal[1], BeforeValidator(_not_a_bool)] = Field(
        1, description="Contract version; bump means a new module."
    )


class ConsumerRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Identifier
    email: Email
    name: Name


class NewApp(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    description: Text = ""


class AccessRequestSubmitted(Contract):
    """A consumer asks for products under a plan for an app. Published by developer portals."""

    type: Literal["access_request.submitted"] = "access_request.submitted"
    request_id: RequestId = Field(description="UUID chosen by the portal; the idempotency key.")
    consumer: ConsumerRef
    app_id: Identifier | None = Field(None, description="An existing app of the consumer's.")
    new_app: NewApp | None = Field(None, description="Or: an app to create for the consumer.")
    product_ids: list[Identifier] = Field(min_length=1, max_length=50)
    plan_id: Identifier
    justification: Text | None = None
    submitted_at: Timestamp

    @model_validator(mode="after")
    def _one_app(self) -> AccessRequestSubmitted:
        if (self.app_id is None) == (self.new_app is None):
            raise ValueError("give exactly one of app_id and new_app")
        return self

    def to_command(self, sender: str | None = None) -> commands.RouteRequest:
        return commands.RouteRequest(
            request_id=self.request_id,
            consumer_id=self.consumer.id,
            consumer_email=str(self.consumer.email),
            consumer_name=self.consumer.name,
            plan_id=self.plan_id,
            product_ids=tuple(dict.fromkeys(self.product_ids)),  # drop repeats, keep order
            app_id=self.app_id,
            new_app_name=self.new_app.name if self.new_app else None,
            new_app_description=self.new_app.description if self.new_app else None,
            justification=self.justification,
            submitted_at=self.submitted_at,
            sender=sender,
        )


class AdminRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Identifier
    email: Email


class AdminDecision(Contract):
    """An admin approves or rejects a pending request. Published by admin portals and the CLI."""

    type: Literal["access_request.decided"] = "access_request.decided"
    decision_id: RequestId = Field(
        default_factory=lambda: str(uuid.uuid4()), description="UUID; the idempotency key of the decision."
    )
    request_id: RequestId
    decision: Literal["approve", "reject"]
    admin: AdminRef
    reason: Text = Field(min_length=1)
    decided_at: Timestamp

    def to_command(self, sender: str | None = None) -> commands.DecideRequest:
        # Unsigned: the worker records it and refuses it (contract v2 carries the signature).
        return commands.DecideRequest(
            decision_id=self.decision_id,
            request_id=self.request_id,
            approve=self.decision == "approve",
            admin_id=self.admin.id,
            admin_email=str(self.admin.email),
            reason=self.reason,
            decided_at=self.decided_at,
            sender=sender,
        )


class IssueCredentials(Contract):
    """Internal: issue the credentials of an approved request."""

    type: Literal["credentials.issue"] = "credentials.issue"
    request_id: RequestId

    def to_command(self) -> commands.IssueCredentials:
        return commands.IssueCredentials(self.request_id)


class SendNotification(Contract):
    """Internal: send one email about a request."""

    type: Literal["notification.send"] = "notification.send"
    request_id: RequestId
    kind: Literal[
        "approve",
        "reject",
        "review",
        "expiry_notice",
        "expired",
        "review_reminder",
        "review_escalation",
        "review_expired",
    ]
    topic: Annotated[str, StringConstraints(max_length=80, pattern=r"^[A-Za-z0-9._:/-]*$")] = Field(
        "", description="Tells apart emails of one kind about one request, e.g. an expiry notice's point."
    )

    def to_command(self) -> commands.SendNotification:
        return commands.SendNotification(self.request_id, NotificationKind(self.kind), self.topic)


class PushCredentialChange(Contract):
    """Internal: push one change of a credential to the gateway."""

    type: Literal["gateway.push"] = "gateway.push"
    credential_id: RequestId = Field(description="The credential's id (a UUID).")
    change: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z][a-z_]*$")] = Field(
        description="What happened to it: issued, rotated, revoked, suspended, resumed, expired, plan_changed."
    )
    revision: int = Field(ge=1, le=2**31 - 1, description="The credential's count of changes, 1 at issue.")

    def to_command(self) -> commands.PushCredentialChange:
        return commands.PushCredentialChange(self.credential_id, self.change, self.revision)
