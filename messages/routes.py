"""Where each contract travels: its queue and the dramatiq actor that consumes it.

Queue names are ``<prefix>.<queue>``; the prefix is ``ACCESSFLOW_QUEUE_PREFIX``
(``accessflow`` unless set), so one broker can host isolated deployments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from domain import commands
from messages import v1, v2


@dataclass(frozen=True)
class Route:
    actor_name: str
    queue: str
    #: The current contract.
    contract: type[BaseModel]
    #: Older contracts still read off the wire, by the payload's ``version``, while producers move over.
    legacy: Mapping[int, type[BaseModel]] = field(default_factory=dict)
    #: Outside parties (portals, admin tools) publish here; the other queues take only accessflow's own.
    external: bool = False

    def queue_name(self, prefix: str) -> str:
        return f"{prefix}.{self.queue}"

    def contract_for(self, payload: Mapping[str, Any]) -> type[BaseModel]:
        """The contract of the payload's version: a legacy one if it names one, else the current one."""
        version = payload.get("version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version in self.legacy:
            return self.legacy[version]
        return self.contract


SUBMIT = Route(
    "access_request.route",
    "requests",
    v2.AccessRequestSubmitted,
    legacy={1: v1.AccessRequestSubmitted},
    external=True,
)
DECIDE = Route(
    "access_request.decide", "decisions", v2.AdminDecision, legacy={1: v1.AdminDecision}, external=True
)
#: Admin operations on credentials share the decisions queue: the same signers, the same exchange and pool.
OPERATE = Route("credentials.operate", "decisions", v2.CredentialOperation, external=True)
#: Bulk decisions too: the same signers, the same exchange and pool as a single decision.
DECIDE_BULK = Route("access_request.decide_bulk", "decisions", v2.BulkDecision, external=True)
ISSUE = Route("credentials.issue", "credentials", v1.IssueCredentials)
NOTIFY = Route("notifications.send", "notifications", v1.SendNotification)
#: Credential changes on their way to the gateway (:class:`domain.ports.Gateway`): a queue of its own,
#: so that a slow or unreachable gateway never holds back issuing or email, and its pool scales alone.
PUSH = Route("gateway.push", "gateway", v1.PushCredentialChange)

#: Every route, in the order a request travels them.
ROUTES: tuple[Route, ...] = (SUBMIT, DECIDE, OPERATE, DECIDE_BULK, ISSUE, NOTIFY, PUSH)
#: One route per queue, the first that consumes it: for whatever walks the queues rather than the actors
#: (depths, consumers, pools), which would count the decisions queue twice in :data:`ROUTES`.
QUEUE_ROUTES: tuple[Route, ...] = tuple({route.queue: route for route in reversed(ROUTES)}.values())[::-1]
#: Every queue the routes consume, once each, in the order of :data:`ROUTES`.
QUEUES: tuple[str, ...] = tuple(route.queue for route in QUEUE_ROUTES)


def route_for_command(command: commands.Command) -> tuple[Route, dict[str, object]]:
    """The route of an internal command, and its wire payload."""
    match command:
        case commands.IssueCredentials():
            return ISSUE, v1.IssueCredentials(request_id=command.request_id).model_dump(mode="json")
        case commands.SendNotification():
            payload = v1.SendNotification(
                request_id=command.request_id, kind=command.kind.value, topic=command.topic
            ).model_dump(mode="json")
            if not command.topic:  # left out, as before topics: a worker not yet upgraded reads it
                del payload["topic"]
            return NOTIFY, payload
        case commands.PushCredentialChange():
            push = v1.PushCredentialChange(
                credential_id=command.credential_id, change=command.change, revision=command.revision
            )
            return PUSH, push.model_dump(mode="json")
    raise TypeError(f"no route for {type(command).__name__}")
