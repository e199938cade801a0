"""The other side of the wire: what a portal publishes and hears, and an admin who approves.

A portal publishes v2 submissions to ``<prefix>.in.submissions`` under its portal id, as its
own AMQP user, and reads its events queue (every event it is told, as a real portal does;
a queue nobody reads would grow by five events per request). When it hears
``access_request.pending_review``, it hands the request to the :class:`DecisionStream`,
an admin tool that signs an approval with the admin's Ed25519 key and publishes it to
``<prefix>.in.decisions``, in batches, with publisher confirms.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pika
import pika.exceptions
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.publisher import ConfirmingPublisher, Message, envelope
from bench.world import ADMIN_ID, ADMIN_KEY_ID, APP_ID, CONSUMER, PORTAL_ID, Vhost
from infra.cli import producer
from messages.routes import DECIDE, SUBMIT

AUTO_PLAN = "starter"
MANUAL_PLAN = "partner"


def manual_flags(count: int, manual_share: float) -> list[bool]:
    """Which of ``count`` requests are manual: ``manual_share`` of them, spread evenly through the burst."""
    if not 0.0 <= manual_share <= 1.0:
        raise ValueError(f"manual share {manual_share} is not between 0 and 1")
    # The epsilon keeps 5 * 0.2 at 1, not a hair below it.
    return [int((i + 1) * manual_share + 1e-9) > int(i * manual_share + 1e-9) for i in range(count)]


@dataclass(frozen=True)
class Requests:
    """A batch of submissions, ready to publish."""

    ids: list[str]
    manual: list[bool]
    messages: list[Message]

    @property
    def auto_ids(self) -> list[str]:
        return [request_id for request_id, manual in zip(self.ids, self.manual, strict=True) if not manual]

    @property
    def manual_ids(self) -> list[str]:
        return [request_id for request_id, manual in zip(self.ids, self.manual, strict=True) if manual]


def submissions(prefix: str, count: int, manual_share: float) -> Requests:
    """``count`` v2 submissions of the bench portal: Starter (auto-approve) or Partner (manual)."""
    ids, manual, messages = [], [], []
    queue_name = SUBMIT.queue_name(prefix)
    for is_manual in manual_flags(count, manual_share):
        request_id = str(uuid.uuid4())
        payload = {
            "version": 2,
            "portal_id": PORTAL_ID,
            "request_id": request_id,
            "consumer": CONSUMER,
            "app_id": APP_ID,
            "product_ids": ["payments", "ledger"],
            "plan_id": MANUAL_PLAN if is_manual else AUTO_PLAN,
            "justification": "bench",
            "submitted_at": datetime.now(UTC).isoformat(),
        }
        message_id = str(uuid.uuid4())
        ids.append(request_id)
        manual.append(is_manual)
        messages.append(Message(envelope(queue_name, SUBMIT.actor_name, payload, message_id), message_id))
    return Requests(ids, manual, messages)


def portal_publisher(vhost: Vhost) -> ConfirmingPublisher:
    return ConfirmingPublisher(
        vhost.url(vhost.portal_user),
        exchange=vhost.topology.submissions_exchange,
        routing_key=PORTAL_ID,
        user_id=vhost.portal_user,
    )


class PortalEvents(threading.Thread):
    """Reads the portal's events queue (auto-ack); counts events; passes pending reviews on."""

    def __init__(self, vhost: Vhost, pending: queue.Queue[str]) -> None:
        super().__init__(name="portal-events", daemon=True)
        self.vhost = vhost
        self.pending = pending
        self.counts: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.suffix = ".access_request.pending_review"

    def run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.vhost.url(self.vhost.portal_user)))
            try:
                channel = connection.channel()
                channel.basic_qos(prefetch_count=1000)
                channel.basic_consume(
                    self.vhost.topology.portal_events_queue(PORTAL_ID), self._on_event, auto_ack=True
                )
                while not self.stopping.is_set():
                    connection.process_data_events(time_limit=0.2)
            finally:
                if connection.is_open:
                    connection.close()
        except BaseException as error:
            self.error = error
            print(f"portal events reader failed: {error!r}", file=sys.stderr, flush=True)

    def _on_event(self, _channel: object, method: object, _properties: object, body: bytes) -> None:
        routing_key = str(getattr(method, "routing_key", ""))
        self.counts[routing_key.removeprefix(f"{PORTAL_ID}.")] += 1
        if routing_key.endswith(self.suffix):
            request_id = json.loads(body).get("request_id")
            if isinstance(request_id, str):
                self.pending.put(request_id)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


class DecisionStream(threading.Thread):
    """An admin tool that approves every request it is handed, signed, as soon as it can."""

    def __init__(self, vhost: Vhost, private_key: Ed25519PrivateKey, pending: queue.Queue[str]) -> None:
        super().__init__(name="decision-stream", daemon=True)
        self.vhost = vhost
        self.key = private_key
        self.pending = pending
        self.publisher = ConfirmingPublisher(
            vhost.url(vhost.accounts.admin_tool),
            exchange=vhost.topology.decisions_exchange,
            routing_key=ADMIN_ID,
            user_id=vhost.accounts.admin_tool,
        )
        self.sent = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    batch = [self.pending.get(timeout=0.2)]
                except queue.Empty:
                    continue
                while len(batch) < 1000:
                    try:
                        batch.append(self.pending.get_nowait())
                    except queue.Empty:
                        break
                self.publisher.publish(self._decisions(batch), window=None, timeout=120)
                self.sent += len(batch)
        except BaseException as error:
            self.error = error
            print(f"decision stream failed: {error!r}", file=sys.stderr, flush=True)

    def _decisions(self, request_ids: Sequence[str]) -> list[Message]:
        messages = []
        queue_name = DECIDE.queue_name(self.vhost.prefix)
        for request_id in request_ids:
            decision = producer.signed_decision(
                request_id=request_id,
                approve=True,
                admin_id=ADMIN_ID,
                reason="bench",
                audience=self.vhost.prefix,
                key_id=ADMIN_KEY_ID,
                private_key=self.key,
            )
            message_id = str(uuid.uuid4())
            body = envelope(queue_name, DECIDE.actor_name, decision.model_dump(mode="json"), message_id)
            messages.append(Message(body, message_id))
        return messages

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
