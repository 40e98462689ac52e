"""Exponential backoff and a sliding-window budget: pure, with time passed in from a
monotonic clock, so tests drive them with a fake one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# A monotonic clock in seconds (time.monotonic in the daemon, a fake in tests).
Clock = Callable[[], float]


class Backoff:
    """Delays of `initial`, doubling after each failure, capped at `cap`."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = max(cap, initial)
        self.failures = 0

    def delay(self) -> float:
        """The wait after the failures so far: 0 before the first, then initial, 2×, 4×…"""
        if self.failures == 0:
            return 0.0
        # min() before the power would be nicer, but 2**1000 is still an int: no overflow.
        return float(min(self.cap, self.initial * 2 ** min(self.failures - 1, 64)))

    def failed(self) -> float:
        self.failures += 1
        return self.delay()

    def reset(self) -> None:
        self.failures = 0


class RestartBudget:
    """At most `limit` events in any `window` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._events: deque[float] = deque()
        self.total = 0

    def _expire(self, now: float) -> None:
        while self._events and self._events[0] <= now - self.window:
            self._events.popleft()

    def used(self, now: float) -> int:
        self._expire(now)
        return len(self._events)

    def allows(self, now: float) -> bool:
        return self.used(now) < self.limit

    def record(self, now: float) -> None:
        self._expire(now)
        self._events.append(now)
        self.total += 1

    def frees_at(self, now: float) -> float:
        """When the next event will be allowed (now if it already is)."""
        if self.allows(now):
            return now
        return self._events[0] + self.window
