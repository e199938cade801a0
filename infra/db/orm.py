"""Tables. The schema itself is created by the Alembic migrations.

The domain classes are not mapped onto them: the repositories (:mod:`infra.db.repositories`)
read rows and build plain domain objects with Core, and write them back with Core, so
the hot path pays for neither ORM loading nor the ORM's flush.
"""

from __future__ import annotations

import enum

import sqlalchemy as sa
from sqlalchemy import orm as sa_orm

from domain.model import (
    ActorKind,
    AuthMethod,
    CredentialChangeKind,
    CredentialOperationKind,
    CredentialStatus,
    DecisionOutcome,
    DeliveryStatus,
    NotificationKind,
    RequestKind,
    Status,
)

metadata = sa.MetaData()


def _enum(cls: type[enum.Enum]) -> sa.Enum:
    # Stored as the value string, without a native PostgreSQL type: adding a state is then
    # a code change, not a locking ALTER TYPE.
    return sa.Enum(cls, native_enum=False, length=40, values_callable=lambda e: [m.value for m in e])


Timestamp = sa.DateTime(timezone=True)
#: The credentials the expiry sweep looks at: live ones that expire.
_LIVE_EXPIRING = "status IN ('active', 'suspended') AND expires_at IS NOT NULL"
#: The requests the review-deadline sweep looks at: pending ones with a deadline.
_REVIEW_DUE = "status = 'pending_review' AND review_deadline_at IS NOT NULL"

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("auth_method", _enum(AuthMethod), nullable=False),
)

plans = sa.Table(
    "plans",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("auto_approve", sa.Boolean, nullable=False),
    sa.Column("rate_limit_per_minute", sa.Integer, nullable=False),
    sa.Column("monthly_quota", sa.Integer, nullable=True),
    sa.Column("product_ids", sa.JSON, nullable=False),
    # How long each credential issued under the plan lives; None: for ever (migration 0010).
    sa.Column("credential_lifetime_days", sa.Integer, nullable=True),
    # Hours a request parked for review waits; None: the deployment's default (migration 0012).
    sa.Column("review_deadline_hours", sa.Float, nullable=True),
    # Approval rules, as ``domain.rules.Rule.to_json`` writes them, and throttles (migration 0013).
    sa.Column("rules", sa.JSON, nullable=False, server_default="[]"),
    sa.Column("max_open_requests_per_consumer", sa.Integer, nullable=True),
    sa.Column("max_requests_per_consumer_per_hour", sa.Integer, nullable=True),
)

consumers = sa.Table(
    "consumers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    # The consumer's own throttles, in place of each plan's (migration 0013).
    sa.Column("max_open_requests", sa.Integer, nullable=True),
    sa.Column("max_requests_per_hour", sa.Integer, nullable=True),
)

apps = sa.Table(
    "apps",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("consumer_id", sa.String(64), sa.ForeignKey("consumers.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
)

# No foreign keys to the catalogue: an invalid request names things that do not exist,
# and it is kept all the same, with its reason.
access_requests = sa.Table(
    "access_requests",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("consumer_id", sa.String(64), nullable=False, index=True),
    sa.Column("plan_id", sa.String(64), nullable=False),
    sa.Column("product_ids", sa.JSON, nullable=False),
    sa.Column("app_id", sa.String(64), nullable=True),
    sa.Column("new_app_name", sa.String(200), nullable=True),
    sa.Column("new_app_description", sa.Text, nullable=True),
    sa.Column("justification", sa.Text, nullable=True),
    sa.Column("submitted_at", Timestamp, nullable=False),
    sa.Column("received_at", Timestamp, nullable=False),
    sa.Column("status", _enum(Status), nullable=False, index=True),
    sa.Column("auth_method", _enum(AuthMethod), nullable=True),
    sa.Column("status_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("updated_at", Timestamp, nullable=False),
    # The portal that submitted the request, which hears every change of it; None for v1 submissions.
    sa.Column("portal_id", sa.String(64), nullable=True),
    # The sequence number of the last event sent to the portal about this request.
    sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
    # How many times the sweep issued an approved request's credentials again (migration 0009).
    sa.Column("provision_attempts", sa.Integer, nullable=False, server_default="0"),
    # An access request, or a plan change of ``credential_id`` (migration 0010).
    sa.Column("kind", _enum(RequestKind), nullable=False, server_default="access"),
    sa.Column("credential_id", sa.String(36), nullable=True),
    # When a request pending review expires, and the reminders already sent (migration 0012).
    sa.Column("review_deadline_at", Timestamp, nullable=True),
    sa.Column("review_notices", sa.String(200), nullable=False, server_default=""),
    # Which rule, flag, throttle or check decided the routing (migration 0013).
    sa.Column("routed_by", sa.Text, nullable=False, server_default=""),
    # How many distinct admins must approve it, and which may (an ``approvers`` rule; migration 0013).
    sa.Column("approvals_required", sa.Integer, nullable=False, server_default="1"),
    sa.Column("approvers", sa.JSON, nullable=False, server_default="[]"),
    # The sweep of requests stuck in approved reads only those, by age (migration 0009).
    sa.Index(
        "ix_access_requests_approved",
        "updated_at",
        postgresql_where=sa.text("status = 'approved'"),
        sqlite_where=sa.text("status = 'approved'"),
    ),
    # The review-deadline sweep reads only pending requests with a deadline, soonest first (0012).
    sa.Index(
        "ix_access_requests_review_deadline",
        "review_deadline_at",
        postgresql_where=sa.text(_REVIEW_DUE),
        sqlite_where=sa.text(_REVIEW_DUE),
    ),
)

# Append-only: PostgreSQL refuses UPDATE and DELETE here (see the first migration).
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(36), sa.ForeignKey("access_requests.id"), nullable=False, index=True),
    sa.Column("from_status", _enum(Status), nullable=True),
    sa.Column("to_status", _enum(Status), nullable=False),
    sa.Column("actor_kind", _enum(ActorKind), nullable=False),
    sa.Column("actor_id", sa.String(254), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", Timestamp, nullable=False),
)

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("request_id", sa.String(36), nullable=False, index=True),
    sa.Column("approve", sa.Boolean, nullable=False),
    sa.Column("admin_id", sa.String(64), nullable=False),
    sa.Column("admin_email", sa.String(254), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("decided_at", Timestamp, nullable=False),
    sa.Column("outcome", _enum(DecisionOutcome), nullable=False),
    sa.Column("outcome_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("received_at", Timestamp, nullable=False),
    # The admin key whose signature was checked; None when the decision was refused before that.
    sa.Column("key_id", sa.String(64), nullable=True),
    # At most one decision per request is ever applied, whatever races.
    sa.Index(
        "uq_decisions_one_applied_per_request",
        "request_id",
        unique=True,
        postgresql_where=sa.text("outcome = 'applied'"),
        sqlite_where=sa.text("outcome = 'applied'"),
    ),
)

credentials = sa.Table(
    "credentials",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    # One credential set per request, whatever is redelivered.
    sa.Column("request_id", sa.String(36), sa.ForeignKey("access_requests.id"), nullable=False, unique=True),
    sa.Column("app_id", sa.String(64), sa.ForeignKey("apps.id"), nullable=False, index=True),
    sa.Column("kind", _enum(AuthMethod), nullable=False),
    sa.Column("public_id", sa.String(64), nullable=False, unique=True),
    sa.Column("secret_hash", sa.String(128), nullable=False),
    sa.Column("sealed_secret", sa.LargeBinary, nullable=True),
    sa.Column("product_ids", sa.JSON, nullable=False),
    sa.Column("rate_limit_per_minute", sa.Integer, nullable=False),
    sa.Column("monthly_quota", sa.Integer, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("revealed_at", Timestamp, nullable=True),
    sa.Column("revoked_at", Timestamp, nullable=True),
    # Its life after issue (migration 0010): see domain.model.Credential.
    sa.Column("status", _enum(CredentialStatus), nullable=False, server_default="active"),
    sa.Column("plan_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("consumer_id", sa.String(64), nullable=False, server_default="", index=True),
    sa.Column("expires_at", Timestamp, nullable=True),
    sa.Column("previous_public_id", sa.String(64), nullable=True, index=True),
    sa.Column("previous_secret_hash", sa.String(128), nullable=True),
    sa.Column("previous_valid_until", Timestamp, nullable=True),
    sa.Column("revision", sa.Integer, nullable=False, server_default="1"),
    sa.Column("updated_at", Timestamp, nullable=True),
    sa.Column("expiry_notices", sa.String(200), nullable=False, server_default=""),
    sa.Index(
        "ix_credentials_expiring",
        "expires_at",
        postgresql_where=sa.text(_LIVE_EXPIRING),
        sqlite_where=sa.text(_LIVE_EXPIRING),
    ),
)

# Append-only like audit_log: every change of a credential, who made it and why (migration 0010).
credential_audit = sa.Table(
    "credential_audit",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("credential_id", sa.String(36), sa.ForeignKey("credentials.id"), nullable=False, index=True),
    sa.Column("change", _enum(CredentialChangeKind), nullable=False),
    sa.Column("from_status", _enum(CredentialStatus), nullable=False),
    sa.Column("to_status", _enum(CredentialStatus), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("actor_kind", _enum(ActorKind), nullable=False),
    sa.Column("actor_id", sa.String(254), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("cause_id", sa.String(36), nullable=True),
    sa.Column("at", Timestamp, nullable=False),
)

# Admin operations on credentials as received, applied or not; the id makes a replay change nothing.
credential_operations = sa.Table(
    "credential_operations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("operation", _enum(CredentialOperationKind), nullable=False),
    sa.Column("target", sa.String(40), nullable=False),
    sa.Column("target_id", sa.String(64), nullable=False),
    sa.Column("admin_id", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("issued_at", Timestamp, nullable=False),
    sa.Column("received_at", Timestamp, nullable=False),
    sa.Column("outcome", _enum(DecisionOutcome), nullable=False),
    sa.Column("outcome_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("results", sa.JSON, nullable=False),
    sa.Column("key_id", sa.String(64), nullable=True),
)

# Admins' bulk decisions as received, with a result per request selected; the id makes a replay change nothing.
bulk_decisions = sa.Table(
    "bulk_decisions",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("approve", sa.Boolean, nullable=False),
    sa.Column("admin_id", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("decided_at", Timestamp, nullable=False),
    sa.Column("selection", sa.Text, nullable=False),
    sa.Column("received_at", Timestamp, nullable=False),
    sa.Column("outcome", _enum(DecisionOutcome), nullable=False),
    sa.Column("outcome_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("results", sa.JSON, nullable=False),
    sa.Column("key_id", sa.String(64), nullable=True),
)

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(36), sa.ForeignKey("access_requests.id"), nullable=False),
    sa.Column("kind", _enum(NotificationKind), nullable=False),
    # Tells apart emails of one kind about one request: the 14-day expiry notice from the 3-day one.
    sa.Column("topic", sa.String(80), nullable=False, server_default=""),
    sa.Column("message_id", sa.String(200), nullable=False),
    sa.Column("status", _enum(DeliveryStatus), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("sent_at", Timestamp, nullable=True),
    sa.Column("lease_expires_at", Timestamp, nullable=True),
    sa.UniqueConstraint("request_id", "kind", "topic", name="uq_notifications_request_kind_topic"),
    # The stuck-email sweep reads only these, and they are few (migration 0008).
    sa.Index(
        "ix_notifications_sending",
        "id",
        postgresql_where=sa.text("status = 'sending'"),
        sqlite_where=sa.text("status = 'sending'"),
    ),
)

# The transactional outbox: written with the state change, published after the commit.
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("queue_name", sa.String(200), nullable=False),
    sa.Column("actor_name", sa.String(200), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("sent_at", Timestamp, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # Set for events to portals: published to this exchange with this routing key, as plain JSON.
    # Empty for internal commands, which go to ``queue_name`` through the default exchange.
    sa.Column("exchange", sa.String(200), nullable=False, server_default=""),
    sa.Column("routing_key", sa.String(200), nullable=True),
    # Set by a sweep that claims the row for publishing; other sweeps skip the row until then,
    # so no lock is held while the broker answers, and a claimer that died holds it no longer.
    sa.Column("claimed_until", Timestamp, nullable=True),
    # Why the broker did not confirm the row's last try ("unroutable: NO_ROUTE", ...); kept once sent.
    sa.Column("last_error", sa.Text, nullable=True),
    # Set when the sweep gave up on the row after ACCESSFLOW_OUTBOX_MAX_ATTEMPTS refused tries; no
    # sweep takes it until an operator puts it back (``accessflow outbox retry``).
    sa.Column("parked_at", Timestamp, nullable=True),
    sa.Index(
        "ix_outbox_unsent", "created_at", postgresql_where=sa.text("sent_at IS NULL AND parked_at IS NULL")
    ),
    # For pruning sent rows by age (``OutboxRelay.prune``).
    sa.Index("ix_outbox_sent", "sent_at", postgresql_where=sa.text("sent_at IS NOT NULL")),
)

# Messages no handler could read: kept with their reason instead of vanishing.
malformed_messages = sa.Table(
    "malformed_messages",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(200), nullable=False, unique=True),
    sa.Column("queue_name", sa.String(200), nullable=False),
    sa.Column("actor_name", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("body_excerpt", sa.Text, nullable=False),
    sa.Column("received_at", Timestamp, nullable=False),
    # The AMQP user that published it (RabbitMQ's validated user_id), when it said.
    sa.Column("sender", sa.String(200), nullable=True),
    # malformed: unreadable; forged: readable, but from a party not allowed to say it.
    sa.Column("kind", sa.String(20), nullable=False, server_default="malformed"),
)

# Developer portals: who may submit for which consumers, and the key their secrets are sealed to.
portals = sa.Table(
    "portals",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("broker_user", sa.String(200), nullable=False, unique=True),
    sa.Column("public_key", sa.String(100), nullable=False),
    sa.Column("url", sa.String(500), nullable=False, server_default=""),
)

portal_consumers = sa.Table(
    "portal_consumers",
    metadata,
    sa.Column("portal_id", sa.String(64), sa.ForeignKey("portals.id"), primary_key=True),
    sa.Column("consumer_id", sa.String(64), sa.ForeignKey("consumers.id"), primary_key=True),
)

# Admins, and the Ed25519 public keys their decisions are verified with. Workers hold no private key.
admins = sa.Table(
    "admins",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("email", sa.String(254), nullable=False),
)

admin_keys = sa.Table(
    "admin_keys",
    metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("admin_id", sa.String(64), sa.ForeignKey("admins.id"), nullable=False, index=True),
    sa.Column("public_key", sa.String(100), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp, nullable=True),
)

# How often each message started processing without finishing. A message that kills its
# worker never reaches the end of its run, so only this counter (committed before the run)
# can bound its deliveries. Rows are deleted when a run ends, whatever its outcome.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("message_id", sa.String(200), primary_key=True),
    sa.Column("actor_name", sa.String(200), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("first_started_at", Timestamp, nullable=False),
    sa.Column("last_started_at", Timestamp, nullable=False),
)

# Why each message in a dead-letter queue is there; the message itself stays in <queue>.XQ.
dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(200), nullable=False, index=True),
    sa.Column("queue_name", sa.String(200), nullable=False),
    sa.Column("actor_name", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("dead_lettered_at", Timestamp, nullable=False),
    sa.Column("replayed_at", Timestamp, nullable=True),
)

#: The tables whose rows each process caches (infra.db.repositories.ReferenceCache), and so whose
#: every change must replace ``catalogue_version.version`` in the same transaction: migration
#: 0006 puts a trigger on each that does it. On ``apps`` only updates and deletes do: requests
#: insert apps all the time, and a new app can make no cached entry wrong, since an app that
#: is not found is never cached.
CACHED_TABLES = (
    "products",
    "plans",
    "consumers",
    "apps",
    "portals",
    "portal_consumers",
    "admins",
    "admin_keys",
)

# One row (id 1). Its version is replaced by a trigger in every transaction that changes a
# cached table, whoever runs it (the CLI, a catalogue load, an operator in psql), so a
# process knows its cache is current by reading this one row. A fresh random value rather
# than a counter, so a database restored from a backup cannot bring back a value a cache
# has already seen with other contents.
catalogue_version = sa.Table(
    "catalogue_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.CheckConstraint("id = 1", name="ck_catalogue_version_one_row"),
)


def start_mappers() -> None:
    """Nothing to map: the repositories speak Core. Kept for the callers that boot with it."""


def clear_mappers() -> None:
    """Undo any mapping left in this process, so the domain classes are plain (for the unit tests)."""
    sa_orm.clear_mappers()
