"""The use cases: one function per command, dependencies passed as keyword arguments.

Each handler is idempotent. It reloads state by id inside one transaction, decides
from that state rather than from the message, and queues its follow-up commands in
the outbox of the same transaction, so nothing leaves before the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from domain import commands, events, outcomes
from domain.errors import (
    Duplicate,
    IllegalTransition,
    IssuerRefused,
    NotFound,
    PermanentDeliveryError,
    TransientError,
    Unauthorized,
)
from domain.model import (
    LIVE_CREDENTIAL_STATUSES,
    MAX_BULK_ITEMS,
    AccessRequest,
    ActorKind,
    App,
    Attribution,
    AuthMethod,
    BulkDecision,
    BulkItemResult,
    Catalogue,
    Credential,
    CredentialChanged,
    CredentialChangeKind,
    CredentialOperation,
    CredentialOperationKind,
    CredentialStatus,
    Decision,
    DecisionOutcome,
    DeliveryStatus,
    Notification,
    NotificationKind,
    Plan,
    RequestKind,
    Status,
    review_deadline,
    throttle_for,
    utcnow,
)
from domain.notifications import (
    ApproveContext,
    ExpiryContext,
    ProductLine,
    RejectContext,
    ReviewContext,
    ReviewDeadlineContext,
    ReviewExpiredContext,
)
from domain.ports import (
    CredentialChange,
    CredentialIssuer,
    Email,
    Gateway,
    Mailer,
    PortalSealer,
    SecretSealer,
    SignatureVerifier,
    UnitOfWork,
)
from domain.rules import THROTTLE_WINDOW, needs_credential_check

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
        case events.ReviewReminderDue():
            # One email per point and deadline: a new deadline gets its reminders again.
            topic = f"{event.point}/{event.deadline.astimezone(UTC):%Y%m%dT%H%M%S}"
            return [commands.SendNotification(event.request_id, NotificationKind.REVIEW_REMINDER, topic)]
        case events.ReviewEscalated():
            topic = f"{event.deadline.astimezone(UTC):%Y%m%dT%H%M%S}"
            return [commands.SendNotification(event.request_id, NotificationKind.REVIEW_ESCALATION, topic)]
        case events.RequestExpired():
            return [commands.SendNotification(event.request_id, NotificationKind.REVIEW_EXPIRED)]
        case _:
            return []


#: What the portal hears for each domain event: the event's name and the status it reports.
PORTAL_EVENTS: dict[type[events.Event], tuple[str, Status]] = {
    events.RequestSubmitted: ("access_request.submitted", Status.SUBMITTED),
    events.RequestParkedForReview: ("access_request.pending_review", Status.PENDING_REVIEW),
    events.RequestApproved: ("access_request.approved", Status.APPROVED),
    events.RequestRejected: ("access_request.rejected", Status.REJECTED),
    events.RequestInvalidated: ("access_request.invalid", Status.INVALID),
    events.CredentialsProvisioned: ("access_request.provisioned", Status.PROVISIONED),
    events.ProvisioningFailed: ("access_request.provisioning_failed", Status.PROVISIONING_FAILED),
    events.RequestExpired: ("access_request.expired", Status.EXPIRED),
}


def _announce(
    uow: UnitOfWork,
    request: AccessRequest,
    name: str,
    status: Status | CredentialStatus,
    details: Mapping[str, object],
    reason: str | None = None,
) -> None:
    """Tell the request's portal, in the request's sequence; ``status`` is the request's, or its credential's."""
    if request.portal_id is None:  # a v1 submission names no portal to tell
        return
    if reason is None:  # the reason of the transition into this status, from the audit trail
        reason = next((e.reason for e in reversed(request.history) if e.to_status is status), "")
    uow.outbox.announce(
        events.PortalEvent(
            portal_id=request.portal_id,
            request_id=request.id,
            sequence=request.next_event_sequence(),
            name=name,
            status=status.value,
            reason=reason,
            occurred_at=utcnow(),
            details=details,
        )
    )


def _queue_follow_ups(uow: UnitOfWork, request: AccessRequest) -> None:
    """Queue each recorded event's commands, and tell the portal, in the order they happened."""
    while request.events:
        event = request.events.pop(0)
        if type(event) in PORTAL_EVENTS:
            name, status = PORTAL_EVENTS[type(event)]
            _announce(uow, request, name, status, {})
        for command in follow_ups(event):
            uow.outbox.put(command)


def _authenticate_submission(
    command: commands.RouteRequest, uow: UnitOfWork, *, accept_v1_submissions: bool
) -> None:
    if command.portal_id is None:
        if not accept_v1_submissions:
            raise Unauthorized(
                "contract v1 names no portal, and v1 submissions are switched off "
                "(ACCESSFLOW_ACCEPT_V1_SUBMISSIONS): publish contract v2 with your portal_id"
            )
        return
    portal = uow.portals.get(command.portal_id)
    if portal is None:
        raise Unauthorized(f"unknown portal {command.portal_id!r}")
    why = portal.refuses_submission(consumer_id=command.consumer_id, sender=command.sender)
    if why is not None:
        raise Unauthorized(why)


def route_request(
    command: commands.RouteRequest,
    *,
    uow: UnitOfWork,
    accept_v1_submissions: bool = False,
    review_deadline_hours: float | None = None,
) -> Status:
    """Validate a submitted request and approve it or park it for review.

    The sending portal is checked first: a portal submits only for its own consumers,
    as its own AMQP user. A v1 submission names no portal and is refused unless
    ``accept_v1_submissions``. A request parked for review gets its deadline from its plan,
    else from ``review_deadline_hours`` (``None``: no deadline).

    Returns:
      The request's status after routing (its current one if this is a redelivery).

    A duplicate of a submission being routed at the same moment writes nothing and is
    ignored as any duplicate is: one INFO line.

    Raises:
      Unauthorized: the sender may not submit this request; nothing was written.
    """
    try:
        return _route(
            command,
            uow=uow,
            accept_v1_submissions=accept_v1_submissions,
            review_deadline_hours=review_deadline_hours,
        )
    except Duplicate:
        with uow:
            routed = uow.requests.get(command.request_id)
        assert routed is not None, "a duplicate is refused only by a committed twin"
        uow.record_outcome(
            outcomes.RequestDuplicateIgnored(command.request_id, routed.status.value, concurrent=True)
        )
        return routed.status


def _route(
    command: commands.RouteRequest,
    *,
    uow: UnitOfWork,
    accept_v1_submissions: bool,
    review_deadline_hours: float | None,
) -> Status:
    with uow:
        _authenticate_submission(command, uow, accept_v1_submissions=accept_v1_submissions)
        existing = uow.requests.get(command.request_id)
        if existing is not None:
            uow.record_outcome(
                outcomes.RequestDuplicateIgnored(command.request_id, existing.status.value, concurrent=False)
            )
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
            portal_id=command.portal_id,
            kind=RequestKind.ACCESS if command.credential_id is None else RequestKind.PLAN_CHANGE,
            credential_id=command.credential_id,
        )
        request.record_submission()
        catalogue = uow.catalogue.slice_for(
            plan_id=command.plan_id,
            product_ids=command.product_ids,
            consumer_id=command.consumer_id,
            app_id=command.app_id,
        )
        if command.credential_id is not None:
            catalogue.credential = uow.credentials.get(command.credential_id)
        _load_routing_facts(uow, request, catalogue)
        request.route(catalogue)
        _start_review_clock(request, catalogue.plan, review_deadline_hours)
        if request.status is Status.APPROVED:
            _provide_app(uow, request)
        uow.requests.add(request)
        _queue_follow_ups(uow, request)
        uow.record_outcome(
            outcomes.RequestRouted(
                request_id=request.id,
                outcome="auto_approved" if request.status is Status.APPROVED else request.status.value,
                portal_id=request.portal_id,
                consumer_id=request.consumer_id,
                plan_id=request.plan_id,
                app_id=request.app_id,
                reason=request.status_reason,
                routed_by=request.routed_by,
            )
        )
        uow.commit()
        return request.status


def _start_review_clock(request: AccessRequest, plan: Plan | None, default_hours: float | None) -> None:
    """Give a request just parked for review its deadline (:func:`domain.model.review_deadline`)."""
    if request.status is Status.PENDING_REVIEW and plan is not None:
        request.set_review_deadline(review_deadline(plan, default_hours, request.updated_at))


def _load_routing_facts(uow: UnitOfWork, request: AccessRequest, catalogue: Catalogue) -> None:
    """What the plan's throttles and rules need to know, read only when the plan has them.

    A throttled plan counts the consumer's requests under a lock per consumer, held until
    this transaction commits: concurrent submissions of one consumer are routed one at a
    time, so none slips under a limit another is taking. A plan with neither pays nothing.
    """
    plan, consumer = catalogue.plan, catalogue.consumer
    if plan is None or consumer is None:
        return  # invalid anyway: nothing to count
    if throttle_for(plan, consumer).applies:
        catalogue.counts = uow.requests.counts_for_throttle(
            consumer_id=request.consumer_id, plan_id=plan.id, since=request.received_at - THROTTLE_WINDOW
        )
    if needs_credential_check(plan.rules):
        catalogue.holds_active_credential = uow.credentials.holds_active(
            consumer_id=request.consumer_id, plan_id=plan.id
        )


def _provide_app(uow: UnitOfWork, request: AccessRequest) -> None:
    """Create the new app a request asked for, as it is approved: a rejected or invalid request leaves none.

    Its id derives from the request's: the same request handled twice at once makes one
    app, and the second insert is refused as the :class:`Duplicate` it is.
    """
    if request.app_id is not None:
        return
    app = App(
        id=derived_id("app", request.id),
        consumer_id=request.consumer_id,
        name=request.new_app_name or "",
        description=request.new_app_description or "",
    )
    uow.catalogue.add_app(app)
    request.app_id = app.id


def _refusal(
    uow: UnitOfWork,
    *,
    sender: str | None,
    signature: commands.Signature | None,
    admin_id: str,
    signed_at: datetime,
    verify: SignatureVerifier,
    audience: str,
    max_skew: timedelta,
    now: datetime,
    noun: str = "decision",
    time_field: str = "decided_at",
) -> str | None:
    """Why a message is not shown to come from the admin it names, or ``None`` if it is.

    The signature is checked before anything else is believed, and before any side effect;
    decisions and credential operations are authenticated alike.
    """
    if sender is not None and uow.portals.by_broker_user(sender) is not None:
        return f"rejected_auth: {noun}s are not accepted from portal user {sender!r}"
    if signature is None:
        return "rejected_auth: missing signature (an unsigned v1 decision)"
    key = uow.admin_keys.key(signature.key_id)
    if key is None:
        return f"rejected_auth: unknown key {signature.key_id!r}"
    if key.revoked_at is not None:
        return f"rejected_auth: key {signature.key_id!r} was revoked"
    if key.admin_id != admin_id:
        return f"rejected_auth: key {signature.key_id!r} is not admin {admin_id!r}'s"
    if not verify(key.public_key, signature.value, signature.signed_bytes):
        return "rejected_auth: bad signature"
    if signature.audience != audience:
        return f"rejected_auth: signed for {signature.audience!r}, not this deployment ({audience!r})"
    age = now - signed_at
    if abs(age) > max_skew:
        return (
            f"rejected_auth: stale {noun}: {time_field} is {age.total_seconds():.0f}s off this "
            f"worker's clock, more than the {max_skew.total_seconds():.0f}s allowed"
        )
    return None


def decide(
    command: commands.DecideRequest,
    *,
    uow: UnitOfWork,
    verify: SignatureVerifier,
    audience: str,
    max_skew: timedelta = timedelta(minutes=5),
    now: Callable[[], datetime] = utcnow,
) -> DecisionOutcome:
    """Apply a signed admin decision to a pending request; record, and ignore, any other decision.

    A decision that is not signed by an active key of the admin it names, was signed for
    another deployment, or is older (or newer) than ``max_skew`` is recorded as refused
    and changes nothing. Its id is recorded either way, so a replay of it changes nothing,
    and a duplicate applied at the same moment writes nothing: one INFO line, no retry.
    """
    try:
        return _decide(command, uow=uow, verify=verify, audience=audience, max_skew=max_skew, now=now)
    except Duplicate:
        uow.record_outcome(
            outcomes.DecisionDuplicateIgnored(command.decision_id, command.request_id, concurrent=True)
        )
        return DecisionOutcome.IGNORED


def _decide(
    command: commands.DecideRequest,
    *,
    uow: UnitOfWork,
    verify: SignatureVerifier,
    audience: str,
    max_skew: timedelta,
    now: Callable[[], datetime],
    authenticated: bool = False,
) -> DecisionOutcome:
    """``authenticated``: the caller has checked the signature already (one item of a bulk decision)."""
    with uow:
        if uow.decisions.get(command.decision_id) is not None:
            uow.record_outcome(
                outcomes.DecisionDuplicateIgnored(command.decision_id, command.request_id, concurrent=False)
            )
            return DecisionOutcome.IGNORED
        refusal = (
            None
            if authenticated
            else _refusal(
                uow,
                sender=command.sender,
                signature=command.signature,
                admin_id=command.admin_id,
                signed_at=command.decided_at,
                verify=verify,
                audience=audience,
                max_skew=max_skew,
                now=now(),
            )
        )
        request = None if refusal else uow.requests.get(command.request_id, for_update=True)
        outcome, why = DecisionOutcome.APPLIED, ""
        if refusal is not None:
            outcome, why = DecisionOutcome.REFUSED, refusal
        elif request is None:
            outcome, why = DecisionOutcome.IGNORED, "no such request"
        elif request.status is not Status.PENDING_REVIEW:
            outcome, why = DecisionOutcome.IGNORED, f"request is {request.status.value}, not pending review"
        elif command.approve and request.needs_several_approvals:
            outcome, why = _count_approval(uow, request, command)
        elif command.approve:
            request.approve(admin_id=command.admin_id, reason=command.reason)
            _provide_app(uow, request)
        else:
            request.reject(admin_id=command.admin_id, reason=command.reason)
        admin_email = command.admin_email or (uow.admin_keys.admin_email(command.admin_id) or "")
        uow.decisions.add(
            Decision(
                id=command.decision_id,
                request_id=command.request_id,
                approve=command.approve,
                admin_id=command.admin_id,
                admin_email=admin_email,
                reason=command.reason,
                decided_at=command.decided_at,
                outcome=outcome,
                outcome_reason=why,
                key_id=command.signature.key_id if command.signature and not refusal else None,
            )
        )
        if request is not None:
            _queue_follow_ups(uow, request)
        if refusal is None:
            uow.record_outcome(
                outcomes.RequestDecided(
                    request_id=command.request_id,
                    decision_id=command.decision_id,
                    admin_id=command.admin_id,
                    approve=command.approve,
                    outcome=outcome.value,
                    status=request.status.value if request is not None else None,
                    reason=why,
                )
            )
        uow.commit()
        if refusal is not None:  # told once recorded: a twin refused at the same moment is a duplicate
            uow.record_outcome(
                outcomes.DecisionRefused(command.decision_id, command.request_id, command.admin_id, refusal)
            )
        return outcome


def decide_bulk(
    command: commands.DecideBulk,
    *,
    uow: UnitOfWork,
    verify: SignatureVerifier,
    audience: str,
    max_skew: timedelta = timedelta(minutes=5),
    now: Callable[[], datetime] = utcnow,
) -> BulkDecision:
    """Apply an admin's signed bulk decision to each pending request it selects, once.

    Authenticated once, as a single decision is; a refused bulk is recorded and decides
    nothing. Each request selected (by id, or by the filter: pending review, oldest first,
    at most :data:`~domain.model.MAX_BULK_ITEMS`) is then decided on its own, in its own
    transaction, as a decision whose id is derived from the bulk's and the request's: it is
    in the request's trail and tells its portal, and a replay or a redelivery after a crash
    half-way re-applies nothing and decides the rest. The bulk is recorded last, with a
    result per request; its id makes a replay change nothing.
    """
    try:
        return _decide_bulk(command, uow=uow, verify=verify, audience=audience, max_skew=max_skew, now=now)
    except Duplicate:
        uow.record_outcome(outcomes.BulkDecisionDuplicateIgnored(command.bulk_id, concurrent=True))
        with uow:
            recorded = uow.bulk_decisions.get(command.bulk_id)
        assert recorded is not None, "a duplicate is refused only by a committed twin"
        return recorded


def _decide_bulk(
    command: commands.DecideBulk,
    *,
    uow: UnitOfWork,
    verify: SignatureVerifier,
    audience: str,
    max_skew: timedelta,
    now: Callable[[], datetime],
) -> BulkDecision:
    with uow:
        recorded = uow.bulk_decisions.get(command.bulk_id)
        if recorded is not None:
            uow.record_outcome(outcomes.BulkDecisionDuplicateIgnored(command.bulk_id, concurrent=False))
            return recorded
        refusal = _refusal(
            uow,
            sender=command.sender,
            signature=command.signature,
            admin_id=command.admin_id,
            signed_at=command.decided_at,
            verify=verify,
            audience=audience,
            max_skew=max_skew,
            now=now(),
            noun="bulk decision",
        )
        bulk = BulkDecision(
            id=command.bulk_id,
            approve=command.approve,
            admin_id=command.admin_id,
            reason=command.reason,
            decided_at=command.decided_at,
            selection=_selection(command),
            outcome=DecisionOutcome.REFUSED if refusal else DecisionOutcome.APPLIED,
            outcome_reason=refusal or "",
            key_id=command.signature.key_id if command.signature and not refusal else None,
        )
        if refusal is not None:
            bulk.results = {request_id: BulkItemResult.REFUSED.value for request_id in command.request_ids}
            return _record_bulk(uow, bulk, refusal)
        selected = list(dict.fromkeys(command.request_ids))[:MAX_BULK_ITEMS] or uow.requests.pending_matching(
            plan_id=command.plan_id,
            consumer_id=command.consumer_id,
            received_before=command.submitted_before,
            limit=MAX_BULK_ITEMS,
        )
    for request_id in selected:
        bulk.results[request_id] = _decide_item(command, request_id, uow=uow, now=now).value
    if not bulk.results:
        bulk.outcome, bulk.outcome_reason = DecisionOutcome.IGNORED, "no pending request matches"
    with uow:
        return _record_bulk(uow, bulk, None)


def bulk_item_decision_id(bulk_id: str, request_id: str) -> str:
    """The id of the decision a bulk decision makes on one request: the same on every delivery."""
    return derived_id(f"bulk-decision:{bulk_id}", request_id)


def _selection(command: commands.DecideBulk) -> str:
    if command.request_ids:
        return "ids"
    named = (
        ("plan_id", command.plan_id),
        ("consumer_id", command.consumer_id),
        ("submitted_before", _iso(command.submitted_before)),
    )
    return " ".join(f"{name}={value}" for name, value in named if value is not None)


def _decide_item(
    command: commands.DecideBulk, request_id: str, *, uow: UnitOfWork, now: Callable[[], datetime]
) -> BulkItemResult:
    """Decide one request of an authenticated bulk, or read what an earlier delivery decided."""
    decision_id = bulk_item_decision_id(command.bulk_id, request_id)
    item = commands.DecideRequest(
        decision_id=decision_id,
        request_id=request_id,
        approve=command.approve,
        admin_id=command.admin_id,
        admin_email="",
        reason=command.reason,
        decided_at=command.decided_at,
        signature=command.signature,
        sender=command.sender,
    )
    try:
        # The verifier and audience are never used: the bulk was authenticated once, above.
        _decide(
            item,
            uow=uow,
            verify=_verified_already,
            audience="",
            max_skew=timedelta(0),
            now=now,
            authenticated=True,
        )
    except Duplicate:
        uow.record_outcome(outcomes.DecisionDuplicateIgnored(decision_id, request_id, concurrent=True))
    with uow:
        decision = uow.decisions.get(decision_id)
        request = uow.requests.get(request_id)
    assert decision is not None, "a decision is recorded, by this delivery or an earlier one"
    if decision.outcome is DecisionOutcome.APPLIED:
        return BulkItemResult.APPLIED
    if decision.outcome is DecisionOutcome.COUNTED:
        return BulkItemResult.COUNTED
    if request is None:
        return BulkItemResult.NOT_FOUND
    if request.status is not Status.PENDING_REVIEW:  # an ignored decision left it as it was
        return BulkItemResult.ALREADY_DECIDED
    return BulkItemResult.IGNORED


def _verified_already(public_key: str, signature: str, data: bytes) -> bool:
    raise AssertionError("an item of a bulk decision is not verified again")


def _record_bulk(uow: UnitOfWork, bulk: BulkDecision, refusal: str | None) -> BulkDecision:
    uow.bulk_decisions.add(bulk)
    # In the same transaction as the record: the admins hear of it if and only if it is recorded.
    uow.outbox.tell_admins(bulk.settled())
    if refusal is None:
        uow.record_outcome(
            outcomes.BulkDecided(
                bulk_id=bulk.id,
                admin_id=bulk.admin_id,
                approve=bulk.approve,
                selection=bulk.selection,
                results=tuple(bulk.results.items()),
            )
        )
    uow.commit()
    if refusal is not None:  # told once recorded: a twin refused at the same moment is a duplicate
        uow.record_outcome(outcomes.BulkDecisionRefused(bulk.id, bulk.admin_id, refusal))
    return bulk


def _count_approval(
    uow: UnitOfWork, request: AccessRequest, command: commands.DecideRequest
) -> tuple[DecisionOutcome, str]:
    """One approval of a request that needs several: ignored, counted, or the last one, applied.

    The request is locked (``for_update``), so concurrent approvals of it are counted one at
    a time, each seeing the ones committed before it.
    """
    approved_by = uow.decisions.approvers_of(request.id)
    refusal = request.approval_refusal(command.admin_id, approved_by)
    if refusal is not None:
        return DecisionOutcome.IGNORED, refusal
    if request.count_approval(admin_id=command.admin_id, reason=command.reason, approved_by=approved_by):
        _provide_app(uow, request)
        return DecisionOutcome.APPLIED, ""
    return DecisionOutcome.COUNTED, f"approval {len(approved_by) + 1} of {request.approvals_required}"


def issue_credentials(
    command: commands.IssueCredentials,
    *,
    uow: UnitOfWork,
    issuer: CredentialIssuer,
    sealer: SecretSealer,
    portal_sealer: PortalSealer,
    now: Callable[[], datetime] = utcnow,
    gateway_configured: bool = False,
) -> Credential | None:
    """Issue the app's credential for an approved request, with the plan's limits, exactly once.

    A plan-change request issues nothing: the credential it names takes the plan's limits.

    A request from a portal gets its secret sealed to that portal's public key, in the
    ``credentials.issued`` event, and nowhere else: no copy is kept for an operator to
    reveal. A v1 request keeps the old way, a copy sealed at rest for one reveal.

    With ``gateway_configured``, a new credential is also pushed to
    the gateway, through the outbox of the same transaction; without one nothing is queued,
    so a deployment without a gateway pays nothing for it.
    """
    with uow:
        request = uow.requests.get(command.request_id, for_update=True)
        if request is None or request.status is not Status.APPROVED:
            status = request.status.value if request is not None else None
            uow.record_outcome(outcomes.CredentialsNotDue(command.request_id, status))
            return None
        plan = uow.catalogue.plan(request.plan_id)
        if plan is None:  # removed from the catalogue after approval: no retry brings it back
            _fail_provisioning(uow, request, f"plan {request.plan_id!r} no longer exists")
            return None
        assert request.app_id is not None and request.auth_method is not None  # set on approval
        if request.kind is RequestKind.PLAN_CHANGE:
            return _apply_plan_change(uow, request, plan, gateway_configured=gateway_configured)
        portal = uow.portals.get(request.portal_id) if request.portal_id else None
        existing = uow.credentials.for_request(request.id)
        delivery: Mapping[str, str] | None = None
        if existing is not None:  # issued before a crash, state not yet moved
            credential = existing
        else:
            try:
                issued = issuer.issue(request.auth_method)
            except IssuerRefused as refused:
                _fail_provisioning(uow, request, f"the credential issuer refused: {refused.reason}")
                return None
            if portal is not None:
                delivery = portal_sealer.seal_to(portal.public_key, issued.secret)
            credential = Credential(
                id=derived_id("credential", request.id),
                request_id=request.id,
                app_id=request.app_id,
                kind=request.auth_method,
                public_id=issued.public_id,
                secret_hash=issued.secret_hash,
                sealed_secret=None if portal is not None else sealer.seal(issued.secret),
                product_ids=list(request.product_ids),
                rate_limit_per_minute=plan.rate_limit_per_minute,
                monthly_quota=plan.monthly_quota,
                plan_id=plan.id,
                consumer_id=request.consumer_id,
                expires_at=_lifetime_end(plan, now()),
            )
            credential.record_issue(now=credential.created_at, reason=f"issued for request {request.id}")
            uow.credentials.add(credential)
            if gateway_configured:
                uow.outbox.put(commands.PushCredentialChange(credential.id, "issued", 1))
        if delivery is not None:
            _announce(
                uow, request, "credentials.issued", Status.APPROVED, _issued_details(credential, delivery)
            )
        return _provisioned(uow, request, credential)


def gateway_event_id(credential_id: str, revision: int) -> str:
    """The id of a credential's change for the gateway: the same for every attempt at one revision."""
    return derived_id("gateway-push", f"{credential_id}:{revision}")


def push_to_gateway(
    command: commands.PushCredentialChange, *, uow: UnitOfWork, gateway: Gateway | None
) -> CredentialChange | None:
    """Push one change of a credential to the gateway, with the credential as it is stored now.

    The credential is read in a short transaction that is over before the gateway is called,
    so no row or connection is held across the HTTP call. A credential that is gone is
    dropped quietly (one warning line). A retry sends the same event id, so the gateway can
    drop a repeat. A push carries the credential as stored, not as it was when the message was
    queued: a late retry brings the newest state under its older revision, so a gateway that
    keeps the highest revision it has seen loses nothing by ignoring it.

    Returns:
      What was pushed, or ``None`` for a credential that does not exist.

    Raises:
      TransientError: the gateway may take it later; the message is retried with backoff.
      PermanentDeliveryError: the gateway refused it for good, or this worker has no gateway
        configured; never retried, the message is dead-lettered with the reason.
    """
    if gateway is None:  # this pool's settings differ from those of the pool that queued it
        raise PermanentDeliveryError(
            "no gateway is configured in this worker (ACCESSFLOW_GATEWAY_WEBHOOK_URL): "
            "configure it, then replay this dead letter"
        )
    with uow:
        credential = uow.credentials.get(command.credential_id)
        if credential is None:
            uow.record_outcome(
                outcomes.GatewayPushDropped(command.credential_id, command.change, command.revision)
            )
            return None
        consumer_id = credential.consumer_id
        if not consumer_id:  # issued before credentials recorded their consumer (migration 0011)
            request = uow.requests.get(credential.request_id)
            consumer_id = request.consumer_id if request is not None else ""
    in_grace = credential.previous_valid_until is not None
    change = CredentialChange(
        event_id=gateway_event_id(credential.id, command.revision),
        change=command.change,
        revision=command.revision,
        occurred_at=credential.updated_at or credential.created_at,
        credential_id=credential.id,
        public_id=credential.public_id,
        app_id=credential.app_id,
        consumer_id=consumer_id,
        kind=credential.kind.value,
        status=credential.status.value,
        product_ids=tuple(credential.product_ids),
        rate_limit_per_minute=credential.rate_limit_per_minute,
        monthly_quota=credential.monthly_quota,
        secret_hash=credential.secret_hash,
        expires_at=credential.expires_at,
        plan_id=credential.plan_id,
        previous_public_id=credential.previous_public_id if in_grace else None,
        previous_secret_hash=credential.previous_secret_hash if in_grace else None,
        previous_valid_until=credential.previous_valid_until,
    )
    try:
        gateway.push(change)
    except PermanentDeliveryError as refused:
        uow.record_outcome(
            outcomes.GatewayPushRefused(
                credential.id, change.change, change.revision, change.event_id, str(refused)
            )
        )
        raise
    uow.record_outcome(outcomes.GatewayPushed(credential.id, change.change, change.revision, change.event_id))
    return change


def _provisioned(uow: UnitOfWork, request: AccessRequest, credential: Credential) -> Credential:
    """End an approved request in ``provisioned`` with its credential (new, or with its new plan), and commit."""
    request.mark_provisioned(credential.id)
    _queue_follow_ups(uow, request)
    uow.record_outcome(
        outcomes.CredentialsIssued(
            request_id=request.id,
            credential_id=credential.id,
            public_id=credential.public_id,
            app_id=credential.app_id,
            kind=credential.kind.value,
            portal_id=request.portal_id,
        )
    )
    uow.commit()
    return credential


def _fail_provisioning(uow: UnitOfWork, request: AccessRequest, reason: str) -> None:
    """End an approved request in ``provisioning_failed``, told to its portal; the message is done."""
    request.fail_provisioning(reason)
    _queue_follow_ups(uow, request)
    uow.record_outcome(outcomes.ProvisioningFailed(request.id, reason))
    uow.commit()


def retry_provisioning(command: commands.RetryProvisioning, *, uow: UnitOfWork) -> Status:
    """Approve again a request whose provisioning failed, so that its credential is issued anew.

    Returns:
      The request's status afterwards: ``approved`` when retried.

    Raises:
      NotFound: there is no such request.
      IllegalTransition: its provisioning has not failed (it is pending, provisioned...).
    """
    with uow:
        request = uow.requests.get(command.request_id, for_update=True)
        if request is None:
            raise NotFound(f"no request {command.request_id!r}")
        if request.status is not Status.PROVISIONING_FAILED:
            raise IllegalTransition(
                f"request {request.id} is {request.status.value}: only a failed provisioning is retried"
            )
        request.retry_provisioning(operator=command.operator, reason=command.reason)
        _queue_follow_ups(uow, request)
        uow.commit()
        return request.status


def _issued_details(credential: Credential, sealed_secret: Mapping[str, str]) -> dict[str, object]:
    return {"credential": _credential_details(credential), "sealed_secret": dict(sealed_secret)}


def _credential_details(credential: Credential) -> dict[str, object]:
    """The public part of a credential, as a portal's event carries it: never a secret, nor its hash."""
    return {
        "id": credential.id,
        "kind": credential.kind.value,
        "public_id": credential.public_id,
        "app_id": credential.app_id,
        "product_ids": list(credential.product_ids),
        "rate_limit_per_minute": credential.rate_limit_per_minute,
        "monthly_quota": credential.monthly_quota,
        "status": credential.status.value,
        "plan_id": credential.plan_id,
        "revision": credential.revision,
        "expires_at": _iso(credential.expires_at),
        "previous_public_id": credential.previous_public_id if credential.previous_valid_until else None,
        "previous_valid_until": _iso(credential.previous_valid_until),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _lifetime_end(plan: Plan, now: datetime) -> datetime | None:
    return now + timedelta(days=plan.credential_lifetime_days) if plan.credential_lifetime_days else None


# --- the credential lifecycle ----------------------------------------------------------------------

#: The portal event of each change; ``issued`` has its own, with the request's status.
CREDENTIAL_EVENTS: dict[CredentialChangeKind, str] = {
    change: f"credentials.{change.value}"
    for change in CredentialChangeKind
    if change is not CredentialChangeKind.ISSUED
}


def _follow_credential_change(
    uow: UnitOfWork,
    credential: Credential,
    change: CredentialChanged,
    *,
    gateway_configured: bool,
    sealed_secret: Mapping[str, str] | None = None,
) -> None:
    """Tell the owning portal of a credential's change, queue the emails it calls for, and push it
    to the gateway (when one is configured).

    The event goes in the sequence of the request the credential was issued for, so a
    portal orders it with the rest of that request's story. An expiry notice changes nothing
    a gateway enforces, so it is not pushed; every other change is, at its revision.
    """
    if gateway_configured and change.change is not CredentialChangeKind.EXPIRING:
        uow.outbox.put(commands.PushCredentialChange(credential.id, change.change.value, change.revision))
    owner = uow.requests.get(credential.request_id, for_update=True)
    if owner is not None:
        details: dict[str, object] = {"credential": _credential_details(credential)}
        if sealed_secret is not None:
            details["sealed_secret"] = dict(sealed_secret)
        _announce(uow, owner, CREDENTIAL_EVENTS[change.change], credential.status, details, change.reason)
    if change.change is CredentialChangeKind.EXPIRING:
        assert credential.expires_at is not None  # only a credential that expires is noticed
        # One email per credential, point and end date: a new expiry date gets its notices again.
        point = credential.expiry_notices.rsplit(",", 1)[-1]
        topic = f"{credential.id}/{point}/{credential.expires_at.astimezone(UTC):%Y%m%dT%H%M%S}"
        uow.outbox.put(
            commands.SendNotification(credential.request_id, NotificationKind.EXPIRY_NOTICE, topic)
        )
    elif change.change is CredentialChangeKind.EXPIRED:
        uow.outbox.put(
            commands.SendNotification(credential.request_id, NotificationKind.EXPIRED, credential.id)
        )


def _apply_plan_change(
    uow: UnitOfWork, request: AccessRequest, plan: Plan, *, gateway_configured: bool
) -> Credential | None:
    """Give an approved plan change's credential the new plan's limits; the key stays the same."""
    assert request.credential_id is not None  # a plan-change request names its credential
    credential = uow.credentials.get(request.credential_id, for_update=True)
    if credential is None or credential.status not in LIVE_CREDENTIAL_STATUSES:
        status = credential.status.value if credential is not None else "gone"
        _fail_provisioning(
            uow, request, f"credential {request.credential_id} is {status}: its plan cannot change"
        )
        return None
    if credential.plan_id != plan.id:  # not already changed by a delivery that crashed before its commit
        by = Attribution(utcnow(), ActorKind.SYSTEM, "issuer", f"request {request.id} approved", request.id)
        change = credential.change_plan(plan, by)
        _follow_credential_change(uow, credential, change, gateway_configured=gateway_configured)
    return _provisioned(uow, request, credential)


def operate_credentials(
    command: commands.OperateCredentials,
    *,
    uow: UnitOfWork,
    issuer: CredentialIssuer,
    sealer: SecretSealer,
    portal_sealer: PortalSealer,
    verify: SignatureVerifier,
    audience: str,
    max_skew: timedelta = timedelta(minutes=5),
    now: Callable[[], datetime] = utcnow,
    gateway_configured: bool = False,
    review_deadline_hours: float | None = None,
) -> CredentialOperation:
    """Apply an admin's signed operation to the credentials it names, once.

    Authenticated as a decision is, before anything else. The operation is recorded with a
    result per credential it reached, so that a replay of its id changes nothing, and a
    credential in a state the operation does not apply to (revoking one revoked already) is
    left as it is, with the reason. Each change is in the credential's audit trail, told to
    its portal, and pushed to the gateway. A plan change opens a request of kind
    ``plan_change``, routed as an access request is: at once on an auto-approve plan, else
    parked for review.
    """
    try:
        return _operate(
            command,
            uow=uow,
            issuer=issuer,
            sealer=sealer,
            portal_sealer=portal_sealer,
            verify=verify,
            audience=audience,
            max_skew=max_skew,
            now=now,
            gateway_configured=gateway_configured,
            review_deadline_hours=review_deadline_hours,
        )
    except Duplicate:
        uow.record_outcome(
            outcomes.CredentialOperationDuplicateIgnored(command.operation_id, concurrent=True)
        )
        with uow:
            recorded = uow.credential_operations.get(command.operation_id)
        assert recorded is not None, "a duplicate is refused only by a committed twin"
        return recorded


def _operate(
    command: commands.OperateCredentials,
    *,
    uow: UnitOfWork,
    issuer: CredentialIssuer,
    sealer: SecretSealer,
    portal_sealer: PortalSealer,
    verify: SignatureVerifier,
    audience: str,
    max_skew: timedelta,
    now: Callable[[], datetime],
    gateway_configured: bool,
    review_deadline_hours: float | None,
) -> CredentialOperation:
    with uow:
        recorded = uow.credential_operations.get(command.operation_id)
        if recorded is not None:
            uow.record_outcome(
                outcomes.CredentialOperationDuplicateIgnored(command.operation_id, concurrent=False)
            )
            return recorded
        moment = now()
        refusal = _refusal(
            uow,
            sender=command.sender,
            signature=command.signature,
            admin_id=command.admin_id,
            signed_at=command.issued_at,
            verify=verify,
            audience=audience,
            max_skew=max_skew,
            now=moment,
            noun="operation",
            time_field="issued_at",
        )
        operation = CredentialOperation(
            id=command.operation_id,
            operation=command.operation,
            target=command.target,
            target_id=command.target_id,
            admin_id=command.admin_id,
            reason=command.reason,
            issued_at=command.issued_at,
            outcome=DecisionOutcome.REFUSED if refusal else DecisionOutcome.APPLIED,
            outcome_reason=refusal or "",
            key_id=command.signature.key_id if command.signature and not refusal else None,
        )
        if refusal is None:
            if command.operation is CredentialOperationKind.CHANGE_PLAN:
                _open_plan_change(uow, command, operation, review_deadline_hours)
            else:
                for credential in uow.credentials.targets(command.target, command.target_id):
                    operation.results[credential.id] = _apply(
                        uow,
                        command,
                        credential,
                        issuer=issuer,
                        sealer=sealer,
                        portal_sealer=portal_sealer,
                        now=moment,
                        gateway_configured=gateway_configured,
                    )
            if not operation.results:
                operation.outcome, operation.outcome_reason = DecisionOutcome.IGNORED, "no credential matches"
            elif (
                "applied" not in operation.results.values()
                and command.operation is not CredentialOperationKind.CHANGE_PLAN
            ):
                operation.outcome, operation.outcome_reason = DecisionOutcome.IGNORED, "nothing to change"
        uow.credential_operations.add(operation)
        if refusal is None:
            uow.record_outcome(
                outcomes.CredentialsOperated(
                    operation_id=operation.id,
                    operation=operation.operation.value,
                    target=operation.target.value,
                    target_id=operation.target_id,
                    admin_id=operation.admin_id,
                    outcome=operation.outcome.value,
                    reason=operation.outcome_reason,
                    results=tuple(operation.results.items()),
                )
            )
        uow.commit()
        if refusal is not None:  # told once recorded: a twin refused at the same moment is a duplicate
            uow.record_outcome(outcomes.CredentialOperationRefused(operation.id, operation.admin_id, refusal))
        return operation


def _apply(
    uow: UnitOfWork,
    command: commands.OperateCredentials,
    credential: Credential,
    *,
    issuer: CredentialIssuer,
    sealer: SecretSealer,
    portal_sealer: PortalSealer,
    now: datetime,
    gateway_configured: bool,
) -> str:
    """Apply one operation to one credential: ``applied``, or why it was left as it is."""
    by = Attribution(now, ActorKind.ADMIN, command.admin_id, command.reason, command.operation_id)
    sealed: Mapping[str, str] | None = None
    try:
        match command.operation:
            case CredentialOperationKind.REVOKE:
                change = credential.revoke(by)
            case CredentialOperationKind.SUSPEND:
                change = credential.suspend(by)
            case CredentialOperationKind.RESUME:
                change = credential.resume(by)
            case CredentialOperationKind.SET_EXPIRY:
                change = credential.set_expiry(command.expires_at, by)
            case CredentialOperationKind.ROTATE:
                change, sealed = _rotate(
                    uow,
                    credential,
                    by,
                    command.grace,
                    issuer=issuer,
                    sealer=sealer,
                    portal_sealer=portal_sealer,
                )
            case _:
                raise AssertionError(f"{command.operation} is not applied credential by credential")
    except IllegalTransition as refused:
        return str(refused)
    _follow_credential_change(
        uow, credential, change, sealed_secret=sealed, gateway_configured=gateway_configured
    )
    return "applied"


def _rotate(
    uow: UnitOfWork,
    credential: Credential,
    by: Attribution,
    grace: timedelta,
    *,
    issuer: CredentialIssuer,
    sealer: SecretSealer,
    portal_sealer: PortalSealer,
) -> tuple[CredentialChanged, Mapping[str, str] | None]:
    """A new secret for the same credential, delivered the way its first one was.

    Sealed to the portal's key in the ``credentials.rotated`` event for a portal's request;
    for a v1 request, sealed at rest for one more reveal. An OAuth2 client keeps its id.
    """
    if credential.status not in LIVE_CREDENTIAL_STATUSES:
        raise IllegalTransition(
            f"credential {credential.id} is {credential.status.value}: it cannot be rotated"
        )
    issued = issuer.issue(credential.kind)
    oauth2 = credential.kind is AuthMethod.OAUTH2_CLIENT_CREDENTIALS
    change = credential.rotate(
        public_id=credential.public_id if oauth2 else issued.public_id,
        secret_hash=issued.secret_hash,
        grace=grace,
        by=by,
    )
    owner = uow.requests.get(credential.request_id)
    portal = uow.portals.get(owner.portal_id) if owner is not None and owner.portal_id else None
    if portal is not None:
        return change, portal_sealer.seal_to(portal.public_key, issued.secret)
    credential.sealed_secret = sealer.seal(issued.secret)
    credential.revealed_at = None
    return change, None


def _open_plan_change(
    uow: UnitOfWork,
    command: commands.OperateCredentials,
    operation: CredentialOperation,
    review_deadline_hours: float | None,
) -> None:
    """Open a request to move the credential to ``command.plan_id``, and route it as any request."""
    assert command.plan_id is not None  # the contract requires it with change_plan
    credential = uow.credentials.get(command.target_id)
    if credential is None:
        return
    owner = uow.requests.get(credential.request_id)
    request = AccessRequest(
        id=derived_id("plan-change", command.operation_id),
        kind=RequestKind.PLAN_CHANGE,
        credential_id=credential.id,
        consumer_id=credential.consumer_id,
        plan_id=command.plan_id,
        product_ids=list(credential.product_ids),
        app_id=credential.app_id,
        justification=command.reason,
        submitted_at=command.issued_at,
        portal_id=owner.portal_id if owner is not None else None,
    )
    request.record_submission(
        f"plan change of credential {credential.id} to {command.plan_id!r}, asked by admin {command.admin_id}"
    )
    catalogue = uow.catalogue.slice_for(
        plan_id=request.plan_id,
        product_ids=request.product_ids,
        consumer_id=request.consumer_id,
        app_id=request.app_id,
    )
    catalogue.credential = credential
    _load_routing_facts(uow, request, catalogue)
    request.route(catalogue)
    _start_review_clock(request, catalogue.plan, review_deadline_hours)
    uow.requests.add(request)
    _queue_follow_ups(uow, request)
    operation.results[credential.id] = f"plan change request {request.id}: {request.status.value}"
    if request.status is Status.INVALID:
        operation.outcome, operation.outcome_reason = DecisionOutcome.IGNORED, request.status_reason


def expire_credentials(
    *,
    uow: UnitOfWork,
    notice_points: Sequence[timedelta],
    limit: int = 100,
    now: Callable[[], datetime] = utcnow,
    gateway_configured: bool = False,
) -> tuple[int, int]:
    """Expire the credentials whose lifetime ended; queue the notices due before others end.

    One transaction over the live credentials that expire within the longest notice point,
    soonest first. One whose ``expires_at`` has passed becomes ``expired``; another gets the
    notice of the nearest point it has reached (``notice_points``: time before expiry, such
    as 14 and 3 days) and not yet had, by email and by its portal's event. A credential stops
    verifying at its ``expires_at`` whether or not this has run: the sweep only records it.
    Rows another sweep (or an operation) holds are skipped, so many workers run it at once;
    ``now`` is injected, so tests move the clock rather than wait.

    Returns:
      How many expired, and how many notices were queued.
    """
    expired = noticed = 0
    touched: list[str] = []
    with uow:
        moment = now()
        horizon = moment + max(notice_points, default=timedelta(0))
        for credential in uow.credentials.expiring(before=horizon + timedelta(microseconds=1), limit=limit):
            if credential.has_expired(moment):
                change = credential.expire(now=moment)
                expired += 1
            else:
                due = credential.notices_due(notice_points, moment)
                if not due:
                    continue
                change = credential.note_expiry_notice(due, now=moment)
                noticed += 1
            _follow_credential_change(uow, credential, change, gateway_configured=gateway_configured)
            touched.append(credential.id)
        if touched:
            uow.record_outcome(outcomes.CredentialExpirySwept(expired, noticed, tuple(touched)))
        uow.commit()
    return expired, noticed


# --- review deadlines -----------------------------------------------------------------------------


def expire_reviews(
    *,
    uow: UnitOfWork,
    reminder_points: Sequence[timedelta],
    escalation_point: timedelta | None,
    limit: int = 100,
    now: Callable[[], datetime] = utcnow,
) -> tuple[int, int, int]:
    """Expire the requests whose review deadline passed; queue the reminders and escalations due.

    One transaction over the requests pending review whose deadline falls within the longest
    point, soonest first. One whose deadline has passed ends ``expired`` (by the
    ``review-deadline-sweep``, with the reason), its consumer emailed and its portal told.
    Another gets the reminder of the nearest point it has reached (``reminder_points``: time
    before the deadline, such as 24 and 4 hours) and not yet had, emailed to the admins, and
    the escalation once ``escalation_point`` before the deadline (``None``: no escalation),
    emailed to the escalation list. Each is sent once per deadline. Rows another sweep (or a
    decision being applied) holds are skipped, so many workers run it at once; ``now`` is
    injected, so tests move the clock rather than wait. A decision arriving after the expiry
    finds the request not pending review, and is recorded as ignored.

    Returns:
      How many expired, how many reminders and how many escalations were queued.
    """
    expired = reminded = escalated = 0
    touched: list[str] = []
    with uow:
        moment = now()
        points = [*reminder_points, *([escalation_point] if escalation_point is not None else [])]
        horizon = moment + max(points, default=timedelta(0))
        for request in uow.requests.review_due(before=horizon + timedelta(microseconds=1), limit=limit):
            if request.review_overdue(moment):
                request.expire_review(now=moment)
                expired += 1
            else:
                due = request.review_reminders_due(reminder_points, moment)
                if due:
                    request.note_review_reminder(due, now=moment)
                    reminded += 1
                if request.escalation_due(escalation_point, moment):
                    request.escalate_review(now=moment)
                    escalated += 1
            if request.events:
                touched.append(request.id)
                _queue_follow_ups(uow, request)
        if touched:
            uow.record_outcome(outcomes.ReviewDeadlinesSwept(expired, reminded, escalated, tuple(touched)))
        uow.commit()
    return expired, reminded, escalated


def email_message_id(request_id: str, kind: NotificationKind, domain: str, topic: str = "") -> str:
    """Stable per (request, kind, topic); a topic adds a short digest of itself, which needs no quoting."""
    if not topic:
        return f"<{kind.value}.{request_id}@{domain}>"
    return f"<{kind.value}.{request_id}.{derived_id('topic', topic)[:8]}@{domain}>"


def send_notification(
    command: commands.SendNotification,
    *,
    uow: UnitOfWork,
    mailer: Mailer,
    admin_emails: Iterable[str],
    message_id_domain: str = "accessflow",
    escalation_emails: Iterable[str] = (),
) -> DeliveryStatus | None:
    """Send one email about a request, at least once and, short of a crash mid-send, at most once.

    The attempt is committed before SMTP is spoken to and the result after, so a
    crash in between gives at most one duplicate, which shares the same Message-ID.
    The attempt also takes the mailer's lease (:attr:`Mailer.lease`, from the email settings,
    longer than the mailer's send deadline): a redelivery of the same command that
    arrives while the first is still talking SMTP (the broker redelivers when a
    connection drops) backs off instead of sending a second copy.

    A refusal of some recipients, while the server took the message for the others,
    ends in ``partial``, with the refused recipients in ``last_error``.

    Raises:
      TransientError: the server may take it later, or another worker holds the lease.
    """
    try:
        with uow:
            notification = uow.notifications.get(
                command.request_id, command.kind, command.topic, for_update=True
            )
            if notification is not None and notification.status is not DeliveryStatus.SENDING:
                return notification.status
            if notification is not None and notification.leased_by_another(utcnow()):
                raise TransientError(
                    f"{command.kind.value} email for {command.request_id} is being sent by another worker"
                )
            request = uow.requests.get(command.request_id)
            if request is None:
                uow.record_outcome(outcomes.EmailDropped(command.request_id, command.kind.value))
                return None
            email = _compose(
                request,
                command.kind,
                uow=uow,
                admin_emails=tuple(admin_emails),
                escalation_emails=tuple(escalation_emails),
                message_id=email_message_id(request.id, command.kind, message_id_domain, command.topic),
            )
            if notification is None:
                notification = Notification(
                    request_id=request.id, kind=command.kind, message_id=email.message_id, topic=command.topic
                )
                uow.notifications.add(notification)
            notification.attempts += 1
            notification.lease_expires_at = utcnow() + mailer.lease
            uow.commit()
    except Duplicate:
        # A twin delivery created the notification at the same moment, and holds its lease now.
        uow.record_outcome(outcomes.EmailDuplicateIgnored(command.request_id, command.kind.value))
        return None
    if not email.to:  # e.g. no ACCESSFLOW_ADMIN_EMAILS: a gap the operator must see, not a success
        return _record_delivery(uow, command, DeliveryStatus.FAILED, "no recipients configured")
    try:
        sent = mailer.send(email)
    except PermanentDeliveryError as refused:
        return _record_delivery(uow, command, DeliveryStatus.FAILED, str(refused))
    except TransientError as failure:
        _record_delivery(uow, command, DeliveryStatus.SENDING, str(failure))  # frees the lease for the retry
        raise
    if sent.refused:
        refusals = "; ".join(f"{address} ({reply})" for address, reply in sent.refused.items())
        return _record_delivery(
            uow,
            command,
            DeliveryStatus.PARTIAL,
            f"{len(sent.refused)} of {len(email.to)} recipients refused: {refusals}",
            recipients=len(email.to),
            refused=len(sent.refused),
        )
    return _record_delivery(uow, command, DeliveryStatus.SENT, "", recipients=len(email.to))


def _record_delivery(
    uow: UnitOfWork,
    command: commands.SendNotification,
    status: DeliveryStatus,
    error: str,
    *,
    recipients: int = 0,
    refused: int = 0,
) -> DeliveryStatus:
    with uow:
        notification = uow.notifications.get(command.request_id, command.kind, command.topic, for_update=True)
        assert notification is not None
        if status in (DeliveryStatus.SENT, DeliveryStatus.PARTIAL):
            uow.record_outcome(
                outcomes.EmailSent(
                    command.request_id,
                    command.kind.value,
                    notification.message_id,
                    status.value,
                    recipients,
                    refused,
                )
            )
        elif status is DeliveryStatus.FAILED:
            uow.record_outcome(
                outcomes.EmailFailed(command.request_id, command.kind.value, notification.message_id, error)
            )
        notification.status = status
        notification.last_error = error[:500]
        now = utcnow()
        # Still sending: the lease ends now, free for the retry, and dates this attempt, so that
        # the sweep can tell an email whose retries are gone from one whose retry is on its way.
        notification.lease_expires_at = now if status is DeliveryStatus.SENDING else None
        if status in (DeliveryStatus.SENT, DeliveryStatus.PARTIAL):
            notification.sent_at = now
        uow.commit()
    return status


def redrive_stuck_notifications(
    *,
    uow: UnitOfWork,
    stale_after: timedelta,
    max_attempts: int,
    limit: int = 100,
    now: Callable[[], datetime] = utcnow,
) -> tuple[int, int]:
    """Send again the emails stuck in ``sending`` whose messages are gone; give up on them after a while.

    An email is stuck when its lease ran out (or, never leased, it was created) more than
    ``stale_after`` ago: no worker is sending it, and no retry of its message has come for
    longer than a retry waits (the message was dead-lettered, or lost with its worker). Its
    ``SendNotification`` is queued again through the outbox, with the attempt counted and
    the lease's time moved to now, so that it is not re-driven again before ``stale_after``;
    once it has had ``max_attempts`` attempts it is marked ``failed`` with the reason instead.
    One transaction; rows another sweep holds are skipped (several workers run this).

    Returns:
      How many were re-driven, and how many were given up on.
    """
    redriven = failed = 0
    request_ids: list[str] = []
    with uow:
        moment = now()
        for notification in uow.notifications.stuck(before=moment - stale_after, limit=limit):
            request_ids.append(notification.request_id)
            if notification.attempts >= max_attempts:
                notification.status = DeliveryStatus.FAILED
                notification.lease_expires_at = None
                notification.last_error = (
                    f"gave up: stuck in sending after {notification.attempts} attempt(s); "
                    f"last error: {notification.last_error or 'none'}"
                )[:500]
                failed += 1
                continue
            notification.attempts += 1
            notification.lease_expires_at = moment
            uow.outbox.put(
                commands.SendNotification(notification.request_id, notification.kind, notification.topic)
            )
            redriven += 1
        if request_ids:
            uow.record_outcome(outcomes.NotificationsRedriven(redriven, failed, tuple(request_ids)))
        uow.commit()
    return redriven, failed


def redrive_stuck_provisioning(
    *,
    uow: UnitOfWork,
    stale_after: timedelta,
    max_attempts: int,
    limit: int = 100,
    now: Callable[[], datetime] = utcnow,
) -> tuple[int, int]:
    """Issue again the credentials of requests stuck in ``approved``; give up on them after a while.

    A request is stuck when it has been ``approved`` for longer than ``stale_after`` since its
    approval or its last re-drive: its ``IssueCredentials`` was dead-lettered (a transient
    failure outlasted the retries) or lost. Its command is queued again through the outbox,
    the re-drive counted in ``provision_attempts`` and dated, so that it is not re-driven again
    before ``stale_after``. Once it has been re-driven ``max_attempts`` times it ends in
    ``provisioning_failed`` instead, by the ``provisioning-sweep`` in its audit trail, with the
    reason, its portal told, and waits for ``accessflow requests retry``. One transaction; rows
    another sweep (or the worker issuing the credential) holds are skipped, so several workers
    run this at once without issuing twice.

    Returns:
      How many were re-driven, and how many were given up on.
    """
    redriven = failed = 0
    request_ids: list[str] = []
    with uow:
        moment = now()
        for request in uow.requests.stuck_approved(before=moment - stale_after, limit=limit):
            request_ids.append(request.id)
            if request.provision_attempts >= max_attempts:
                reason = (
                    f"gave up: still approved with no credential after {request.provision_attempts} "
                    f"re-drive(s) of its IssueCredentials, {stale_after.total_seconds():.0f}s apart "
                    "(ACCESSFLOW_PROVISIONING_MAX_ATTEMPTS); see the dead letters of the credentials queue"
                )
                request.fail_provisioning(reason, by="provisioning-sweep")
                _queue_follow_ups(uow, request)
                uow.record_outcome(outcomes.ProvisioningFailed(request.id, reason))
                failed += 1
                continue
            request.redrive_provisioning(moment)
            uow.outbox.put(commands.IssueCredentials(request.id))
            redriven += 1
        if request_ids:
            uow.record_outcome(outcomes.ProvisioningRedriven(redriven, failed, tuple(request_ids)))
        uow.commit()
    return redriven, failed


def _compose(
    request: AccessRequest,
    kind: NotificationKind,
    *,
    uow: UnitOfWork,
    admin_emails: tuple[str, ...],
    message_id: str,
    escalation_emails: tuple[str, ...] = (),
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
        portal = uow.portals.get(request.portal_id) if request.portal_id else None
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
            portal_name=portal.name if portal else "",
            portal_url=portal.url if portal else "",
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
    elif kind in (NotificationKind.EXPIRY_NOTICE, NotificationKind.EXPIRED):
        credential = uow.credentials.for_request(request.id)
        assert credential is not None and credential.expires_at is not None, "only an expiring credential"
        portal = uow.portals.get(request.portal_id) if request.portal_id else None
        context = ExpiryContext(
            request_id=request.id,
            consumer_name=consumer.name,
            app_name=app_name,
            plan_name=plan.name,
            credential_kind=credential.kind.value,
            credential_public_id=credential.public_id,
            expires_at=f"{credential.expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
            portal_name=portal.name if portal else "",
            portal_url=portal.url if portal else "",
        )
        to = (consumer.email,)
    elif kind in (NotificationKind.REVIEW_REMINDER, NotificationKind.REVIEW_ESCALATION):
        assert request.review_deadline_at is not None, "only a request with a deadline"
        context = ReviewDeadlineContext(
            request_id=request.id,
            consumer_id=consumer.id,
            consumer_name=consumer.name,
            consumer_email=consumer.email,
            app_name=app_name,
            plan_name=plan.name,
            products=products,
            justification=request.justification or "",
            received_at=f"{request.received_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
            deadline=f"{request.review_deadline_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
        )
        to = admin_emails if kind is NotificationKind.REVIEW_REMINDER else escalation_emails
    elif kind is NotificationKind.REVIEW_EXPIRED:
        assert request.review_deadline_at is not None, "only a request with a deadline expires"
        portal = uow.portals.get(request.portal_id) if request.portal_id else None
        context = ReviewExpiredContext(
            request_id=request.id,
            consumer_name=consumer.name,
            app_name=app_name,
            plan_name=plan.name,
            products=products,
            deadline=f"{request.review_deadline_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
            portal_name=portal.name if portal else "",
            portal_url=portal.url if portal else "",
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
