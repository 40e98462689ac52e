"""A circuit breaker per check, as an explicit state machine with time passed in.

CLOSED: the check runs every interval; `failures_to_open` failures in a row open it.
OPEN: the target is declared down (its unit is restarted) and the check is not run while
the cool-down lets the unit start. Then HALF_OPEN: the next check is one probe; success
closes the breaker, failure opens it again for another cool-down.

After a restart of its unit (`restarted`), the breaker goes HALF_OPEN at once (never
while the restart runs: the caller does not poll it meanwhile) and the check runs every
round; failures within the cool-down are the unit still starting, not a failed restart."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Transition:
    old: BreakerState
    new: BreakerState
    at: float
    failures: int  # consecutive failures when it happened


class Breaker:
    def __init__(self, failures_to_open: int, cooldown: float) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.changed_at: float | None = None  # None: closed since the start
        self.settling_until: float | None = None  # HALF_OPEN after a restart: until then

    def _to(self, new: BreakerState, now: float) -> Transition:
        t = Transition(self.state, new, now, self.failures)
        self.state = new
        self.changed_at = now
        self.settling_until = None
        return t

    def restarted(self, now: float) -> Transition | None:
        """The unit was restarted (the restart returned): OPEN -> HALF_OPEN, probing every
        round; a failure reopens it only once the cool-down since now has passed."""
        if self.state is not BreakerState.OPEN:
            return None
        t = self._to(BreakerState.HALF_OPEN, now)
        self.settling_until = now + self.cooldown
        return t

    def poll(self, now: float) -> Transition | None:
        """Time-driven transition: OPEN -> HALF_OPEN once the cool-down has passed."""
        if (
            self.state is BreakerState.OPEN
            and self.changed_at is not None
            and now - self.changed_at >= self.cooldown
        ):
            return self._to(BreakerState.HALF_OPEN, now)
        return None

    @property
    def settling(self) -> bool:
        """HALF_OPEN after a restart, within its cool-down."""
        return self.settling_until is not None

    @property
    def probing(self) -> bool:
        """Whether the check should run now (not while OPEN)."""
        return self.state is not BreakerState.OPEN

    def record(self, ok: bool, now: float) -> Transition | None:
        if ok:
            self.failures = 0
            if self.state is not BreakerState.CLOSED:
                return self._to(BreakerState.CLOSED, now)
            return None
        self.failures += 1
        if self.settling_until is not None and now < self.settling_until:
            return None  # still starting after its restart
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.failures_to_open
        ):
            return self._to(BreakerState.OPEN, now)
        return None

    def reset(self, now: float) -> Transition | None:
        """Forget everything (the target went away or changed)."""
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            return self._to(BreakerState.CLOSED, now)
        return None
