"""The use cases: one function per command, dependencies passed as keyword arguments.

Each handler is idempotent. It reloads state by id inside one transaction, decides
from that state rather than from the message, and queues its follow-up commands in
the outbox of the same transaction, so nothing leaves before the commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from datetime import timedelta

from domain import commands, events
from domain.errors import NotFound, PermanentDeliveryError, TransientError
from domain.model import (
    AccessRequest,
    App,
    Credential,
    Decision,
    DecisionOutcome,
    DeliveryStatus,
    Notification,
    NotificationKind,
    Status,
    utcnow,
)
from domain.notifications import ApproveContext, ProductLine, RejectContext, ReviewContext
from domain.ports import CredentialIssuer, Email, Mailer, SecretSealer, UnitOfWork

log = logging.getLogger(__name__)

#: Namespace for ids derived from a request id, so a redelivery derives the same ones.
ACCESSFLOW_NAMESPACE = uuid.UUID("9b2f3c52-6f0e-4a53-9d8e-0a3c2f6e8d11")


def derived_id(kind: str, request_id: str) -> str:
    return str(uuid.uuid5(ACCESSFLOW_NAMESPACE, f"{kind}:{request_id}"))


def follow_ups(event: events.Event) -> list[commands.Command]:
    """The commands each event calls for; the outbox carries them to their actors."""
    match event:
        case events.RequestApproved():
            return [commands.IssueCredentials(event.request_id)]
        case events.RequestParkedForReview():
            return [commands.SendNotification(event.request_id, NotificationKind.REVIEW)]
        case events.RequestRejected():
            return [commands.SendNotification(event.request_id, NotificationKind.REJECT)]
        case events.CredentialsProvisioned():
            return [commands.SendNotification(event.request_id, NotificationKind.APPROVE)]
        case _:
            return []


def _queue_follow_ups(uow: UnitOfWork, request: AccessRequest) -> None:
    while request.events:
        for command in follow_ups(request.events.pop(0)):
            uow.outbox.put(command)


def route_request(command: commands.RouteRequest, *, uow: UnitOfWork) -> Status:
    """Validate a submitted request and approve it or park it for review.

    Returns:
      The request's status after routing (its current one if this is a redelivery).
    """
    with uow:
        existing = uow.requests.get(command.request_id)
        if existing is not None:
            log.info("duplicate submission of %s ignored", command.request_id)
            return existing.status
        request = AccessRequest(
            id=command.request_id,
            consumer_id=command.consumer_id,
            plan_id=command.plan_id,
            product_ids=list(command.product_ids),
            app_id=command.app_id,
            new_app_name=command.new_app_name,
            new_app_description=command.new_app_description,
            justification=command.justification,
            submitted_at=command.submitted_at,
        )
        request.record_submission()
        catalogue = uow.catalogue.slice_for(
            plan_id=command.plan_id,
            product_ids=command.product_ids,
            consumer_id=command.consumer_id,
            app_id=command.app_id,
        )
        request.route(catalogue)
        if request.status is not Status.INVALID and request.app_id is None:
            app = App(
                id=derived_id("app", request.id),
                consumer_id=request.consumer_id,
                name=command.new_app_name or "",
                description=command.new_app_description or "",
            )
            uow.catalogue.add_app(app)
            request.app_id = app.id
        uow.requests.add(request)
        _queue_follow_ups(uow, request)
        uow.commit()
        return request.status


def decide(
    command: commands.DecideRequest, *, uow: UnitOfWork, admin_emails: Iterable[str]
) -> DecisionOutcome:
    """Apply an admin's decision to a pending request; record, and ignore, any other decision."""
    admins = {a.lower() for a in admin_emails}
    with uow:
        if uow.decisions.get(command.decision_id) is not None:
            log.info("duplicate decision message %s ignored", command.decision_id)
            return DecisionOutcome.IGNORED
        request = uow.requests.get(command.request_id, for_update=True)
        outcome, why = DecisionOutcome.APPLIED, ""
        if command.admin_email.lower() not in admins:
            outcome, why = DecisionOutcome.IGNORED, f"{command.admin_email} is not a configured admin"
        elif request is None:
            outcome, why = DecisionOutcome.IGNORED, "no such request"
        elif request.status is not Status.PENDING_REVIEW:
            outcome, why = DecisionOutcome.IGNORED, f"request is {request.status.value}, not pending review"
        elif command.approve:
            request.approve(admin_id=command.admin_email, reason=command.reason)
        else:
            request.reject(admin_id=command.admin_email, reason=command.reason)
        uow.decisions.add(
            Decision(
                id=command.decision_id,
                request_id=command.request_id,
                approve=command.approve,
                admin_id=command.admin_id,
                admin_email=command.admin_email,
                reason=command.reason,
                decided_at=command.decided_at,
                outcome=outcome,
                outcome_reason=why,
            )
        )
        if request is not None:
            _queue_follow_ups(uow, request)
        uow.commit()
        return outcome


def issue_credentials(
    command: commands.IssueCredentials, *, uow: UnitOfWork, issuer: CredentialIssuer, sealer: SecretSealer
) -> Credential | None:
    """Issue the app's credential for an approved request, with the plan's limits, exactly once."""
    with uow:
        request = uow.requests.get(command.request_id, for_update=True)
        if request is None or request.status is not Status.APPROVED:
            log.info("no credentials to issue for %s (%s)", command.request_id, request and request.status)
            return None
        plan = uow.catalogue.plan(request.plan_id)
        if plan is None:  # removed from the catalogue after approval: retries, then the dead-letter queue
            raise NotFound(f"plan {request.plan_id!r} of approved request {request.id} no longer exists")
        assert request.app_id is not None and request.auth_method is not None  # set by routing
        existing = uow.credentials.for_request(request.id)
        if existing is not None:  # issued before a crash, state not yet moved
            credential = existing
        else:
            issued = issuer.issue(request.auth_method)
            credential = Credential(
                id=derived_id("credential", request.id),
                request_id=request.id,
                app_id=request.app_id,
                kind=request.auth_method,
                public_id=issued.public_id,
                secret_hash=issued.secret_hash,
                sealed_secret=sealer.seal(issued.secret),
                product_ids=list(request.product_ids),
                rate_limit_per_minute=plan.rate_limit_per_minute,
                monthly_quota=plan.monthly_quota,
            )
            uow.credentials.add(credential)
        request.mark_provisioned(credential.id)
        _queue_follow_ups(uow, request)
        uow.commit()
        return credential


def email_message_id(request_id: str, kind: NotificationKind, domain: str) -> str:
    return f"<{kind.value}.{request_id}@{domain}>"


def send_notification(
    command: commands.SendNotification,
    *,
    uow: UnitOfWork,
    mailer: Mailer,
    admin_emails: Iterable[str],
    message_id_domain: str = "accessflow",
    lease_seconds: float = 60.0,
) -> DeliveryStatus | None:
    """Send one email about a request, at least once and, short of a crash mid-send, at most once.

    The attempt is committed before SMTP is spoken to and the result after, so a
    crash in between gives at most one duplicate, which shares the same Message-ID.
    The attempt also takes a lease of ``lease_seconds``: a redelivery of the same
    command that arrives while the first is still talking SMTP (the broker redelivers
    when a connection drops) backs off instead of sending a second copy.

    Raises:
      TransientError: the server may take it later, or another worker holds the lease.
    """
    with uow:
        notification = uow.notifications.get(command.request_id, command.kind, for_update=True)
        if notification is not None and notification.status is not DeliveryStatus.SENDING:
            return notification.status
        if notification is not None and notification.leased_by_another(utcnow()):
            raise TransientError(
                f"{command.kind.value} email for {command.request_id} is being sent by another worker"
            )
        request = uow.requests.get(command.request_id)
        if request is None:
            log.warning("notification for unknown request %s dropped", command.request_id)
            return None
        email = _compose(
            request,
            command.kind,
            uow=uow,
            admin_emails=tuple(admin_emails),
            message_id=email_message_id(request.id, command.kind, message_id_domain),
        )
        if notification is None:
            notification = Notification(request_id=request.id, kind=command.kind, message_id=email.message_id)
            uow.notifications.add(notification)
        notification.attempts += 1
        notification.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
        uow.commit()
    if not email.to:  # e.g. no ACCESSFLOW_ADMIN_EMAILS: a gap the operator must see, not a success
        return _record_delivery(uow, command, DeliveryStatus.FAILED, "no recipients configured")
    try:
        mailer.send(email)
    except PermanentDeliveryError as refused:
        return _record_delivery(uow, command, DeliveryStatus.FAILED, str(refused))
    except TransientError as failure:
        _record_delivery(uow, command, DeliveryStatus.SENDING, str(failure))  # frees the lease for the retry
        raise
    return _record_delivery(uow, command, DeliveryStatus.SENT, "")


def _record_delivery(
    uow: UnitOfWork, command: commands.SendNotification, status: DeliveryStatus, error: str
) -> DeliveryStatus:
    with uow:
        notification = uow.notifications.get(command.request_id, command.kind, for_update=True)
        assert notification is not None
        notification.status = status
        notification.last_error = error[:500]
        notification.lease_expires_at = None
        if status is DeliveryStatus.SENT:
            notification.sent_at = utcnow()
        uow.commit()
    return status


def _compose(
    request: AccessRequest,
    kind: NotificationKind,
    *,
    uow: UnitOfWork,
    admin_emails: tuple[str, ...],
    message_id: str,
) -> Email:
    consumer = uow.catalogue.consumer(request.consumer_id)
    plan = uow.catalogue.plan(request.plan_id)
    app = uow.catalogue.app(request.app_id) if request.app_id else None
    assert consumer is not None and plan is not None, "only routed requests get emails"
    products = tuple(ProductLine(p.id, p.name) for p in uow.catalogue.products(request.product_ids))
    app_name = app.name if app else (request.new_app_name or "")
    context: object
    if kind is NotificationKind.APPROVE:
        credential = uow.credentials.for_request(request.id)
        assert credential is not None and app is not None, "approve email follows provisioning"
        context = ApproveContext(
            request_id=request.id,
            consumer_name=consumer.name,
            app_id=app.id,
            app_name=app_name,
            plan_name=plan.name,
            products=products,
            rate_limit_per_minute=credential.rate_limit_per_minute,
            monthly_quota=credential.monthly_quota,
            credential_kind=credential.kind.value,
            credential_public_id=credential.public_id,
        )
        to: tuple[str, ...] = (consumer.email,)
    elif kind is NotificationKind.REJECT:
        context = RejectContext(
            request_id=request.id,
            consumer_name=consumer.name,
            app_name=app_name,
            plan_name=plan.name,
            products=products,
            reason=request.status_reason,
        )
        to = (consumer.email,)
    else:
        context = ReviewContext(
            request_id=request.id,
            consumer_id=consumer.id,
            consumer_name=consumer.name,
            consumer_email=consumer.email,
            app_name=app_name,
            plan_name=plan.name,
            products=products,
            justification=request.justification or "",
        )
        to = admin_emails
    return Email(kind=kind, to=to, message_id=message_id, context=context)
