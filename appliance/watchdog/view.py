"""What /system-health shows of the Monitor: each check, each unit's restarts, and the
watchdog's own state (impaired: some checks could not be run, restarts wait)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.watchdog.model import worst

if TYPE_CHECKING:
    from appliance.watchdog.monitor import Monitor


def snapshot(m: Monitor) -> dict[str, Any]:
    now = m.clock()

    def iso(mono: float | None) -> str | None:
        if mono is None:
            return None
        return datetime.fromtimestamp(m._wall_of(mono), UTC).isoformat(timespec="seconds")

    checks: dict[str, Any] = {}
    for cs in m.states.values():
        r = cs.result
        checks[cs.name] = {
            "state": str(r.status),
            "breaker": str(cs.breaker.state),
            "latency_ms": None if r.latency is None else round(r.latency * 1000, 1),
            "error": r.error,
            "detail": r.detail,
            "since": iso(cs.since),
            "unit": cs.unit,
            "failures": cs.breaker.failures,
        }
    restarts: dict[str, Any] = {}
    for unit, p in m.policies.items():
        allowed = p.next_allowed()
        restarts[unit] = {
            "total": p.budget.total,
            "in_window": p.budget.used(now),
            "budget": p.budget.limit,
            "window_s": p.budget.window,
            "exhausted": p.exhausted,
            "last": iso(p.last_restart),
            "backoff_s": p.backoff.delay(),
            "next_allowed_in_s": None if allowed is None else round(max(0.0, allowed - now), 1),
            "restarting": unit in m._restarting,
        }
    own = m.own
    t = m.current
    return {
        "status": str(worst([cs.result.status for cs in m.states.values()])),
        "live_color": t.color if t else None,
        "interval_s": m.s.interval,
        "rounds": m.rounds,
        "last_round": iso(m.last_round),
        "checks": checks,
        "restarts": restarts,
        # Impaired: it could not run some checks (its own fault); it restarts nothing.
        "watchdog": {
            "state": "impaired" if own.impaired else "ok",
            "since": iso(own.started),
            "error": own.last if own.impaired else "",
            "restarts_held": own.impaired,
        },
    }


def summary(m: Monitor) -> dict[str, Any]:
    """What the daemon's status line needs after every round: the part of `snapshot` that
    is cheap (no times, no restarts)."""
    t = m.current
    return {
        "live_color": t.color if t else None,
        "checks": {cs.name: {"state": str(cs.result.status)} for cs in m.states.values()},
    }
