"""The actors: one per route; the admin's credential operations and bulk decisions share the decisions queue. Each gets its contract decoded (infra.messaging.actors), calls a handler, returns.

``sender`` is the AMQP user that first published the message, as RabbitMQ validated it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from domain import handlers
from messages import routes, v1, v2
from workers.registry import Actor, actor

if TYPE_CHECKING:
    from infra.bootstrap import Services


@actor(routes.SUBMIT)
def route_request(
    message: v2.AccessRequestSubmitted | v1.AccessRequestSubmitted, services: Services, sender: str | None
) -> None:
    handlers.route_request(
        message.to_command(sender),
        uow=services.uow(),
        accept_v1_submissions=services.settings.accept_v1_submissions,
        review_deadline_hours=services.settings.review_deadline_hours,
    )


@actor(routes.DECIDE)
def apply_decision(
    message: v2.AdminDecision | v1.AdminDecision, services: Services, sender: str | None
) -> None:
    handlers.decide(
        message.to_command(sender),
        uow=services.uow(),
        verify=services.verify_signature,
        audience=services.settings.queue_prefix,
        max_skew=timedelta(seconds=services.settings.decision_max_skew_seconds),
    )


@actor(routes.OPERATE)
def operate_credentials(message: v2.CredentialOperation, services: Services, sender: str | None) -> None:
    handlers.operate_credentials(
        message.to_command(sender),
        uow=services.uow(),
        issuer=services.issuer,
        sealer=services.sealer(),
        portal_sealer=services.portal_sealer,
        verify=services.verify_signature,
        audience=services.settings.queue_prefix,
        max_skew=timedelta(seconds=services.settings.decision_max_skew_seconds),
        gateway_configured=services.gateway is not None,
        review_deadline_hours=services.settings.review_deadline_hours,
    )


@actor(routes.DECIDE_BULK)
def decide_bulk(message: v2.BulkDecision, services: Services, sender: str | None) -> None:
    handlers.decide_bulk(
        message.to_command(sender),
        uow=services.uow(),
        verify=services.verify_signature,
        audience=services.settings.queue_prefix,
        max_skew=timedelta(seconds=services.settings.decision_max_skew_seconds),
    )


@actor(routes.ISSUE)
def issue_credentials(message: v1.IssueCredentials, services: Services, sender: str | None) -> None:
    handlers.issue_credentials(
        message.to_command(),
        uow=services.uow(),
        issuer=services.issuer,
        sealer=services.sealer(),
        portal_sealer=services.portal_sealer,
        gateway_configured=services.gateway is not None,
    )


@actor(routes.NOTIFY)
def send_notification(message: v1.SendNotification, services: Services, sender: str | None) -> None:
    handlers.send_notification(
        message.to_command(),
        uow=services.uow(),
        mailer=services.mailer,
        admin_emails=services.settings.admin_emails,
        escalation_emails=services.settings.escalation_emails,
        message_id_domain=services.settings.message_id_domain,
    )


@actor(routes.PUSH)
def push_to_gateway(message: v1.PushCredentialChange, services: Services, sender: str | None) -> None:
    handlers.push_to_gateway(message.to_command(), uow=services.uow(), gateway=services.gateway)


#: Every actor; :func:`infra.bootstrap.wire` registers exactly these.
ACTORS: tuple[Actor[Any], ...] = (
    route_request,
    apply_decision,
    operate_credentials,
    decide_bulk,
    issue_credentials,
    send_notification,
    push_to_gateway,
)
