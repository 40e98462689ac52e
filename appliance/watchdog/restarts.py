"""When to restart a unit that a breaker declared down: at once the first time, then no sooner
than the breaker's cool-down or the exponential backoff allows, and never more than the
budget allows in its window. Past the budget it stops restarting (and says so once) until
the window has room again. Pure: time is passed in.

The caller asks `decide()` only while a restart is wanted (a breaker of the unit opened
since the last restart) and calls `recovered()` once all the unit's breakers are closed."""

from __future__ import annotations

from enum import StrEnum

from appliance.watchdog.backoff import Backoff, RestartBudget


class Decision(StrEnum):
    WAIT = "wait"  # down, but the last restart is too recent
    RESTART = "restart"
    EXHAUSTED = "exhausted"  # down and over budget: the first time (tell the operator)
    BLOCKED = "blocked"  # still over budget


class RestartPolicy:
    def __init__(self, unit: str, backoff: Backoff, budget: RestartBudget, cooldown: float):
        self.unit = unit
        self.backoff = backoff
        self.budget = budget
        self.cooldown = cooldown
        self.last_restart: float | None = None
        self.exhausted = False

    def next_allowed(self) -> float | None:
        """The earliest time of the next restart, ignoring the budget (None: any time)."""
        if self.last_restart is None:
            return None
        return self.last_restart + max(self.cooldown, self.backoff.delay())

    def recovered(self) -> bool:
        """The unit is healthy: forget the backoff. True if there was one to forget."""
        if self.backoff.failures or self.exhausted:
            self.backoff.reset()
            self.exhausted = False
            return True
        return False

    def decide(self, now: float) -> Decision:
        allowed = self.next_allowed()
        if allowed is not None and now < allowed:
            return Decision.WAIT
        if not self.budget.allows(now):
            if self.exhausted:
                return Decision.BLOCKED
            self.exhausted = True
            return Decision.EXHAUSTED
        self.exhausted = False
        self.budget.record(now)
        self.last_restart = now
        self.backoff.failed()
        return Decision.RESTART
