"""When to restart a unit that a breaker declared down: at once the first time, then no sooner
than the breaker's cool-down or the exponential backoff allows, and never more than the
budget allows in its window. Past the budget it stops restarting (and says so once) until
the window has room again. Pure: time is passed in.

The caller asks `decide()` only while a restart is wanted (a breaker of the unit opened
since the last restart) and calls `recovered()` once all the unit's breakers are closed."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Step:
    verb: str  # kill (arg: the signal), reset_failed, restart, start
    unit: str
    arg: str = ""


# Killed before every restart: the app's graceful stop waits 20-30 s for requests that
# hang anyway. Never killed: the netns anchor (a restart wires its veth again).
ALWAYS_KILLED = ("aipbx-backend@",)
NEVER_KILLED = ("aipbx-netns@",)


def steps(unit: str, *, hung: bool, runs_in: str | None = None) -> list[Step]:
    """How to restart a unit its breakers declared down. A hung unit (a check got no answer
    at all within its timeout: stopped, deadlocked) is killed first: a graceful stop would
    wait for it up to the unit's stop timeout (PostgreSQL: pg_ctl's 60 s, then systemd's),
    and the restart with it. A crashed or refusing one is restarted as usual. A unit that
    crash-looped into systemd's start limit refuses a plain restart; this restart is
    deliberate (and rationed by the budget), so the limit is cleared first.

    `runs_in`: the unit that runs the processes when `unit` is a wrapper that runs none
    (Debian's postgresql.service and postgresql@15-main.service): that one is killed and
    cleared, the wrapper restarted (which restarts it), and it is started in case the
    wrapper does not pull it in."""
    runner = runs_in or unit
    out = []
    if unit.startswith(ALWAYS_KILLED) or (hung and not unit.startswith(NEVER_KILLED)):
        out.append(Step("kill", runner, "SIGKILL"))
    out += [Step("reset_failed", runner), Step("restart", unit)]
    if runner != unit:
        out.append(Step("start", runner))
    return out
