"""Where each contract travels: its queue and the dramatiq actor that consumes it.

Queue names are ``<prefix>.<queue>``; the prefix is ``ACCESSFLOW_QUEUE_PREFIX``
(``accessflow`` unless set), so one broker can host isolated deployments.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from domain import commands
from messages import v1


@dataclass(frozen=True)
class Route:
    actor_name: str
    queue: str
    contract: type[BaseModel]

    def queue_name(self, prefix: str) -> str:
        return f"{prefix}.{self.queue}"


SUBMIT = Route("access_request.route", "requests", v1.AccessRequestSubmitted)
DECIDE = Route("access_request.decide", "decisions", v1.AdminDecision)
ISSUE = Route("credentials.issue", "credentials", v1.IssueCredentials)
NOTIFY = Route("notifications.send", "notifications", v1.SendNotification)

#: Every route, in the order a request travels them.
ROUTES: tuple[Route, ...] = (SUBMIT, DECIDE, ISSUE, NOTIFY)


def route_for_command(command: commands.Command) -> tuple[Route, dict[str, object]]:
    """The route of an internal command, and its wire payload."""
    match command:
        case commands.IssueCredentials():
            return ISSUE, v1.IssueCredentials(request_id=command.request_id).model_dump(mode="json")
        case commands.SendNotification():
            payload = v1.SendNotification(request_id=command.request_id, kind=command.kind.value)
            return NOTIFY, payload.model_dump(mode="json")
    raise TypeError(f"no route for {type(command).__name__}")
