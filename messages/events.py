"""Events accessflow sends a portal about its requests: version 1 of the outbound contract.

Published on the events exchange (``<prefix>.out.events``, a topic exchange) with the
routing key ``<portal_id>.<event>``, e.g. ``acme-portal.access_request.approved``; the
body is this JSON object itself (no dramatiq envelope), with the AMQP ``message_id``
equal to ``event_id`` and ``type`` equal to ``event``.

At-least-once: the same event may arrive twice (same ``event_id``). ``sequence`` counts
1, 2, 3... per request, so a portal drops what it has seen and orders the rest.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from domain.events import BulkDecisionSettled, PortalEvent
from messages.v1 import Identifier

#: The namespace of event ids, so the same event always gets the same id.
EVENT_NAMESPACE = uuid.UUID("4a3c1d1e-2b7f-4f6e-9d55-3c0f1b9e7a21")

EventName = Literal[
    "access_request.submitted",
    "access_request.pending_review",
    "access_request.approved",
    "access_request.rejected",
    "access_request.invalid",
    "access_request.provisioned",
    "access_request.provisioning_failed",
    "access_request.expired",
    "credentials.issued",
    "credentials.rotated",
    "credentials.revoked",
    "credentials.suspended",
    "credentials.resumed",
    "credentials.expiry_set",
    "credentials.expiring",
    "credentials.expired",
    "credentials.plan_changed",
]


class IssuedCredential(BaseModel):
    """The public part of a credential; safe to show and log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    kind: Literal["api_key", "oauth2_client_credentials"]
    public_id: str = Field(description="The API key's lookup prefix, or the OAuth2 client id.")
    app_id: Identifier
    product_ids: list[Identifier]
    rate_limit_per_minute: int
    monthly_quota: int | None
    status: Literal["active", "suspended", "revoked", "expired"] = "active"
    plan_id: str = Field("", description="The plan whose limits it carries.")
    revision: int = Field(1, ge=1, description="1 when issued, one more with each change.")
    expires_at: datetime | None = Field(None, description="When it stops verifying; null: never.")
    previous_public_id: str | None = Field(
        None, description="After a rotation with a grace period: the previous secret's public id."
    )
    previous_valid_until: datetime | None = Field(
        None, description="After a rotation with a grace period: when the previous secret stops verifying."
    )


class SealedSecret(BaseModel):
    """The credential's secret, encrypted to the portal's public key: only the portal can open it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["x25519-xsalsa20-poly1305-sealedbox"] = Field(
        description="A libsodium sealed box (crypto_box_seal): open it with the portal's X25519 "
        "private key, e.g. PyNaCl's SealedBox(private_key).decrypt(...)."
    )
    recipient_key: str = Field(description="The portal public key it was sealed to, base64.")
    value: str = Field(description="Standard base64 of the sealed box.")


class RequestEvent(BaseModel):
    """One change of a portal's access request, or of the credential it was issued.

    ``credentials.*`` events other than ``issued`` report the credential's life after issue
    (rotated, revoked, suspended, resumed, expiry_set, expiring, expired, plan_changed), in
    the sequence of the request it was issued for; their ``status`` is the credential's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, title="PortalEvent")

    version: Literal[1] = 1
    type: Literal["portal.event"] = "portal.event"
    event: EventName
    event_id: str = Field(description="UUID, the same for every delivery of this event.")
    portal_id: Identifier
    request_id: str
    sequence: int = Field(ge=1, description="1, 2, 3... per request, in the order things happened.")
    status: str = Field(description="The request's status this event reports.")
    reason: str = Field(description="Why, in words: the admin's reason, the rule that failed...")
    occurred_at: datetime
    credential: IssuedCredential | None = Field(
        None, description="With every credentials.* event: the credential as it is after the change."
    )
    sealed_secret: SealedSecret | None = Field(
        None, description="With credentials.issued and credentials.rotated: the new secret, sealed."
    )

    @classmethod
    def of(cls, event: PortalEvent) -> RequestEvent:
        return cls.model_validate(
            {
                "event": event.name,
                "event_id": str(uuid.uuid5(EVENT_NAMESPACE, f"{event.request_id}:{event.sequence}")),
                "portal_id": event.portal_id,
                "request_id": event.request_id,
                "sequence": event.sequence,
                "status": event.status,
                "reason": event.reason,
                "occurred_at": event.occurred_at,
                **event.details,
            }
        )

    def routing_key(self) -> str:
        return f"{self.portal_id}.{self.event}"


#: The first word of the routing key of every event for the admins' tools, in place of a
#: portal id: so no portal may be registered under it (its queue would be bound to ``admins.#``).
ADMINS = "admins"

AdminEventName = Literal["access_request.bulk_decided"]


class BulkItemOutcome(BaseModel):
    """What a bulk decision did to one request it selected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    result: Literal["applied", "counted", "already_decided", "ignored", "not_found", "refused"]


class AdminEvent(BaseModel):
    """What the admins' tools are told: a bulk decision's results, one per request it selected.

    Published on the events exchange with the routing key ``admins.<event>``, into the
    queue ``<prefix>.admin.events``, which only the workers write and only the admin tool's
    AMQP user reads. Told for a refused bulk too (``outcome`` ``refused``, every named
    request ``refused``, nothing decided), so that a forged or stale one is seen.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, title="AdminEvent")

    version: Literal[1] = 1
    type: Literal["admin.event"] = "admin.event"
    event: AdminEventName
    event_id: str = Field(description="UUID, the same for every delivery of this event.")
    bulk_id: str = Field(description="The bulk decision's own id, as the admin tool sent it.")
    admin_id: Identifier = Field(description="The admin the bulk decision named.")
    decision: Literal["approve", "reject"]
    selection: str = Field(description="`ids`, or the filter it was: `plan_id=gold consumer_id=acme`.")
    outcome: Literal["applied", "ignored", "refused"] = Field(
        description="applied: each result says what was done; ignored: nothing was selected; "
        "refused: not shown to come from the admin it names, nothing decided."
    )
    reason: str = Field(description="Why it was ignored or refused; empty when applied.")
    results: list[BulkItemOutcome] = Field(description="One per request selected, in the order decided.")
    occurred_at: datetime

    @classmethod
    def of(cls, event: BulkDecisionSettled) -> AdminEvent:
        return cls.model_validate(
            {
                "event": "access_request.bulk_decided",
                "event_id": str(uuid.uuid5(EVENT_NAMESPACE, f"bulk-decided:{event.bulk_id}")),
                "bulk_id": event.bulk_id,
                "admin_id": event.admin_id,
                "decision": "approve" if event.approve else "reject",
                "selection": event.selection,
                "outcome": event.outcome,
                "reason": event.outcome_reason,
                "results": [{"request_id": r, "result": result} for r, result in event.results],
                "occurred_at": event.occurred_at,
            }
        )

    def routing_key(self) -> str:
        return f"{ADMINS}.{self.event}"
