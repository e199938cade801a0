"""The floor: dramatiq actors that do nothing but pass each request on, on accessflow's broker.

``dramatiq bench.floor_worker:boot --queues <prefix>.requests <prefix>.credentials
<prefix>.notifications`` with the ``ACCESSFLOW_*`` environment of a bench vhost. The broker is
:func:`infra.messaging.broker.make_broker` with those settings: quorum queues, publisher confirms and
``mandatory``, ``user_id`` on every publish, the envelope check on every delivery, and
accessflow's middleware. The actors carry accessflow's actor names on accessflow's queues,
and each publishes the next hop's message the way dramatiq does (``actor.send``)::

    portal -> in.submissions -> [requests] route -> [credentials] issue -> [notifications] notify

The last hop appends ``<monotonic time> done <request id>`` to ``$BENCH_DONE_FILE``. What this
pool costs and how fast it drains is what dramatiq and RabbitMQ cost for three hops.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import dramatiq

from infra.messaging.broker import make_broker, record_refusals_with
from infra.settings import Settings
from messages.routes import ISSUE, NOTIFY, SUBMIT

#: Environment variable naming the file the last hop appends to.
DONE_FILE_ENV = "BENCH_DONE_FILE"


def _report_refusal(**fields: Any) -> None:
    # A refused delivery would be a bug of the bench's own messages: say so, on stderr.
    print(f"floor: refused {fields.get('message_id')}: {fields.get('reason')}", file=sys.stderr, flush=True)


def boot() -> None:
    """Entry point for the ``dramatiq`` command: build the broker and declare the three actors."""
    settings = Settings()
    broker = make_broker(settings)
    record_refusals_with(broker, _report_refusal)
    dramatiq.set_broker(broker)
    prefix = settings.queue_prefix
    done = os.open(os.environ[DONE_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def notify(payload: dict[str, Any]) -> None:
        os.write(done, f"{time.monotonic():.6f} done {payload['request_id']}\n".encode())

    def issue(payload: dict[str, Any]) -> None:
        notify_actor.send({"request_id": payload["request_id"], "kind": "approve"})

    def route(payload: dict[str, Any]) -> None:
        issue_actor.send({"request_id": payload["request_id"]})

    def declare(name: str, queue_name: str, fn: Callable[[dict[str, Any]], None]) -> dramatiq.Actor[Any, Any]:
        return dramatiq.actor(actor_name=name, queue_name=queue_name, broker=broker)(fn)

    notify_actor = declare(NOTIFY.actor_name, NOTIFY.queue_name(prefix), notify)
    issue_actor = declare(ISSUE.actor_name, ISSUE.queue_name(prefix), issue)
    declare(SUBMIT.actor_name, SUBMIT.queue_name(prefix), route)
