"""What a rollout does next, decided from what state.json recorded, the clock and what was
observed: pure functions, used alike by a running upgrade (its probation and drain loops)
and by `aipbxctl reconcile` resuming one that was interrupted (killed, a power cut). So an
interrupted upgrade runs the same steps it would have run: the rest of its probation, then
the drain of the old color until its deadline, then the stop.

Deadlines are boot-time (appliance.boottime). A deadline recorded in another boot has
passed: the old color and its connections went with that boot, and the new color, live
and enabled, came back with this one; probation is over (the watchdog supervises it, and
`aipbxctl rollback` is the way back), and so is the drain."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from appliance.boottime import Now
from appliance.colors import Color
from appliance.state import Draining, Probation, State

# How often a drain looks at what still uses the old color: one conntrack dump each time
# (a dump costs the host tens of milliseconds of CPU; at 1 s, two dumps, it was 45-65 ms
# of CPU per second of a 30 min drain).
POLL_S = 2.0

FAILURES_TO_FAIL = 3  # health checks failed in a row that fail a probation


class Act(StrEnum):
    NONE = "none"
    ABANDON = "abandon"  # interrupted before the switch: the new color goes, nothing switched
    PROBE = "probe"  # probation goes on: probe the new color, wait `wait_s`
    ROLL_BACK = "roll-back"  # probation failed: switch back to the old color
    KEEP = "keep"  # probation failed, but the old color is not running: nothing to go back to
    PASS = "pass"  # probation is over: drain the old color (or done without one)
    WAIT = "wait"  # the old color still serves: wait `wait_s`
    STOP_OLD = "stop-old"  # drained, or its deadline passed: stop it
    LIVE_AGAIN = "live-again"  # the draining color is live again (a rollback): forget the drain


@dataclass(frozen=True)
class Decision:
    act: Act
    why: str
    wait_s: float = 0.0


def probation(
    p: Probation, now: Now, *, failures: int, unit_active: bool, old_up: bool
) -> Decision:
    """The next step of a probation: `failures` health checks failed in a row so far,
    `unit_active` is the new color's unit, `old_up` the old color's (what a failure would
    switch back to)."""
    if not p.until.same_boot(now):
        return Decision(Act.PASS, "the machine restarted during probation: it is over")
    problem = None
    if failures >= FAILURES_TO_FAIL:
        problem = f"{failures} health checks failed in a row"
    elif not unit_active:
        problem = "the backend unit stopped"
    if problem is not None:
        if p.old_color is None or not old_up:
            return Decision(Act.KEEP, problem)
        return Decision(Act.ROLL_BACK, problem)
    left = p.until.left(now)
    if left <= 0:
        return Decision(Act.PASS, "healthy until its deadline")
    return Decision(Act.PROBE, f"{left:.0f}s left", wait_s=min(1.0, left))


def drain(d: Draining, live: Color | None, now: Now, *, idle: bool | None) -> Decision:
    """The next step of a drain; `idle`: nothing uses the color any more (None: not
    looked at)."""
    if live == d.color:
        return Decision(Act.LIVE_AGAIN, f"{d.color} is live again (rolled back)")
    if not d.until.same_boot(now):
        return Decision(Act.STOP_OLD, "the machine restarted: the drain is over")
    if idle:
        return Decision(Act.STOP_OLD, f"{d.color} drained")
    left = d.until.left(now)
    if left <= 0:
        return Decision(Act.STOP_OLD, "deadline")
    return Decision(Act.WAIT, f"{left:.0f}s left", wait_s=min(POLL_S, left))


def pending(st: State, now: Now) -> Decision:
    """What an interrupted rollout recorded in `st` needs first, before anything is
    observed (the caller holds the mutation lock: no rollout runs). NONE when nothing is
    pending; PROBE for a probation to resume; WAIT/STOP_OLD for a drain."""
    if st.probation is not None:
        p = st.probation
        if st.live_color != p.color:
            # A switch back was recorded after it (this cannot come from the code that
            # writes both at once; a hand edit): the probation is moot.
            return Decision(Act.PASS, f"{p.color} is not live any more")
        return probation(p, now, failures=0, unit_active=True, old_up=True)
    if st.upgrading:
        return Decision(Act.ABANDON, f"an interrupted upgrade to {st.upgrading} never switched")
    if st.draining is not None:
        return drain(st.draining, st.live_color, now, idle=None)
    return Decision(Act.NONE, "nothing pending")
