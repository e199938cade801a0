"""The batch-confirm publisher's bookkeeping of acks, nacks and returns, fed frames by hand.

The I/O thread is not started: the test calls its callbacks as pika would, on one thread.
What it checks is what the real broker cannot be made to do on demand: single acks out of
order, a ``multiple`` ack after them, nacks, late acks, and that nothing stays behind.
"""

from __future__ import annotations

import ast
import inspect
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
import pytest

from infra.messaging.publisher import BatchConfirmPublisher, Outgoing, _Batch, _ConfirmRelay


class Channel:
    """Stands in for pika's channel: it only counts what was published."""

    def __init__(self) -> None:
        self.published = 0

    def basic_publish(self, *args: Any, **kwargs: Any) -> None:
        self.published += 1


@pytest.fixture
def relay() -> Iterator[_ConfirmRelay]:
    publisher = BatchConfirmPublisher("amqp://guest:guest@127.0.0.1:1/%2F", declare=lambda _: None)
    relay = _ConfirmRelay(publisher)
    relay.channel = Channel()
    relay.ready = True
    try:
        yield relay
    finally:
        relay.ioloop.close()


def batch_of(publisher: BatchConfirmPublisher, count: int) -> _Batch:
    messages = [Outgoing("q", "actor", {"n": i}, f"m{i}") for i in range(count)]
    return _Batch([publisher._frame(m) for m in messages], deadline=float("inf"))


def ack(tag: int, *, multiple: bool = False) -> pika.frame.Method:
    return pika.frame.Method(1, pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple))


def nack(tag: int, *, multiple: bool = False) -> pika.frame.Method:
    return pika.frame.Method(1, pika.spec.Basic.Nack(delivery_tag=tag, multiple=multiple))


def returned(message_id: str) -> tuple[Any, Any, Any, bytes]:
    method = pika.spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q")
    return None, method, pika.BasicProperties(message_id=message_id), b""


def test_a_multiple_ack_after_single_acks_answers_each_message_once(relay: _ConfirmRelay) -> None:
    batch = batch_of(relay.publisher, 5)
    relay._send(batch)
    relay._on_confirm(ack(2))
    relay._on_confirm(ack(4))
    assert list(relay.unconfirmed) == [1, 3, 5]
    relay._on_confirm(ack(5, multiple=True))
    assert batch.done.is_set()
    assert batch.confirmed == {f"m{i}" for i in range(5)}
    assert batch.unanswered == 0
    assert not relay.unconfirmed and not relay.inflight


def test_nacked_and_returned_messages_are_not_confirmed(relay: _ConfirmRelay) -> None:
    batch = batch_of(relay.publisher, 4)
    relay.publisher.declared.add("q")
    relay._send(batch)
    relay._on_return(*returned("m1"))  # a return comes before its ack
    relay._on_confirm(nack(3))
    relay._on_confirm(ack(4, multiple=True))
    assert batch.confirmed == {"m0", "m3"}
    assert "q" not in relay.publisher.declared  # returned from a queue by name: declared again next time


def test_late_and_unknown_acks_change_nothing(relay: _ConfirmRelay) -> None:
    batch = batch_of(relay.publisher, 2)
    relay._send(batch)
    relay._on_confirm(ack(2, multiple=True))
    assert batch.confirmed == {"m0", "m1"}
    relay._on_confirm(ack(2))
    relay._on_confirm(ack(7, multiple=True))
    assert batch.confirmed == {"m0", "m1"} and not relay.unconfirmed


def test_10000_confirms_in_any_mix_leave_nothing_and_take_each_entry_once(relay: _ConfirmRelay) -> None:
    # Given batches of 100 published back to back, 10,000 messages in all
    rng = random.Random(8)
    batches = [batch_of(relay.publisher, 100) for _ in range(100)]
    for batch in batches:
        relay._send(batch)
    # and each multiple ack's work, counted: how many entries it looked at
    looked = 0
    unconfirmed = relay.unconfirmed

    class Counting(type(unconfirmed)):  # type: ignore[misc]
        def popitem(self, last: bool = True) -> Any:
            nonlocal looked
            looked += 1
            return super().popitem(last)

    relay.unconfirmed = Counting(unconfirmed)

    # When they are answered in windows: single acks out of order, then one multiple ack
    tag = singled = 0
    while tag < 10_000:
        window = list(range(tag + 1, min(tag + rng.randint(1, 300), 10_000) + 1))
        singles = rng.sample(window, k=len(window) // 2)
        for single in singles:
            relay._on_confirm(ack(single))
        singled += len(singles)
        relay._on_confirm(ack(window[-1], multiple=True))
        tag = window[-1]

    # Then every message is confirmed, nothing is kept, and the multiple acks took only the
    # entries still unanswered: none was looked at twice, none re-added
    assert all(batch.confirmed == batch.ids for batch in batches)
    assert not relay.unconfirmed and not relay.inflight
    assert looked == 10_000 - singled


def explained_batch(publisher: BatchConfirmPublisher, count: int, prefix: str = "e") -> _Batch:
    messages = [Outgoing("q", "actor", {"n": i}, f"{prefix}{i}") for i in range(count)]
    return _Batch([publisher._frame(m) for m in messages], deadline=float("inf"), alone=True)


def closed_by_broker(relay: _ConfirmRelay) -> None:
    reason = pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no exchange 'x' in vhost '/'")
    relay._on_channel_closed(relay.channel, reason)


def test_an_explained_batch_says_why_each_message_was_not_confirmed(relay: _ConfirmRelay) -> None:
    batch = explained_batch(relay.publisher, 4)
    relay._submit(batch)
    relay._on_return(*returned("e1"))
    relay._on_confirm(nack(3))
    relay._on_confirm(ack(4, multiple=True))
    outcome = batch.outcome(batch.confirmed, None)
    assert outcome.confirmed == {"e0", "e3"}
    assert outcome.refused == {"e1": "unroutable: 312 NO_ROUTE"}
    assert outcome.nacked == {"e2"}
    assert (outcome.unanswered, outcome.closed_by_broker) == (None, False)


def test_an_explained_batch_has_the_channel_to_itself_so_a_close_is_blamed_on_it_alone(
    relay: _ConfirmRelay,
) -> None:
    # Given a batch of another thread in flight on the shared channel
    other = batch_of(relay.publisher, 2)
    relay._submit(other)
    # When an explained batch, then another plain one, are handed over
    explained = explained_batch(relay.publisher, 3)
    later = batch_of(relay.publisher, 2)
    relay._submit(explained)
    relay._submit(later)
    # Then the explained batch waits for the one in flight, and the later one waits behind it
    assert relay.channel.published == 2
    assert list(relay.waiting) == [explained, later]
    relay._on_confirm(ack(2, multiple=True))
    assert other.confirmed == other.ids
    assert relay.channel.published == 5 and list(relay.inflight) == [explained]
    assert list(relay.waiting) == [later]

    # When the broker closes the channel over one of the explained batch's messages
    relay._on_confirm(ack(3))  # the first was enqueued and confirmed before it
    closed_by_broker(relay)

    # Then the explained batch is told so, with the broker's reply; the later batch was never
    # on that channel, and waits for the next one
    outcome = explained.outcome(explained.confirmed, None)
    assert outcome.confirmed == {"e0"}
    assert outcome.closed_by_broker
    assert outcome.unanswered is not None and "404 NOT_FOUND" in outcome.unanswered
    assert not later.finished and list(relay.waiting) == [later]
    assert not relay.unconfirmed and not relay.inflight and relay.alone is None


def test_plain_batches_that_share_a_closed_channel_are_not_blamed_for_it(relay: _ConfirmRelay) -> None:
    first, second = batch_of(relay.publisher, 2), batch_of(relay.publisher, 2)
    relay._submit(first)
    relay._submit(second)
    closed_by_broker(relay)
    for batch in (first, second):
        outcome = batch.outcome(batch.confirmed, None)
        assert outcome.confirmed == set() and not outcome.closed_by_broker
        assert outcome.unanswered is not None and "closed the channel" in outcome.unanswered


def test_the_publisher_drives_no_private_part_of_pika() -> None:
    # Issue 8, point 2: the old publisher drove pika's private ``channel._impl``. The module the
    # publisher lives in touches no attribute named ``_impl``, whatever object it is on.
    path = inspect.getsourcefile(BatchConfirmPublisher)
    assert path is not None
    tree = ast.parse(Path(path).read_text(), filename=path)
    touched = [
        f"{path}:{node.lineno}"
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr == "_impl")
        or (isinstance(node, ast.Constant) and node.value == "_impl")  # getattr(x, "_impl")
    ]
    assert touched == []
