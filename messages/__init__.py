"""The versioned wire contracts: what crosses a process boundary, as ids and primitives.

Every message travels inside dramatiq's JSON envelope (see ``asyncapi.yaml``) with
the contract's JSON object as the single positional argument.
"""

from messages.routes import ROUTES, Route, route_for_command
from messages.v1 import (
    AccessRequestSubmitted,
    AdminDecision,
    ConsumerRef,
    IssueCredentials,
    NewApp,
    PushCredentialChange,
    SendNotification,
)

__all__ = [
    "ROUTES",
    "AccessRequestSubmitted",
    "AdminDecision",
    "ConsumerRef",
    "IssueCredentials",
    "NewApp",
    "PushCredentialChange",
    "Route",
    "SendNotification",
    "route_for_command",
]
