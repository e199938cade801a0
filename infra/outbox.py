"""The transactional outbox and its relay.

A handler's follow-up commands are inserted into ``outbox`` in the handler's own
transaction. After the commit the relay publishes them (with publisher confirms on
RabbitMQ) and marks them sent; a row is marked only after the broker confirmed it.
A crash between the confirm and the mark republishes the row later, and the
consumers, being idempotent, absorb the duplicate. Workers also sweep for rows a
crashed process left behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
import structlog
from sqlalchemy.orm import Session, sessionmaker

from domain.commands import Command
from domain.events import PortalEvent
from domain.model import utcnow
from infra import orm
from infra.broker import Outgoing, Publisher
from infra.faults import crash_point
from infra.topology import Topology
from messages.events import RequestEvent
from messages.routes import route_for_command

log = structlog.get_logger()

#: Rows published per transaction by one sweep.
BATCH_SIZE = 200


class UnconfirmedPublish(Exception):
    """The broker did not confirm every message of a batch; the rest stay in the outbox for the sweep."""


class SqlOutbox:
    """The outbox as the handlers see it: ``put`` adds a row to the open transaction."""

    def __init__(self, session: Session, queue_prefix: str) -> None:
        self.session = session
        self.queue_prefix = queue_prefix
        self.added: list[str] = []

    def put(self, command: Command) -> None:
        route, payload = route_for_command(command)
        row_id = str(uuid.uuid4())
        self.session.execute(
            orm.outbox.insert().values(
                id=row_id,
                queue_name=route.queue_name(self.queue_prefix),
                actor_name=route.actor_name,
                payload=payload,
                created_at=utcnow(),
            )
        )
        self.added.append(row_id)

    def announce(self, event: PortalEvent) -> None:
        message = RequestEvent.of(event)
        self.session.execute(
            orm.outbox.insert().values(
                id=message.event_id,
                queue_name="",
                actor_name="",
                payload=message.model_dump(mode="json", exclude_none=True),
                created_at=utcnow(),
                exchange=Topology(self.queue_prefix).events_exchange,
                routing_key=message.routing_key(),
            )
        )
        self.added.append(message.event_id)


class OutboxRelay:
    """Publishes committed outbox rows and marks them sent."""

    def __init__(self, session_factory: sessionmaker[Session], publisher: Publisher) -> None:
        self.session_factory = session_factory
        self.publisher = publisher

    def publish(self, ids: Sequence[str] | None = None, *, older_than: timedelta | None = None) -> int:
        """Publish unsent rows: the given ones, or every one older than ``older_than``.

        Rows another process is publishing right now are skipped, not waited for.

        Returns:
          How many rows were published and marked sent.
        """
        published = 0
        while True:
            with self.session_factory() as session:
                query = (
                    sa.select(orm.outbox)
                    .where(orm.outbox.c.sent_at.is_(None))
                    .order_by(orm.outbox.c.created_at)
                    .limit(BATCH_SIZE)
                    .with_for_update(skip_locked=True)
                )
                if ids is not None:
                    query = query.where(orm.outbox.c.id.in_(ids))
                if older_than is not None:
                    query = query.where(orm.outbox.c.created_at < utcnow() - older_than)
                rows = session.execute(query).all()
                if not rows:
                    return published
                confirmed = self.publisher.publish_batch(
                    [
                        Outgoing(
                            row.queue_name,
                            row.actor_name,
                            row.payload,
                            row.id,
                            exchange=row.exchange,
                            routing_key=row.routing_key,
                        )
                        for row in rows
                    ]
                )
                crash_point("relay_after_publish")  # confirmed but not yet marked: resent later
                sent = [row.id for row in rows if row.id in confirmed]
                session.execute(
                    orm.outbox.update()
                    .where(orm.outbox.c.id.in_([row.id for row in rows]))
                    .values(attempts=orm.outbox.c.attempts + 1)
                )
                if sent:
                    session.execute(
                        orm.outbox.update().where(orm.outbox.c.id.in_(sent)).values(sent_at=utcnow())
                    )
                session.commit()
                if len(sent) < len(rows):
                    raise UnconfirmedPublish(
                        f"{len(rows) - len(sent)} of {len(rows)} outbox rows not confirmed"
                    )
                published += len(sent)
                if ids is not None or len(rows) < BATCH_SIZE:
                    return published

    def publish_quietly(self, ids: Sequence[str]) -> None:
        """Publish right after a commit; on failure leave the rows for the sweeper."""
        try:
            self.publish(ids)
        except Exception as error:  # the sweep retries; the handler's work is already committed
            log.warning("outbox.publish_deferred", rows=len(ids), error=type(error).__name__)
