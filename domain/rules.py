"""Approval rules and throttles: how a plan routes a valid request, beyond its auto-approve flag.

A plan's rules are read from the catalogue and evaluated in order; the first that matches
decides, and the verdict says which one did, in words the audit trail keeps::

    rule 1: email domain acme.example is trusted          -> approved
    rule 2: consumer acme holds an active credential ...  -> approved
    rule 3: email domain spam.example is refused: ...     -> rejected
    rule 4: plan 'partner' requires 2 approval(s) of ... -> pending_review, until 2 admins approve
    (no rule matched) plan 'partner' requires manual approval  -> pending_review

A plan without rules routes exactly as its ``auto_approve`` flag says.

Throttles limit what one consumer may have on a plan: open requests (submitted, pending
review or approved), and requests received in the last hour. A request over a limit is
invalid, with a reason that names the limit; the caller counts under a per-consumer lock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


class InvalidRule(ValueError):
    """A rule in the catalogue that cannot be evaluated; the message says what is wrong."""


class RuleKind(enum.StrEnum):
    #: Approve when the consumer's email domain is one of ``domains``.
    TRUSTED_DOMAIN = "trusted_domain"
    #: Approve when the consumer already holds an active credential on the plan.
    HOLDS_ACTIVE_CREDENTIAL = "holds_active_credential"
    #: Reject, with ``reason``, when the consumer's email domain is one of ``domains``.
    REJECTED_DOMAIN = "rejected_domain"
    #: Always matches: review, approved once ``required`` distinct admins (of ``admins``, if listed)
    #: approve; one rejection ends it.
    APPROVERS = "approvers"


class Action(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    REVIEW = "review"


@dataclass(frozen=True)
class Rule:
    kind: RuleKind
    #: Lower-case email domains, for the domain rules.
    domains: tuple[str, ...] = ()
    #: What a rejected consumer is told, for ``rejected_domain``.
    reason: str = ""
    #: For ``approvers``: how many distinct admins must approve (N) ...
    required: int = 0
    #: ... and of which admins (M); empty: any admin.
    admins: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entry: Mapping[str, Any], position: int = 1) -> Rule:
        """A rule from its catalogue form (``{"kind": "trusted_domain", "domains": [...]}``).

        Raises:
          InvalidRule: naming the rule's position and what is wrong with it.
        """
        where = f"rule {position}"
        if not isinstance(entry, Mapping):
            raise InvalidRule(f"{where}: must be a mapping with a 'kind', got {entry!r}")
        kind_text = entry.get("kind")
        try:
            kind = RuleKind(str(kind_text))
        except ValueError:
            known = ", ".join(k.value for k in RuleKind)
            raise InvalidRule(f"{where}: unknown kind {kind_text!r} (known: {known})") from None
        allowed = {"kind"} | _FIELDS[kind]
        extra = sorted(set(entry) - allowed)
        if extra:
            raise InvalidRule(f"{where} ({kind.value}): unexpected field(s) {', '.join(extra)}")
        domains: tuple[str, ...] = ()
        if "domains" in allowed:
            raw = entry.get("domains")
            if not isinstance(raw, list) or not raw or not all(isinstance(d, str) for d in raw):
                raise InvalidRule(f"{where} ({kind.value}): 'domains' must be a non-empty list of domains")
            domains = tuple(d.strip().lower() for d in raw)
            bad = [d for d in domains if not _looks_like_domain(d)]
            if bad:
                raise InvalidRule(f"{where} ({kind.value}): not an email domain: {', '.join(bad)}")
        reason = ""
        if kind is RuleKind.REJECTED_DOMAIN:
            reason = entry.get("reason", "")
            if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
                raise InvalidRule(f"{where} ({kind.value}): needs a 'reason' (1 to 500 characters)")
            reason = reason.strip()
        required: int = 0
        admins: tuple[str, ...] = ()
        if kind is RuleKind.APPROVERS:
            required, admins = _approvers(entry, where)
        return cls(kind=kind, domains=domains, reason=reason, required=required, admins=admins)

    def to_json(self) -> dict[str, Any]:
        """The catalogue form :meth:`parse` reads back."""
        out: dict[str, Any] = {"kind": self.kind.value}
        if self.domains:
            out["domains"] = list(self.domains)
        if self.reason:
            out["reason"] = self.reason
        if self.required:
            out["required"] = self.required
        if self.admins:
            out["admins"] = list(self.admins)
        return out


#: The most approvals a rule may ask for.
MAX_APPROVALS = 10


def _approvers(entry: Mapping[str, Any], where: str) -> tuple[int, tuple[str, ...]]:
    required = entry.get("required")
    if not isinstance(required, int) or isinstance(required, bool) or not 1 <= required <= MAX_APPROVALS:
        raise InvalidRule(f"{where} (approvers): 'required' must be a whole number from 1 to {MAX_APPROVALS}")
    raw = entry.get("admins", [])
    if not isinstance(raw, list) or not all(isinstance(a, str) and a.strip() for a in raw):
        raise InvalidRule(f"{where} (approvers): 'admins' must be a list of admin ids")
    admins = tuple(a.strip() for a in raw)
    if len(set(admins)) != len(admins):
        raise InvalidRule(f"{where} (approvers): 'admins' names an admin twice")
    if admins and required > len(admins):
        raise InvalidRule(
            f"{where} (approvers): requires {required} approvals but lists only {len(admins)} admin(s)"
        )
    return required, admins


_FIELDS: dict[RuleKind, frozenset[str]] = {
    RuleKind.TRUSTED_DOMAIN: frozenset({"domains"}),
    RuleKind.HOLDS_ACTIVE_CREDENTIAL: frozenset(),
    RuleKind.REJECTED_DOMAIN: frozenset({"domains", "reason"}),
    RuleKind.APPROVERS: frozenset({"required", "admins"}),
}


def _looks_like_domain(domain: str) -> bool:
    labels = domain.split(".")
    return (
        len(labels) >= 2
        and len(domain) <= 253
        and all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels)
    )


def parse_rules(entries: Sequence[Mapping[str, Any]]) -> list[Rule]:
    """Every rule of a plan, in order; the first bad one raises :class:`InvalidRule`."""
    return [Rule.parse(entry, position) for position, entry in enumerate(entries, start=1)]


@dataclass(frozen=True)
class Verdict:
    """What the rules decided, and why: ``why`` names the rule, for the audit trail and ``requests show``."""

    action: Action
    why: str
    #: For a rejection: what the consumer is told.
    reason: str = ""
    #: For a review: how many distinct admins must approve, and which may (empty: any).
    approvals_required: int = 1
    approvers: tuple[str, ...] = ()


def email_domain(email: str) -> str:
    return email.rpartition("@")[2].strip().lower()


def needs_credential_check(rules: Sequence[Rule]) -> bool:
    """Whether evaluating ``rules`` may need to know if the consumer holds an active credential."""
    return any(rule.kind is RuleKind.HOLDS_ACTIVE_CREDENTIAL for rule in rules)


def evaluate(
    rules: Sequence[Rule],
    *,
    plan_id: str,
    auto_approve: bool,
    consumer_id: str,
    email: str,
    holds_active_credential: bool = False,
) -> Verdict:
    """Route a valid request: the first rule that matches decides; with none, the plan's flag does.

    Parameters:
      holds_active_credential: whether the consumer holds an active credential on the plan;
        read only by a ``holds_active_credential`` rule (see :func:`needs_credential_check`).
    """
    domain = email_domain(email)
    for position, rule in enumerate(rules, start=1):
        match rule.kind:
            case RuleKind.TRUSTED_DOMAIN if domain in rule.domains:
                return Verdict(Action.APPROVE, f"rule {position}: email domain {domain} is trusted")
            case RuleKind.HOLDS_ACTIVE_CREDENTIAL if holds_active_credential:
                return Verdict(
                    Action.APPROVE,
                    f"rule {position}: consumer {consumer_id!r} holds an active credential on plan {plan_id!r}",
                )
            case RuleKind.REJECTED_DOMAIN if domain in rule.domains:
                return Verdict(
                    Action.REJECT,
                    f"rule {position}: email domain {domain} is refused: {rule.reason}",
                    reason=rule.reason,
                )
            case RuleKind.APPROVERS:
                of = f" of admins {', '.join(rule.admins)}" if rule.admins else " of distinct admins"
                return Verdict(
                    Action.REVIEW,
                    f"rule {position}: plan {plan_id!r} requires {rule.required} approval(s){of}",
                    approvals_required=rule.required,
                    approvers=rule.admins,
                )
    no_rule = "no rule matched; " if rules else ""
    if auto_approve:
        return Verdict(Action.APPROVE, f"{no_rule}plan {plan_id!r} is auto-approve")
    return Verdict(Action.REVIEW, f"{no_rule}plan {plan_id!r} requires manual approval")


# --- throttles ---------------------------------------------------------------------------------


#: The window of ``max_requests_per_consumer_per_hour``.
THROTTLE_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class Throttle:
    """A plan's limits per consumer; ``None``: no limit."""

    #: Requests of one consumer on the plan that may be open (submitted, pending review, approved).
    max_open: int | None = None
    #: Requests of one consumer on the plan received in the last hour (invalid ones do not count).
    max_per_hour: int | None = None

    @property
    def applies(self) -> bool:
        return self.max_open is not None or self.max_per_hour is not None


@dataclass(frozen=True)
class RequestCounts:
    """What one consumer has on one plan, not counting the request being routed."""

    open: int
    last_hour: int


def throttle_refusal(
    throttle: Throttle, counts: RequestCounts, *, consumer_id: str, plan_id: str
) -> str | None:
    """Why one more request would go over a limit, or ``None`` if it would not."""
    if throttle.max_open is not None and counts.open >= throttle.max_open:
        return (
            f"throttled: consumer {consumer_id!r} has {counts.open} open request(s) on plan "
            f"{plan_id!r}, the most allowed is {throttle.max_open}"
        )
    if throttle.max_per_hour is not None and counts.last_hour >= throttle.max_per_hour:
        return (
            f"throttled: consumer {consumer_id!r} sent {counts.last_hour} request(s) on plan "
            f"{plan_id!r} in the last hour, the most allowed is {throttle.max_per_hour}"
        )
    return None
