"""Every error the domain raises.

::

    AccessflowError
     +-- IllegalTransition      a state change the state machine forbids
     +-- RuleViolation          a request breaks a catalogue rule (becomes INVALID)
     +-- NotFound               a referenced row does not exist
     +-- TransientError         a dependency failed; retrying may succeed
     +-- PermanentDeliveryError a dependency refused for good; never retried
     +-- IssuerRefused          the credential issuer refused for good; the request fails provisioning
 +-- Unauthorized           a party said something it may not say; recorded, never retried
 +-- Duplicate              another delivery of the same message committed first; this one wrote nothing
"""

from __future__ import annotations


class AccessflowError(Exception):
    """Base class of every error raised by accessflow's own code."""


class IllegalTransition(AccessflowError):
    """An access request was asked to move to a state it cannot reach from its current one."""


class RuleViolation(AccessflowError):
    """A request breaks one of the catalogue rules; ``reason`` says which, in words for humans."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotFound(AccessflowError):
    """A referenced row (request, app, credential) does not exist."""


class TransientError(AccessflowError):
    """A dependency failed in a way that a later attempt may not (SMTP 4xx, a dropped connection)."""


class PermanentDeliveryError(AccessflowError):
    """A dependency refused in a way no retry can fix (SMTP 5xx); recorded, never retried."""


class IssuerRefused(AccessflowError):
    """The credential issuer (a gateway, an identity provider) refused in a way no retry can fix.

    The request moves to ``provisioning_failed`` with ``reason``, for an operator to retry.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthorized(AccessflowError):
    """A message from a party that may not send it (a portal speaking for another's consumer).

    It changes nothing; the worker records it, with ``reason``, as a forged message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Duplicate(AccessflowError):
    """Another delivery of the same message (its request or decision id) committed first.

    Raised at a write that the other one's row refuses (a unique key), when the two ran at
    once and neither saw the other's row when it looked. The transaction wrote nothing; the
    message is the duplicate it is, and nothing is to be retried.
    """
