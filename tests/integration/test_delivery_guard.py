"""The delivery guard against real PostgreSQL, and the delivery marks it reads from real RabbitMQ.

A worker process's death is played by dropping its guard (and the lock it held) and
building a new one for the next delivery, as a restarted process would.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pika
import pytest
import sqlalchemy as sa
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import _RabbitmqMessage
from dramatiq.errors import Retry
from dramatiq.middleware import SkipMessage
from sqlalchemy.orm import sessionmaker

from infra.bootstrap import Services
from infra.db import orm
from infra.db.engine import create_engine
from infra.messaging.broker import EnvelopeConsumer, QuorumRabbitmqBroker, make_broker
from infra.messaging.delivery import DeliveryGuard, SuspectTurn, first_delivery
from infra.settings import Settings
from messages.routes import QUEUE_ROUTES, SUBMIT
from tests import services as svc
from tests.services import envelope

pytestmark = pytest.mark.integration

MAX_DELIVERIES = 3


def delivery(*, redelivered: bool, delivery_count: object = None, message_id: str | None = None) -> Any:
    """A message as the consumer hands it to a worker thread (dramatiq's proxy is untyped: Any)."""
    message: Any = _RabbitmqMessage(
        redelivered,
        1,
        dramatiq.Message(
            queue_name="accessflow.requests",
            actor_name=SUBMIT.actor_name,
            args=({},),
            kwargs={},
            options={},
            message_id=message_id or str(uuid.uuid4()),
            message_timestamp=0,
        ),
    )
    message.delivery_count = delivery_count
    return message


def attempts(services: Services, message_id: str) -> int | None:
    with services.engine.connect() as connection:
        found = connection.execute(
            sa.select(orm.deliveries.c.attempts).where(orm.deliveries.c.message_id == message_id)
        ).scalar_one_or_none()
    return int(found) if found is not None else None


def dead_letter_reasons(services: Services, message_id: str) -> list[str]:
    with services.engine.connect() as connection:
        return list(
            connection.execute(
                sa.select(orm.dead_letters.c.reason).where(orm.dead_letters.c.message_id == message_id)
            ).scalars()
        )


def guard_of(services: Services) -> DeliveryGuard:
    """A new worker process's guard."""
    return DeliveryGuard(services.session_factory, MAX_DELIVERIES)


def lock_is_free(guard: DeliveryGuard) -> bool:
    """Whether another thread could take the suspects' turn now (it gives it back at once)."""
    outcome: list[bool] = []

    def attempt() -> None:
        taken = guard.turn.take(timeout=0)
        if taken:
            guard.turn.give_back()
        outcome.append(taken)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return outcome[0]


@pytest.fixture
def statements(services: Services) -> Iterator[list[str]]:
    """Every SQL statement the services' engine runs while the test does."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(services.engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(services.engine, "before_cursor_execute", record)


class TestAFirstDelivery:
    def test_runs_without_a_counter_row_and_deletes_none(
        self, services: Services, statements: list[str]
    ) -> None:
        # Given a message RabbitMQ delivers for the first time
        guard, message = guard_of(services), delivery(redelivered=False)

        # When it runs to its end
        guard.before_process_message(services.broker, message)
        running_alone = not lock_is_free(guard)
        guard.after_process_message(services.broker, message, result=None)

        # Then the guard wrote no counter, deleted none, and let it run beside others
        assert [s for s in statements if "deliveries" in s] == []
        assert attempts(services, message.message_id) is None
        assert not running_alone

    def test_that_raises_is_not_counted_either(self, services: Services, statements: list[str]) -> None:
        # Given a first delivery whose actor raises (Retries will send it again as a new message)
        guard, message = guard_of(services), delivery(redelivered=False, delivery_count=0)

        # When its run ends with the exception
        guard.before_process_message(services.broker, message)
        guard.after_process_message(services.broker, message, exception=RuntimeError("boom"))

        # Then the guard touched no counter
        assert [s for s in statements if "deliveries" in s] == []


class TestARedelivery:
    def test_is_counted_from_two_while_it_runs_and_forgotten_when_it_ends(self, services: Services) -> None:
        # Given a message back from a worker that died (its first run was never counted)
        guard, message = guard_of(services), delivery(redelivered=True, delivery_count=1)

        # When it starts, and later ends
        guard.before_process_message(services.broker, message)
        counted = attempts(services, message.message_id)
        guard.after_process_message(services.broker, message, result=None)

        # Then it counted as its second start while it ran, and its row went with the run's end
        assert counted == 2
        assert attempts(services, message.message_id) is None

    def test_is_forgotten_when_its_run_raises(self, services: Services) -> None:
        # Given a redelivered message whose actor raises
        guard, message = guard_of(services), delivery(redelivered=True)

        # When its run ends with the exception
        guard.before_process_message(services.broker, message)
        guard.after_process_message(services.broker, message, exception=RuntimeError("boom"))

        # Then the counter is gone: a raise is Retries' to bound, not the guard's
        assert attempts(services, message.message_id) is None

    @pytest.mark.parametrize("count", [1, 7, "0", True, 1.0], ids=repr)
    def test_a_delivery_count_other_than_zero_is_counted_even_without_the_flag(
        self, services: Services, count: object
    ) -> None:
        # Given a delivery whose flag is unset but whose x-delivery-count is not a plain 0
        guard, message = guard_of(services), delivery(redelivered=False, delivery_count=count)

        # When it starts
        guard.before_process_message(services.broker, message)

        # Then the guard counts it, on the safe side
        try:
            assert attempts(services, message.message_id) == 2
        finally:
            guard.after_process_message(services.broker, message, result=None)

    def test_a_message_that_cannot_say_is_counted(self, services: Services) -> None:
        # Given a message with no delivery marks at all (the in-memory broker's)
        guard = guard_of(services)
        message: Any = MessageProxy(delivery(redelivered=True)._message)

        # When it starts
        guard.before_process_message(services.broker, message)

        # Then it is counted as a redelivery would be
        try:
            assert attempts(services, message.message_id) == 2
        finally:
            guard.after_process_message(services.broker, message, result=None)


class TestSuspects:
    def test_redelivered_messages_run_one_at_a_time(self, services: Services) -> None:
        # Given a redelivered message running in a worker process
        guard, first = guard_of(services), delivery(redelivered=True)
        guard.before_process_message(services.broker, first)

        # Then no other suspect can start beside it, until it ends
        assert not lock_is_free(guard)
        guard.after_process_message(services.broker, first, result=None)
        assert lock_is_free(guard)

    def test_a_suspect_is_counted_only_when_its_turn_comes(self, services: Services) -> None:
        # Given a redelivered message running, and a second one that must wait for it
        guard = guard_of(services)
        running, waiting = delivery(redelivered=True), delivery(redelivered=True)
        guard.before_process_message(services.broker, running)
        asked, this_thread = threading.Event(), threading.current_thread()

        class Observed(SuspectTurn):
            """The guard's turn, telling the test when the waiting thread asks for it."""

            def take(self, timeout: float) -> bool:
                if threading.current_thread() is not this_thread:
                    asked.set()
                return super().take(timeout)

        observed = Observed()
        observed.take(timeout=0)  # held by this thread, as the first message's run holds it
        guard.turn = observed
        second = threading.Thread(target=guard.before_process_message, args=(services.broker, waiting))
        second.start()
        asked.wait()

        # When it is still waiting (the first holds the turn: it cannot have got further)
        # Then it has not been counted: if the first killed the process now, it would lose nothing
        assert attempts(services, waiting.message_id) is None

        # And once the first ends, its turn comes and it is counted
        guard.after_process_message(services.broker, running, result=None)
        second.join()
        assert attempts(services, waiting.message_id) == 2
        # (the second held the turn on its own thread, which has ended; a new guard plays the next process)

    def test_a_dead_lettered_suspect_gives_the_lock_back(self, services: Services) -> None:
        # Given a redelivered message that has already started as often as it may
        guard, message = guard_of(services), delivery(redelivered=True)
        with services.engine.begin() as connection:
            connection.execute(
                orm.deliveries.insert().values(
                    message_id=message.message_id,
                    actor_name=message.actor_name,
                    attempts=MAX_DELIVERIES,
                    first_started_at=sa.func.now(),
                    last_started_at=sa.func.now(),
                )
            )

        # When it is delivered again, and dramatiq skips it
        with pytest.raises(SkipMessage):
            guard.before_process_message(services.broker, message)
        guard.after_skip_message(services.broker, message)

        # Then the next suspect may run
        assert lock_is_free(guard)


class TestAPoisonMessage:
    def test_that_kills_its_worker_every_time_is_dead_lettered_after_max_deliveries_runs(
        self, services: Services
    ) -> None:
        # Given a message that kills every worker process that runs it
        message_id = str(uuid.uuid4())
        runs = 0
        outcome: BaseException | None = None
        # When RabbitMQ delivers it, and again after each death, to a new process each time
        for number in range(MAX_DELIVERIES + 2):
            message = delivery(redelivered=number > 0, delivery_count=number or None, message_id=message_id)
            try:
                guard_of(services).before_process_message(services.broker, message)
            except SkipMessage as skipped:
                outcome = skipped
                break
            runs += 1  # it runs, and the process dies: no after_process_message

        # Then it ran exactly max_deliveries times, the first of them uncounted, and then was
        # dead-lettered with its reason, its counter removed
        assert runs == MAX_DELIVERIES
        assert outcome is not None and message.failed
        [reason] = dead_letter_reasons(services, message_id)
        assert reason.startswith(f"started {MAX_DELIVERIES} times without finishing")
        assert attempts(services, message_id) is None

    def test_an_innocent_that_finishes_after_a_crash_starts_again_from_nothing(
        self, services: Services
    ) -> None:
        # Given a message killed in its first run alongside a poison one, then run to the end
        message_id = str(uuid.uuid4())
        guard = guard_of(services)
        back = delivery(redelivered=True, delivery_count=1, message_id=message_id)
        guard.before_process_message(services.broker, back)
        guard.after_process_message(services.broker, back, result=None)

        # When the same message comes back once more (a broker connection dropped before its ack)
        again = delivery(redelivered=True, delivery_count=2, message_id=message_id)
        guard.before_process_message(services.broker, again)

        # Then it counts as a second start, not a third: finishing wiped its slate
        try:
            assert attempts(services, message_id) == 2
        finally:
            guard.after_process_message(services.broker, again, result=None)


class TestADatabaseThatIsDown:
    def test_makes_counting_a_redelivery_a_retry_and_frees_the_lock(
        self, services: Services, integration_settings: Settings
    ) -> None:
        # Given a guard whose database refuses connections
        unreachable = create_engine(
            integration_settings.model_copy(
                update={
                    "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{svc.free_port()}/none",
                    "db_connect_timeout_seconds": 2,
                }
            )
        )
        guard = DeliveryGuard(sessionmaker(unreachable), MAX_DELIVERIES)
        message = delivery(redelivered=True)
        try:
            # When a redelivered message starts
            with pytest.raises(Retry, match="database unavailable: OperationalError") as raised:
                guard.before_process_message(services.broker, message)
            # (dramatiq then runs the after hooks, and Retries sends it again with backoff)
            guard.after_process_message(services.broker, message, exception=raised.value)
        finally:
            unreachable.dispose()

        # Then it is a retry, not an error that dead-letters it, and the next suspect may run
        assert lock_is_free(guard)


@pytest.fixture
def prefix(integration_settings: Settings) -> Iterator[str]:
    name = f"{integration_settings.queue_prefix}-guard-{uuid.uuid4().hex[:6]}"
    yield name
    svc.delete_queues(integration_settings.broker_url, name, [route.queue for route in QUEUE_ROUTES])


@pytest.fixture
def broker(integration_settings: Settings, prefix: str) -> Iterator[QuorumRabbitmqBroker]:
    built = make_broker(integration_settings.model_copy(update={"queue_prefix": prefix}))
    assert isinstance(built, QuorumRabbitmqBroker)
    dramatiq.actor(actor_name=SUBMIT.actor_name, queue_name=SUBMIT.queue_name(prefix), broker=built)(
        lambda payload: None
    )
    try:
        yield built
    finally:
        built.close()


def next_message(consumer: Any) -> Any:
    return svc.wait_until(lambda: next(consumer), timeout=20, what="a delivery")


class TestTheMarksRabbitmqGives:
    def test_a_first_delivery_has_neither_and_a_redelivery_both(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given a message on a quorum queue, and a worker's consumer on it
        queue = SUBMIT.queue_name(prefix)
        first_consumer = broker.consume(queue, prefetch=1, timeout=200)  # declares the queue
        assert isinstance(first_consumer, EnvelopeConsumer)
        connection = pika.BlockingConnection(pika.URLParameters(integration_settings.broker_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            body = envelope(queue, SUBMIT.actor_name, {})
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
        finally:
            connection.close()

        # When the consumer receives it and dies without acking it, and another one receives it
        first = next_message(first_consumer)
        first_consumer.close()
        second_consumer = broker.consume(queue, prefetch=1, timeout=200)
        try:
            second = next_message(second_consumer)
            second_consumer.ack(second)
        finally:
            second_consumer.close()

        # Then the first delivery says it is one, and the redelivery says it is not, both ways
        assert (first.redelivered, first.delivery_count, first_delivery(first)) == (False, None, True)
        assert (second.redelivered, second.delivery_count, first_delivery(second)) == (True, 1, False)
        assert second.message_id == first.message_id

    def test_a_producers_delivery_count_on_a_first_delivery_is_not_believed(
        self, broker: QuorumRabbitmqBroker, prefix: str, integration_settings: Settings
    ) -> None:
        # Given a message published with its own x-delivery-count header, as a hostile portal might,
        # to make its messages run one at a time as suspects
        queue = SUBMIT.queue_name(prefix)
        consumer = broker.consume(queue, prefetch=1, timeout=200)
        connection = pika.BlockingConnection(pika.URLParameters(integration_settings.broker_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            body = envelope(queue, SUBMIT.actor_name, {})
            properties = pika.BasicProperties(delivery_mode=2, headers={"x-delivery-count": 3})
            channel.basic_publish("", queue, body, properties, mandatory=True)
        finally:
            connection.close()

        # When a worker's consumer receives it
        try:
            message = next_message(consumer)
            consumer.ack(message)
        finally:
            consumer.close()

        # Then it is a first delivery, whatever the header said
        assert (message.redelivered, message.delivery_count, first_delivery(message)) == (False, None, True)
