"""One round of checks and what follows from it: breaker transitions, restarts through
systemd (Services), alerts, and the journal entries of every transition and action.

The state machines (Breaker, RestartPolicy, IncidentTracker) decide; this module does:
it runs the checks, feeds them the results and the time, and carries out their decisions.
Restarts run in a thread as tasks of their own, so a slow `systemctl restart` never holds
up the next round of checks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from appliance.errors import AipbxError
from appliance.services import Services
from appliance.watchdog.alerts import Alert, IncidentTracker, Severity
from appliance.watchdog.backoff import Backoff, Clock, RestartBudget
from appliance.watchdog.breaker import Breaker, BreakerState, Transition
from appliance.watchdog.checks import (
    ALL_CHECKS,
    NGINX_UNIT,
    PGBOUNCER_UNIT,
    POSTGRESQL_UNIT,
    SWITCH_UNIT,
    Checks,
    Targets,
    target_of,
    unit_of,
)
from appliance.watchdog.model import Result, Status, worst
from appliance.watchdog.restarts import Decision, RestartPolicy
from appliance.watchdog.settings import Settings

log = logging.getLogger("aipbx.watchdog")

STATUS_LEVEL = {
    Status.CRITICAL: logging.ERROR,
    Status.WARNING: logging.WARNING,
    Status.OK: logging.INFO,
    Status.IDLE: logging.INFO,
}


class Publisher(Protocol):
    """Where alerts go: the Alerter, or a small fake in tests."""

    def publish(self, alert: Alert) -> None: ...


@dataclass
class CheckState:
    name: str
    breaker: Breaker
    tracker: IncidentTracker
    result: Result = field(default_factory=lambda: Result(Status.IDLE, detail="not run yet"))
    since: float = 0.0  # when `result.status` was first seen
    target: str = ""
    unit: str | None = None
    runs: int = 0


class Monitor:
    def __init__(
        self,
        settings: Settings,
        targets: Callable[[], Targets],
        services: Services,
        publisher: Publisher,
        *,
        clock: Clock = time.monotonic,
        wall: Callable[[], float] = time.time,
        enabled: Collection[str] = ALL_CHECKS,
        change_running: Callable[[], bool] = lambda: False,
        repair_switch: Callable[[], object] | None = None,
    ) -> None:
        self.s = settings
        # An upgrade or rollback holds the mutation lock: it owns the backends meanwhile
        # (its probation switches back on failure), so their restarts wait.
        self.change_running = change_running
        # Puts the nft switch table back from state.json (appliance.reconcile.network).
        self.repair_switch = repair_switch
        self._deferred_logged = False
        self._muted: set[str] = set()  # incidents folded into another check's alert
        self.targets = targets
        self.services = services
        self.publisher = publisher
        self.clock = clock
        self.wall = wall
        self.checks = Checks(settings, services, clock)
        now = clock()
        self.started = now
        self.last_round: float | None = None
        self.rounds = 0
        self.current: Targets | None = None
        self.states = {
            name: CheckState(
                name,
                Breaker(settings.failures_to_open, settings.cooldown),
                IncidentTracker(name, settings.critical_after, settings.failures_to_open),
                since=now,
            )
            for name in ALL_CHECKS
            if name in enabled
        }
        self.policies: dict[str, RestartPolicy] = {}
        for unit in (NGINX_UNIT, POSTGRESQL_UNIT, PGBOUNCER_UNIT):
            self._policy(unit)
        self._restarting: dict[str, asyncio.Task[None]] = {}
        # Units a breaker declared down (it opened) since their last restart.
        self._wanted: set[str] = set()

    def _policy(self, unit: str) -> RestartPolicy:
        if unit not in self.policies:
            self.policies[unit] = RestartPolicy(
                unit,
                Backoff(self.s.backoff_initial, self.s.backoff_max),
                RestartBudget(self.s.restart_budget, self.s.restart_window),
                self.s.cooldown,
            )
        return self.policies[unit]

    # -- one round

    async def round(self) -> None:
        t = self.targets()
        self.current = t
        now = self.clock()
        due = []
        for cs in self.states.values():
            target = target_of(cs.name, t)
            if target != cs.target:
                self._log_breaker(cs, cs.breaker.reset(now))
                cs.target = target
            cs.unit = unit_of(cs.name, t)
            if cs.unit:
                self._policy(cs.unit)
            self._log_breaker(cs, cs.breaker.poll(now))
            if cs.breaker.probing:
                due.append(cs)
        results = await asyncio.gather(*(self.checks.run(cs.name, t) for cs in due))
        now = self.clock()
        for cs, result in zip(due, results, strict=True):
            self._record(cs, result, now)
        for cs in self.states.values():
            detail = cs.result.error or cs.result.detail
            for alert in cs.tracker.observe(cs.result.status, now, detail):
                if self._folded(cs, alert):
                    continue
                self._publish(alert)
        self._restart_what_is_down(now)
        self.last_round = now
        self.rounds += 1

    def _record(self, cs: CheckState, result: Result, now: float) -> None:
        old = cs.result.status
        cs.result = result
        cs.runs += 1
        if result.status is Status.IDLE:
            self._log_breaker(cs, cs.breaker.reset(now))
        else:
            t = cs.breaker.record(not result.status.failed, now)
            self._log_breaker(cs, t)
            if t is not None and t.new is BreakerState.OPEN and cs.unit:
                self._want_restart(cs.unit, t, now)
        if result.status is not old:
            cs.since = now
            self._log_status(cs, old)

    def _want_restart(self, unit: str, t: Transition, now: float) -> None:
        # A failed probe after the cool-down says the last restart did not help. A breaker
        # that merely opened while its unit restarts (another check of the same unit,
        # lagging behind) is answered by that restart already.
        last = self._policy(unit).last_restart
        recent = unit in self._restarting or (last is not None and now - last < self.s.cooldown)
        if t.old is BreakerState.HALF_OPEN or not recent:
            self._wanted.add(unit)

    def _log_status(self, cs: CheckState, old: Status) -> None:
        new = cs.result.status
        if new is Status.OK and old in (Status.CRITICAL, Status.WARNING):
            text = f"{cs.name} is ok again ({cs.result.detail})"
        elif new in (Status.OK, Status.IDLE):
            text = f"{cs.name}: {new} ({cs.result.detail})"
        else:
            text = f"{cs.name}: {new}: {cs.result.error}"
        fields = {"check": cs.name, "state": str(new), "previous": str(old)}
        if cs.unit:
            fields["unit"] = cs.unit
        log.log(STATUS_LEVEL[new], text, extra={"fields": fields})

    def _log_breaker(self, cs: CheckState, t: Transition | None) -> None:
        if t is None:
            return
        if t.new is BreakerState.OPEN:
            level, why = logging.WARNING, f"after {t.failures} failures: {cs.result.error}"
        elif t.new is BreakerState.HALF_OPEN:
            level, why = logging.INFO, "cool-down over, probing"
        else:
            level, why = logging.INFO, "closed"
        fields = {"check": cs.name, "state": str(cs.result.status), "breaker": str(t.new)}
        if cs.unit:
            fields["unit"] = cs.unit
        text = f"{cs.name}: breaker {t.old} -> {t.new} ({why})"
        log.log(level, text, extra={"fields": fields})

    # -- restarts

    def _restart_what_is_down(self, now: float) -> None:
        by_unit: dict[str, list[CheckState]] = {}
        for cs in self.states.values():
            if cs.unit:
                by_unit.setdefault(cs.unit, []).append(cs)
        self._wanted &= set(by_unit)
        for unit, states in by_unit.items():
            policy = self._policy(unit)
            if all(cs.breaker.state is BreakerState.CLOSED for cs in states):
                self._wanted.discard(unit)
                if policy.recovered():
                    log.info(
                        "%s is healthy again; its restart backoff is reset",
                        unit,
                        extra={"fields": {"unit": unit, "action": "recovered"}},
                    )
            if unit in self._restarting or unit not in self._wanted:
                continue
            owned_by_change = unit.startswith("aipbx-backend@") or unit == SWITCH_UNIT
            if owned_by_change and self.change_running():
                if not self._deferred_logged:
                    log.warning(
                        "%s is down, but an upgrade or rollback is running: its restart waits",
                        unit,
                        extra={"fields": {"unit": unit, "action": "restart_deferred"}},
                    )
                    self._deferred_logged = True
                continue
            self._deferred_logged = False
            down = [cs for cs in states if cs.breaker.state is not BreakerState.CLOSED]
            was_exhausted = policy.exhausted
            decision = policy.decide(now)
            if decision is Decision.RESTART:
                self._wanted.discard(unit)
                why = "; ".join(f"{cs.name}: {cs.result.error}" for cs in down)
                if was_exhausted:
                    log.warning(
                        "restart budget of %s has room again",
                        unit,
                        extra={"fields": {"unit": unit, "action": "budget_available"}},
                    )
                self._restarting[unit] = asyncio.create_task(self._restart(unit, why, down))
            elif decision is Decision.EXHAUSTED:
                self._give_up(unit, policy, down, now)

    async def _restart(self, unit: str, why: str, down: list[CheckState]) -> None:
        checks = ",".join(cs.name for cs in down)
        fields = {"action": "restart", "unit": unit, "check": checks, "state": "critical"}
        verb = "restor" if unit == SWITCH_UNIT else "restart"  # the table is applied again
        log.warning("%sing %s (%s)", verb, unit, why, extra={"fields": fields})
        try:
            await asyncio.to_thread(self._reset_and_restart, unit)
        except Exception as e:
            log.error(
                "restart of %s failed: %s",
                unit,
                e,
                extra={"fields": {**fields, "outcome": "failed"}},
            )
        else:
            log.info("%sed %s", verb, unit, extra={"fields": {**fields, "outcome": "ok"}})
        finally:
            del self._restarting[unit]

    def _reset_and_restart(self, unit: str) -> None:
        if unit == SWITCH_UNIT:
            if self.repair_switch is None:
                raise AipbxError("this watchdog cannot restore the nft switch table")
            self.repair_switch()
            return
        # A unit that crash-looped into systemd's start limit refuses a plain restart; this
        # restart is deliberate (and rationed by the budget), so clear the limit first.
        if unit.startswith("aipbx-backend@"):
            # It stopped answering: a graceful stop would wait out the app's own timeout
            # (20-30 s) for requests that hang anyway. Kill it; systemd's restart follows.
            self.services.kill(unit, "SIGKILL")
        self.services.reset_failed(unit)
        self.services.restart(unit)

    def _give_up(
        self, unit: str, policy: RestartPolicy, down: list[CheckState], now: float
    ) -> None:
        budget = policy.budget
        text = (
            f"{unit} was restarted {budget.limit} times within {budget.window:g} s and is "
            f"still down; not restarting it until {budget.frees_at(now) - now:.0f} s from "
            "now, still probing"
        )
        checks = ",".join(cs.name for cs in down)
        fields = {"action": "give_up", "unit": unit, "check": checks, "state": "critical"}
        log.critical(text, extra={"fields": fields})
        if self._unit_alerted(unit, None):
            return  # the operator has this unit's CRITICAL already; the journal says the rest
        incident = f"restart:{unit}#{budget.total}"
        self._publish(Alert(Severity.CRITICAL, f"restart:{unit}", text, incident, now))

    # -- one alert per unit: its checks (backend HTTP and WebSocket) are one incident

    def _unit_alerted(self, unit: str, other_than: CheckState | None) -> bool:
        return any(
            o is not other_than
            and o.unit == unit
            and o.tracker.started is not None
            and o.tracker.critical_sent
            and o.tracker.incident not in self._muted
            for o in self.states.values()
        )

    def _folded(self, cs: CheckState, alert: Alert) -> bool:
        """True when another check of the same unit already alerted for this incident:
        this check's CRITICAL, and later its recovery, are folded into that alert."""
        if alert.incident in self._muted:
            if alert.severity is Severity.INFO:
                self._muted.discard(alert.incident)
            return True
        if cs.unit and alert.severity is Severity.CRITICAL and self._unit_alerted(cs.unit, cs):
            self._muted.add(alert.incident)
            log.warning(
                "%s",
                alert.text,
                extra={"fields": {"check": cs.name, "unit": cs.unit, "action": "alert_folded"}},
            )
            return True
        return False

    def _publish(self, alert: Alert) -> None:
        self.publisher.publish(replace(alert, wall=self._wall_of(alert.at)))

    # -- what survives a restart (appliance.watchdog.spool)

    def alert_state(self) -> dict[str, Any]:
        now, wall = self.clock(), self.wall()
        return {
            "incidents": {n: cs.tracker.state_doc(now, wall) for n, cs in self.states.items()},
            "muted": sorted(self._muted),
        }

    def resume_alert_state(self, doc: object) -> None:
        """Open incidents from before a restart: not alerted again, their INFO still sent."""
        if not isinstance(doc, dict):
            return
        now, wall = self.clock(), self.wall()
        incidents = doc.get("incidents")
        if isinstance(incidents, dict):
            for name, cs in self.states.items():
                cs.tracker.resume(incidents.get(name), now, wall)
        muted = doc.get("muted")
        if isinstance(muted, list):
            self._muted |= {m for m in muted if isinstance(m, str)}

    # -- what the API shows

    def _wall_of(self, mono: float) -> float:
        return self.wall() - (self.clock() - mono)

    def _iso(self, mono: float | None) -> str | None:
        if mono is None:
            return None
        return datetime.fromtimestamp(self._wall_of(mono), UTC).isoformat(timespec="seconds")

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        checks: dict[str, Any] = {}
        for cs in self.states.values():
            r = cs.result
            checks[cs.name] = {
                "state": str(r.status),
                "breaker": str(cs.breaker.state),
                "latency_ms": None if r.latency is None else round(r.latency * 1000, 1),
                "error": r.error,
                "detail": r.detail,
                "since": self._iso(cs.since),
                "unit": cs.unit,
                "failures": cs.breaker.failures,
            }
        restarts: dict[str, Any] = {}
        for unit, p in self.policies.items():
            allowed = p.next_allowed()
            restarts[unit] = {
                "total": p.budget.total,
                "in_window": p.budget.used(now),
                "budget": p.budget.limit,
                "window_s": p.budget.window,
                "exhausted": p.exhausted,
                "last": self._iso(p.last_restart),
                "backoff_s": p.backoff.delay(),
                "next_allowed_in_s": None if allowed is None else round(max(0.0, allowed - now), 1),
                "restarting": unit in self._restarting,
            }
        t = self.current
        return {
            "status": str(worst([cs.result.status for cs in self.states.values()])),
            "live_color": t.color if t else None,
            "interval_s": self.s.interval,
            "rounds": self.rounds,
            "last_round": self._iso(self.last_round),
            "checks": checks,
            "restarts": restarts,
        }
