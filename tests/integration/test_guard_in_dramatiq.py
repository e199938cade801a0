"""The delivery guard inside dramatiq's own worker-thread code, against real PostgreSQL.

Each message goes through ``dramatiq.worker.WorkerThread.process_message``, on a broker
whose middleware is the guard and Retries, in the order accessflow installs them. What
the tests read is what dramatiq did: whether the actor ran, whether the message was
acknowledged, negatively acknowledged, or sent again by Retries, and what the guard wrote.

TimeLimit's exception is raised into a thread at chosen lines with a trace function, the
way ``PyThreadState_SetAsyncExc`` raises it: between any two lines of the guard.
"""

from __future__ import annotations

import linecache
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import dramatiq
import pytest
import sqlalchemy as sa
from dramatiq.brokers.rabbitmq import _RabbitmqMessage
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries
from dramatiq.middleware.time_limit import TimeLimitExceeded
from dramatiq.worker import WorkerThread
from sqlalchemy.orm import sessionmaker

from infra.bootstrap import Services
from infra.db import orm
from infra.db.engine import create_engine
from infra.messaging import delivery as delivery_module
from infra.messaging.delivery import DeliveryGuard
from infra.messaging.envelope import MESSAGE_ID_RULE, body_id
from infra.settings import Settings
from messages.routes import SUBMIT
from tests import services as svc

pytestmark = pytest.mark.integration

QUEUE = "accessflow.requests"
MAX_DELIVERIES = 3
#: Seconds a test waits for a thread it expects to finish; only a wedged guard comes near it.
DEADLINE = 20.0


def delivery(*, redelivered: bool, message_id: str | None = None) -> Any:
    """A message as accessflow's consumer hands it to a worker thread (dramatiq's proxy is untyped)."""
    message: Any = _RabbitmqMessage(
        redelivered,
        1,
        dramatiq.Message(
            queue_name=QUEUE,
            actor_name=SUBMIT.actor_name,
            args=({},),
            kwargs={},
            options={},
            message_id=str(uuid.uuid4()) if message_id is None else message_id,
            message_timestamp=0,
        ),
    )
    message.delivery_count = 1 if redelivered else None
    return message


class Settled:
    """Where dramatiq's worker thread hands a processed message back: a nack if it failed, else an ack."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    def post_process_message(self, message: Any) -> None:
        self.outcomes[message.message_id] = "nack" if message.failed else "ack"


class NoWorkQueue:
    """The work queue dramatiq's worker thread marks each message done on."""

    def task_done(self) -> None:
        pass


class Pool:
    """One worker process: the guard and Retries on a broker, and dramatiq's worker-thread code.

    The actor records each run; a message whose id is in ``hold`` waits in its actor until
    that event is set, and one in ``fail`` raises.
    """

    def __init__(self, guard: DeliveryGuard) -> None:
        self.guard = guard
        self.broker = StubBroker(middleware=[])
        self.broker.add_middleware(guard)
        self.broker.add_middleware(Retries(max_retries=3, min_backoff=10, max_backoff=100))
        self.settled = Settled()
        self.ran: list[str] = []
        self.started: dict[str, threading.Event] = {}
        self.hold: dict[str, threading.Event] = {}
        self.fail: set[str] = set()

        def actor(payload: dict[str, Any]) -> None:
            message_id = self.current()
            self.ran.append(message_id)
            if message_id in self.started:
                self.started[message_id].set()
            if message_id in self.hold:
                assert self.hold[message_id].wait(DEADLINE), "the test never let the actor finish"
            if message_id in self.fail:
                raise RuntimeError("boom")

        dramatiq.actor(actor_name=SUBMIT.actor_name, queue_name=QUEUE, broker=self.broker)(actor)
        self.local = threading.local()
        self.thread: Any = WorkerThread(
            broker=self.broker,
            consumers={QUEUE: self.settled},  # type: ignore[dict-item]
            work_queue=NoWorkQueue(),  # type: ignore[arg-type]
            worker_timeout=100,
        )

    def current(self) -> str:
        return str(self.local.message_id)

    def process(self, message: Any) -> None:
        """Process ``message`` on the calling thread, as one of dramatiq's worker threads does."""
        self.local.message_id = message.message_id
        self.thread.process_message(message)

    def retried(self) -> list[str]:
        """Ids of the messages Retries has sent again (to the delay queue)."""
        queue = self.broker.queues[f"{QUEUE}.DQ"]
        return [dramatiq.Message.decode(body).message_id for body in list(queue.queue)]


class Run:
    """A thread that processes messages in a pool, and may wait for ``finish`` before it ends."""

    def __init__(self, work: Callable[[Run], None]) -> None:
        self.escaped: BaseException | None = None
        self.finish = threading.Event()

        def target() -> None:
            try:
                work(self)
            except BaseException as error:  # what escapes process_message kills a dramatiq worker thread
                self.escaped = error

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def joined(self) -> bool:
        self.thread.join(DEADLINE)
        return not self.thread.is_alive()


def interrupt_at(line: int | None, seen: list[int]) -> Callable[[FrameType, str, Any], Any]:
    """A trace function raising TimeLimitExceeded before the ``line``-th line the guard's module runs.

    Lines of other modules are not counted, nor the return to a ``with`` line that calls its
    ``__exit__``: CPython delivers an exception raised into a thread only at a call, a
    function's start or a loop's jump, and none comes between a block's end and that call.
    ``seen`` gets the number of each line counted.
    """
    guard_file = delivery_module.__file__

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != guard_file:
            return None
        previous = [0]

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "line":
                number = frame.f_lineno
                text = linecache.getline(guard_file, number).lstrip()
                back_to_with = number < previous[0] and text.startswith("with ")
                previous[0] = number
                if not back_to_with:
                    seen.append(number)
                    if len(seen) == line:
                        raise TimeLimitExceeded()  # and the trace function is removed: TimeLimit raises once
            return local

        return local

    return calls


def traced(tracer: Callable[[FrameType, str, Any], Any], work: Callable[[], None]) -> None:
    sys.settrace(tracer)
    try:
        work()
    finally:
        sys.settrace(None)


def counter_rows(services: Services, message_id: str) -> int:
    with services.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(orm.deliveries)
                .where(orm.deliveries.c.message_id == message_id)
            ).scalar_one()
        )


def refusal_of(services: Services, kept_id: str) -> sa.Row[Any] | None:
    with services.engine.connect() as connection:
        return connection.execute(
            sa.select(orm.malformed_messages).where(orm.malformed_messages.c.message_id == kept_id)
        ).one_or_none()


class TestTheSuspectTurn:
    def test_a_suspect_waits_a_bounded_time_behind_one_that_hangs_then_is_retried(
        self, services: Services
    ) -> None:
        # Given a redelivered message whose actor hangs (a blocking call TimeLimit cannot interrupt)
        pool = Pool(DeliveryGuard(services.session_factory, MAX_DELIVERIES, suspect_wait_seconds=0.2))
        hanging, waiting = delivery(redelivered=True), delivery(redelivered=True)
        pool.started[hanging.message_id] = threading.Event()
        pool.hold[hanging.message_id] = release = threading.Event()
        holder = Run(lambda _: pool.process(hanging))
        assert pool.started[hanging.message_id].wait(DEADLINE)

        # When another redelivered message comes to the same process
        waiter = Run(lambda _: pool.process(waiting))

        # Then it gives up waiting, does not run, and Retries sends it again: its thread is free
        try:
            assert waiter.joined(), "a suspect waits for its turn without bound"
            assert waiter.escaped is None
            assert pool.ran == [hanging.message_id]
            assert pool.retried() == [waiting.message_id]
            assert pool.settled.outcomes[waiting.message_id] == "ack"
            assert counter_rows(services, waiting.message_id) == 0
        finally:
            release.set()
            assert holder.joined()

    @pytest.mark.parametrize("actor_raises", [False, True], ids=["actor returns", "actor raises"])
    @pytest.mark.parametrize("thread_lives_on", [False, True], ids=["thread dies", "thread lives on"])
    def test_an_exception_raised_into_a_suspect_between_any_two_lines_of_the_guard_wedges_nothing(
        self, services: Services, actor_raises: bool, thread_lives_on: bool
    ) -> None:
        # Given the lines the guard runs for one redelivered message, start to end
        lines: list[int] = []
        pool = Pool(DeliveryGuard(services.session_factory, MAX_DELIVERIES))
        counted = delivery(redelivered=True)
        if actor_raises:
            pool.fail.add(counted.message_id)
        traced(interrupt_at(None, lines), lambda: pool.process(counted))
        assert len(lines) > 10

        for line in range(1, len(lines) + 1):
            where = f"interrupted before line {lines[line - 1]} of {delivery_module.__name__}"
            # When TimeLimit's exception lands before that line, in a process of its own; and the
            # thread then dies, or goes on to another redelivered message (unless the exception
            # escaped dramatiq's process_message, which ends a worker thread)
            pool = Pool(DeliveryGuard(services.session_factory, MAX_DELIVERIES))
            first, then, other = (delivery(redelivered=True) for _ in range(3))
            if actor_raises:
                pool.fail.add(first.message_id)
            run = Run(interrupted(pool, first, then, line=line, lives_on=thread_lives_on))
            if thread_lives_on:
                svc.wait_until(
                    lambda run=run, pool=pool, then=then: (
                        then.message_id in pool.settled.outcomes or not run.thread.is_alive()
                    ),
                    what=f"the interrupted thread to go on ({where})",
                )

            # Then a redelivered message on another thread of the process still gets its turn, and runs
            other_thread = Run(lambda _, pool=pool, other=other: pool.process(other))
            wedged = not other_thread.joined()
            run.finish.set()
            assert run.joined(), f"{where}: the interrupted thread never ended"
            assert not wedged, f"{where}: the turn is held for ever"
            assert other_thread.escaped is None, where
            assert other.message_id in pool.ran, where
            assert counter_rows(services, other.message_id) == 0, where


def interrupted(pool: Pool, first: Any, then: Any, *, line: int, lives_on: bool) -> Callable[[Run], None]:
    """Work for a thread: ``first``, interrupted before the guard's ``line``-th line; then maybe ``then``."""

    def work(run: Run) -> None:
        traced(interrupt_at(line, []), lambda: pool.process(first))  # what escapes ends the thread
        if lives_on:
            pool.process(then)
            assert run.finish.wait(DEADLINE)

    return work


@pytest.fixture
def dramatiq_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="dramatiq"):
        yield caplog


def unexpected_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Unexpected failure")]


class TestTheGuardFailsClosed:
    @pytest.mark.parametrize("redelivered", [False, True], ids=["first delivery", "redelivery"])
    @pytest.mark.parametrize(
        "message_id",
        [
            "a" * 201,
            "a" * 129,
            "",
            "-starts-with-a-dash",
            "line\nbreak",
            "space inside",
            "ünïcode",
            "nul\x00",
        ],
        ids=["201 chars", "129 chars", "empty", "dash first", "newline", "space", "non-ascii", "nul"],
    )
    def test_a_message_with_an_id_accessflow_never_gives_is_refused_with_its_reason(
        self, services: Services, dramatiq_log: pytest.LogCaptureFixture, message_id: str, redelivered: bool
    ) -> None:
        # Given a message whose id no edge of accessflow lets through, reaching the guard another way
        pool = Pool(DeliveryGuard(services.session_factory, MAX_DELIVERIES))
        message = delivery(redelivered=redelivered, message_id=message_id)

        # When dramatiq processes it
        pool.process(message)

        # Then it does not run, is recorded with the reason under its id's hash, and is acknowledged
        assert pool.ran == []
        row = refusal_of(services, body_id(message_id.encode("utf-8", errors="backslashreplace")))
        assert row is not None
        assert (row.reason, row.kind, row.queue_name, row.actor_name) == (
            MESSAGE_ID_RULE,
            "malformed",
            QUEUE,
            SUBMIT.actor_name,
        )
        assert pool.settled.outcomes[message_id] == "ack"
        assert pool.retried() == []
        assert unexpected_failures(dramatiq_log) == []

    def test_a_well_formed_message_behind_a_refused_one_runs(self, services: Services) -> None:
        # Given a redelivered message with an over-long id, and a good one after it on the same thread
        pool = Pool(DeliveryGuard(services.session_factory, MAX_DELIVERIES))
        refused, good = delivery(redelivered=True, message_id="x" * 250), delivery(redelivered=True)

        # When dramatiq processes both
        pool.process(refused)
        pool.process(good)

        # Then the good one runs, counted and forgotten as usual
        assert pool.ran == [good.message_id]
        assert pool.settled.outcomes[good.message_id] == "ack"
        assert counter_rows(services, good.message_id) == 0

    def test_a_database_that_is_down_makes_a_redelivery_a_retry_not_an_unguarded_run(
        self, services: Services, integration_settings: Settings, dramatiq_log: pytest.LogCaptureFixture
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
        pool = Pool(DeliveryGuard(sessionmaker(unreachable), MAX_DELIVERIES))
        message = delivery(redelivered=True)
        try:
            # When dramatiq processes a redelivered message
            pool.process(message)
        finally:
            unreachable.dispose()

        # Then it does not run unguarded: Retries sends it again, with backoff
        assert pool.ran == []
        assert pool.retried() == [message.message_id]
        assert unexpected_failures(dramatiq_log) == []

    def test_a_guard_that_fails_unexpectedly_lets_nothing_run_and_the_retries_bound_it(
        self, services: Services, integration_settings: Settings, dramatiq_log: pytest.LogCaptureFixture
    ) -> None:
        # Given a guard whose statements fail for a reason no retry fixes: it sees no tables
        blind = sa.create_engine(
            integration_settings.database_url, connect_args={"options": "-c search_path=nowhere"}
        )
        pool = Pool(DeliveryGuard(sessionmaker(blind), MAX_DELIVERIES))
        message = delivery(redelivered=True)
        try:
            # When dramatiq processes a redelivered message
            pool.process(message)
        finally:
            blind.dispose()

        # Then it does not run: the failure is one Retries counts, and bounds
        assert pool.ran == []
        assert pool.retried() == [message.message_id]
        assert unexpected_failures(dramatiq_log) == []
