"""The outbox rows a handler's transaction writes: its commands and its portal events, as messages.

Written in the handler's own transaction, so that a message exists if and only if the state
change that owes it committed; :mod:`infra.messaging.relay` publishes them after the commit.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy.orm import Session

from domain.commands import Command
from domain.events import BulkDecisionSettled, PortalEvent
from domain.model import utcnow
from infra.db import orm
from infra.db.repositories import insert_rows, rows_parameters, run
from infra.messaging.publisher import Outgoing
from infra.messaging.topology import Topology
from messages.events import AdminEvent, RequestEvent
from messages.routes import route_for_command


class SqlOutbox:
    """The outbox as the handlers see it: ``put`` and ``announce`` add a row to the open transaction.

    ``added`` keeps each row as the message it becomes, so that the relay can publish it
    after the commit without reading it back. The rows are written when the unit of work
    commits (:meth:`flush`), all of them with one statement.
    """

    def __init__(self, session: Session, queue_prefix: str) -> None:
        self.session = session
        self.queue_prefix = queue_prefix
        self.added: list[Outgoing] = []

    def put(self, command: Command) -> None:
        route, payload = route_for_command(command)
        self.added.append(
            Outgoing(route.queue_name(self.queue_prefix), route.actor_name, payload, str(uuid.uuid4()))
        )

    def announce(self, event: PortalEvent) -> None:
        self._add_event(RequestEvent.of(event))

    def tell_admins(self, event: BulkDecisionSettled) -> None:
        self._add_event(AdminEvent.of(event))

    def _add_event(self, message: RequestEvent | AdminEvent) -> None:
        """An event is its body alone, on the events exchange, under its routing key."""
        self.added.append(
            Outgoing(
                queue_name="",
                actor_name="",
                payload=message.model_dump(mode="json", exclude_none=True),
                message_id=message.event_id,
                exchange=Topology(self.queue_prefix).events_exchange,
                routing_key=message.routing_key(),
            )
        )

    def flush(self) -> None:
        """Write every row added since the last commit, in one statement of the open transaction."""
        if not self.added:
            return
        now = utcnow()
        # A microsecond apart: the sweep publishes by ``created_at``, so rows keep the
        # order the handler added them in (a portal's events, say) when read back.
        rows = [
            _OutboxRow(
                m.message_id,
                m.queue_name,
                m.actor_name,
                m.payload,
                now + i * _TICK,
                m.exchange,
                m.routing_key,
            )
            for i, m in enumerate(self.added)
        ]
        run(
            self.session,
            insert_rows(orm.outbox, _OutboxRow._fields, len(rows), "o"),
            rows_parameters(rows, _OutboxRow._fields, "o"),
        )


_TICK = timedelta(microseconds=1)


class _OutboxRow(NamedTuple):
    """An outbox row as written: its fields are the columns, in order."""

    id: str
    queue_name: str
    actor_name: str
    payload: Any
    created_at: datetime
    exchange: str
    routing_key: str | None
