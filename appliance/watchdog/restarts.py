"""When to restart a unit whose checks are down: at once the first time, then no sooner than
the breaker's cool-down or the exponential backoff allows, and never more than the budget
allows in its window. Past the budget it stops restarting (and says so once) until the
window has room again. Pure: time is passed in."""

from __future__ import annotations

from enum import StrEnum

from appliance.watchdog.backoff import Backoff, RestartBudget


class Decision(StrEnum):
    NONE = "none"  # nothing is down
    RECOVERED = "recovered"  # it was restarted or over budget and is up again
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

    def decide(self, down: bool, now: float) -> Decision:
        if not down:
            if self.backoff.failures or self.exhausted:
                self.backoff.reset()
                self.exhausted = False
                return Decision.RECOVERED
            return Decision.NONE
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
