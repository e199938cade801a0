"""The arithmetic of the bench: percentiles, open-loop schedules, rates and ratios (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``share`` of the values at or below it.

    Nearest rank never interpolates, so p99 of 1,000 latencies is the 990th smallest, a latency
    that was really seen.

    Parameters:
      values: the sample, in any order; not empty.
      share: between 0 and 1 (0.99 for p99).

    Raises:
      ValueError: the sample is empty or ``share`` is outside [0, 1].
    """
    if not values:
        raise ValueError("no values")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share {share} is not between 0 and 1")
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    """Percentiles of a sample of latencies, in milliseconds."""

    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def summarize_ms(seconds: Sequence[float]) -> Summary:
    """p50, p95, p99, max and mean of latencies given in seconds, reported in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return Summary(
        count=len(ms),
        p50_ms=percentile(ms, 0.50),
        p95_ms=percentile(ms, 0.95),
        p99_ms=percentile(ms, 0.99),
        max_ms=max(ms),
        mean_ms=sum(ms) / len(ms),
    )


def open_loop_schedule(rate: float, count: int, start: float = 0.0) -> list[float]:
    """Send times for an open-loop publisher: ``count`` messages at ``rate`` per second from ``start``.

    The i-th message is due at ``start + i / rate`` whatever happened to the ones before it:
    a publisher that falls behind sends late, and latency is measured from these due times, so
    a slow system cannot slow the load down and hide its queueing (coordinated omission).

    Raises:
      ValueError: ``rate`` is not positive or ``count`` is negative.
    """
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number of messages per second, not {rate}")
    if count < 0:
        raise ValueError(f"count must not be negative, not {count}")
    interval = 1.0 / rate
    return [start + i * interval for i in range(count)]


def latency_count(rate: float, seconds: float, max_requests: int, min_requests: int = 20) -> int:
    """How many requests a latency run sends: ``seconds`` worth at ``rate``, within the bounds."""
    return max(min_requests, min(max_requests, round(rate * seconds)))


def throughput(count: int, first_publish: float, last_done: float) -> float:
    """``count`` requests over the time from the first publish to the last one done, per second.

    Raises:
      ValueError: the interval is not positive.
    """
    elapsed = last_done - first_publish
    if elapsed <= 0:
        raise ValueError(f"the last request was done {elapsed:.6f}s after the first publish")
    return count / elapsed


def ratio(value: float | None, floor: float | None) -> float | None:
    """``value / floor``, or None where either is missing or the floor is zero."""
    if value is None or floor is None or floor == 0:
        return None
    return value / floor
