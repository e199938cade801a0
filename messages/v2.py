"""Version 2 of the contracts that outside parties publish: portals and admin tools.

What changed from v1, and why:

* A submission names its ``portal_id``. The portal must publish it as its own AMQP
  user (RabbitMQ validates the ``user_id`` property) and only for its own consumers;
  accessflow then sends that portal every change of the request as an event.
* A decision is signed with Ed25519 by a key of the admin it names, over a canonical
  form of its fields (:func:`messages.canonical.canonical_bytes`; ``asyncapi.yaml`` has a worked
  example), and carries the deployment it is meant for (``audience``). Its ids and
  time are strings exactly as signed: nothing is normalised, so the bytes a worker
  rebuilds are the bytes the admin signed.

v1 stays readable: a v1 decision is recorded and refused as unsigned; a v1 submission
is refused unless ``ACCESSFLOW_ACCEPT_V1_SUBMISSIONS`` is on (README: moving from v1).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from domain import commands
from domain.model import MAX_BULK_ITEMS, CredentialOperationKind, OperationTarget
from messages import v1
from messages.canonical import canonical_bytes
from messages.v1 import Identifier, Text, _not_a_bool

#: A UUID in its canonical lower-case form, kept as the string that was signed.
CanonicalUuid = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
]


def _utc_instant(value: str) -> str:
    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise ValueError("is not a valid date and time") from None
    return value


#: A UTC time as ``2026-11-27T10:00:00Z`` (up to 6 fraction digits), kept as the string that was signed.
UtcInstant = Annotated[
    str,
    StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"),
    AfterValidator(_utc_instant),
]

Version2 = Annotated[Literal[2], BeforeValidator(_not_a_bool)]


class AccessRequestSubmitted(v1.AccessRequestSubmitted):
    """A consumer asks for products under a plan for an app, through a registered portal."""

    # Required: a payload without ``version`` is read as v1 (routes.Route.contract_for).
    version: Version2 = Field(description="Contract version: 2.")  # type: ignore[assignment]
    portal_id: Identifier = Field(
        description="The registered portal that sends this; it must publish as its own AMQP user "
        "and may speak only for its own consumers."
    )
    credential_id: CanonicalUuid | None = Field(
        None,
        description="Ask to move this issued credential (of app_id, with the same product_ids) to "
        "plan_id, keeping its key. Routed as an access request is: at once under an auto-approve "
        "plan, else reviewed. Leave out for a new credential.",
    )

    @model_validator(mode="after")
    def _a_plan_change_names_its_app(self) -> AccessRequestSubmitted:
        if self.credential_id is not None and self.app_id is None:
            raise ValueError("a plan change (credential_id) names the credential's app_id, not a new_app")
        return self

    def to_command(self, sender: str | None = None) -> commands.RouteRequest:
        return dataclasses.replace(
            super().to_command(sender), portal_id=self.portal_id, credential_id=self.credential_id
        )


class SignatureBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: Identifier = Field(description="Which of the admin's keys signed; keys rotate.")
    algorithm: Literal["ed25519"] = "ed25519"
    value: str = Field(
        min_length=1,
        max_length=200,
        description="Standard base64 (with padding) of the 64-byte Ed25519 signature of the canonical bytes.",
    )


class AdminDecision(BaseModel):
    """An admin approves or rejects a pending request, signed with the admin's Ed25519 key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Required, not defaulted: both are signed, so both must be in what the admin signed.
    version: Version2 = Field(description="Contract version: 2.")
    type: Literal["access_request.decided"]
    decision_id: CanonicalUuid = Field(description="Lower-case UUID; the idempotency key of the decision.")
    request_id: CanonicalUuid
    decision: Literal["approve", "reject"]
    admin_id: Identifier = Field(description="The admin, as registered with `accessflow admins add`.")
    reason: Annotated[Text, StringConstraints(min_length=1)]
    decided_at: UtcInstant = Field(
        description="When the admin decided, UTC with a Z. Refused when further than the allowed "
        "skew (5 minutes unless configured) from the worker's clock."
    )
    audience: Identifier = Field(
        description="The deployment this is meant for: its queue prefix (ACCESSFLOW_QUEUE_PREFIX)."
    )
    signature: SignatureBlock

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.model_dump(mode="json", exclude={"signature"}))

    def to_command(self, sender: str | None = None) -> commands.DecideRequest:
        decided_at = _instant(self.decided_at)
        return commands.DecideRequest(
            decision_id=self.decision_id,
            request_id=self.request_id,
            approve=self.decision == "approve",
            admin_id=self.admin_id,
            admin_email="",
            reason=self.reason,
            decided_at=decided_at,
            signature=commands.Signature(
                key_id=self.signature.key_id,
                value=self.signature.value,
                signed_bytes=self.signed_bytes(),
                audience=self.audience,
            ),
            sender=sender,
        )


#: At most this many request ids in one bulk decision (:data:`domain.model.MAX_BULK_ITEMS`).
MAX_BULK_IDS = MAX_BULK_ITEMS
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

#: Canonical UUIDs joined by commas, no spaces: one string, so that it is signed as sent.
RequestIdList = Annotated[
    str,
    StringConstraints(pattern=rf"^{_UUID}(,{_UUID}){{0,{MAX_BULK_IDS - 1}}}$", max_length=37 * MAX_BULK_IDS),
]


class BulkDecision(BaseModel):
    """An admin approves or rejects many pending requests at once, signed as a decision is.

    Ed25519 over :func:`messages.canonical.canonical_bytes` of every member but ``signature``;
    members left out are left out of the signed bytes. It names its requests by ``request_ids``
    (comma-separated canonical UUIDs, at most 200), or selects the pending ones by a filter of
    ``plan_id``, ``consumer_id`` and ``submitted_before`` (at least one; at most 200 selected,
    oldest first). Each request is decided on its own, as a decision with an id derived from
    ``bulk_id`` and the request's; ``bulk_id`` is the idempotency key of the whole.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Version2 = Field(description="Contract version: 2.")
    type: Literal["access_request.bulk_decided"]
    bulk_id: CanonicalUuid = Field(description="Lower-case UUID; the idempotency key of the bulk decision.")
    decision: Literal["approve", "reject"]
    admin_id: Identifier = Field(description="The admin, as registered with `accessflow admins add`.")
    reason: Annotated[Text, StringConstraints(min_length=1)]
    decided_at: UtcInstant = Field(
        description="When the admin decided, UTC with a Z; refused beyond the allowed skew, as a decision is."
    )
    audience: Identifier = Field(description="The deployment this is meant for: its queue prefix.")
    request_ids: RequestIdList | None = Field(
        None,
        description="The requests, as comma-separated lower-case UUIDs without spaces (at most 200). "
        "Leave out to select by the filter instead.",
    )
    plan_id: Identifier | None = Field(None, description="Filter: pending requests for this plan.")
    consumer_id: Identifier | None = Field(None, description="Filter: pending requests of this consumer.")
    submitted_before: UtcInstant | None = Field(
        None, description="Filter: pending requests received before this moment, UTC with a Z."
    )
    signature: SignatureBlock

    @model_validator(mode="after")
    def _selects_one_way(self) -> BulkDecision:
        filtered = (self.plan_id, self.consumer_id, self.submitted_before) != (None, None, None)
        if self.request_ids is not None and filtered:
            raise ValueError("a bulk decision names request_ids or a filter, not both")
        if self.request_ids is None and not filtered:
            raise ValueError(
                "a bulk decision names request_ids, or a filter of plan_id, consumer_id or submitted_before"
            )
        return self

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.model_dump(mode="json", exclude={"signature"}, exclude_none=True))

    def to_command(self, sender: str | None = None) -> commands.DecideBulk:
        return commands.DecideBulk(
            bulk_id=self.bulk_id,
            approve=self.decision == "approve",
            admin_id=self.admin_id,
            reason=self.reason,
            decided_at=_instant(self.decided_at),
            request_ids=tuple(self.request_ids.split(",")) if self.request_ids else (),
            plan_id=self.plan_id,
            consumer_id=self.consumer_id,
            submitted_before=_instant(self.submitted_before) if self.submitted_before else None,
            signature=commands.Signature(
                key_id=self.signature.key_id,
                value=self.signature.value,
                signed_bytes=self.signed_bytes(),
                audience=self.audience,
            ),
            sender=sender,
        )


#: Seconds a rotated credential's previous secret may go on verifying: at most 30 days.
MAX_GRACE_SECONDS = 30 * 24 * 3600


class CredentialOperation(BaseModel):
    """An admin rotates, revokes, suspends, resumes, changes the plan of, or sets the expiry of credentials.

    Signed like a decision: Ed25519 over :func:`messages.canonical.canonical_bytes` of every
    member but ``signature``; members left out of the message are left out of the signed
    bytes. ``target`` names one credential, every credential of an app, or every credential
    of a consumer (revoke, suspend and resume only); rotate, set_expiry and change_plan
    name one credential.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Version2 = Field(description="Contract version: 2.")
    type: Literal["credentials.operate"]
    operation_id: CanonicalUuid = Field(description="Lower-case UUID; the idempotency key of the operation.")
    operation: Literal["rotate", "revoke", "suspend", "resume", "set_expiry", "change_plan"]
    target: Literal["credential", "app", "consumer"]
    target_id: Identifier
    admin_id: Identifier = Field(description="The admin, as registered with `accessflow admins add`.")
    reason: Annotated[Text, StringConstraints(min_length=1)]
    issued_at: UtcInstant = Field(
        description="When the admin signed it, UTC with a Z; refused beyond the allowed skew, as a decision is."
    )
    audience: Identifier = Field(description="The deployment this is meant for: its queue prefix.")
    # Strict: signed as sent, so "5", true or 5.0 are refused rather than read as the integer 5.
    grace_seconds: int | None = Field(
        None,
        ge=0,
        le=MAX_GRACE_SECONDS,
        strict=True,
        description="rotate: how long the previous secret still verifies.",
    )
    plan_id: Identifier | None = Field(None, description="change_plan: the plan to move the credential to.")
    expires_at: UtcInstant | None = Field(
        None, description="set_expiry: the new end of life; left out, the credential never expires."
    )
    signature: SignatureBlock

    @model_validator(mode="after")
    def _fits_its_operation(self) -> CredentialOperation:
        if self.operation in ("rotate", "set_expiry", "change_plan") and self.target != "credential":
            raise ValueError(f"{self.operation} names one credential: target must be 'credential'")
        if (self.plan_id is not None) != (self.operation == "change_plan"):
            raise ValueError("plan_id is given with change_plan, and only with it")
        if self.grace_seconds is not None and self.operation != "rotate":
            raise ValueError("grace_seconds is given with rotate only")
        if self.expires_at is not None and self.operation != "set_expiry":
            raise ValueError("expires_at is given with set_expiry only")
        return self

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.model_dump(mode="json", exclude={"signature"}, exclude_none=True))

    def to_command(self, sender: str | None = None) -> commands.OperateCredentials:
        return commands.OperateCredentials(
            operation_id=self.operation_id,
            operation=CredentialOperationKind(self.operation),
            target=OperationTarget(self.target),
            target_id=self.target_id,
            admin_id=self.admin_id,
            reason=self.reason,
            issued_at=_instant(self.issued_at),
            grace=timedelta(seconds=self.grace_seconds or 0),
            plan_id=self.plan_id,
            expires_at=_instant(self.expires_at) if self.expires_at else None,
            signature=commands.Signature(
                key_id=self.signature.key_id,
                value=self.signature.value,
                signed_bytes=self.signed_bytes(),
                audience=self.audience,
            ),
            sender=sender,
        )


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
