"""One round of checks and what follows from it: breaker transitions, restarts through
systemd (Services), alerts, and the journal entries of every transition and action.

The state machines (Breaker, RestartPolicy, IncidentTracker, OwnFault) decide; this module
does: it runs the checks, feeds them the results and the time, and carries out their
decisions. Restarts run in a thread as tasks of their own, so a slow `systemctl restart`
never holds up the next round of checks; while one runs, its unit's breakers wait for it.

A check the watchdog could not run (UNKNOWN: its own fault) counts for nothing: no breaker
failure, no incident of the service. It impairs the watchdog (OwnFault), which then
restarts nothing until it has run all its checks again for a few rounds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from appliance.errors import AipbxError
from appliance.services import Services
from appliance.watchdog import journal, view
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
from appliance.watchdog.model import Result, Status
from appliance.watchdog.ownfault import Fault, OwnFault
from appliance.watchdog.restarts import Decision, RestartPolicy, steps
from appliance.watchdog.settings import Settings

log = logging.getLogger("aipbx.watchdog")

# Units an upgrade or rollback owns while it runs: their restarts wait for it.
OWNED_BY_CHANGE = ("aipbx-backend@", "aipbx-netns@", SWITCH_UNIT)


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
        self.own = OwnFault(settings.failures_to_open)
        self._held_logged = False

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
            # A failing result may name another unit to repair (a netns for PgBouncer).
            cs.unit = (cs.result.unit if cs.result.status.failed else None) or unit_of(cs.name, t)
            if cs.unit:
                self._policy(cs.unit)
            if cs.unit not in self._restarting:  # the half-open probe waits for a restart
                self._log_breaker(cs, cs.breaker.poll(now))
            if cs.breaker.probing:
                due.append(cs)
        results = await asyncio.gather(*(self.checks.run(cs.name, t) for cs in due))
        now = self.clock()
        faults = []
        for cs, result in zip(due, results, strict=True):
            self._record(cs, result, now)
            if result.status is Status.UNKNOWN:
                faults.append(Fault(cs.name, result.error))
        for cs in self.states.values():
            if cs.result.status is Status.UNKNOWN:
                continue  # says nothing about the service: its incident stays as it is
            detail = cs.result.error or cs.result.detail
            for alert in cs.tracker.observe(cs.result.status, now, detail):
                if self._folded(cs, alert):
                    continue
                self._publish(alert)
        self._own_fault(faults, now)
        self._restart_what_is_down(now)
        self.last_round = now
        self.rounds += 1

    def _record(self, cs: CheckState, result: Result, now: float) -> None:
        old = cs.result.status
        cs.result = result
        cs.runs += 1
        if result.status is Status.IDLE:
            self._log_breaker(cs, cs.breaker.reset(now))
        elif result.status is Status.UNKNOWN:
            pass  # the watchdog's own failure: neither a failure nor a success
        else:
            t = cs.breaker.record(not result.status.failed, now)
            self._log_breaker(cs, t)
            if t is not None and t.new is BreakerState.OPEN and cs.unit:
                self._want_restart(cs.unit, t, now)
        if result.status is not old:
            cs.since = now
            self._log_status(cs, old)

    def _want_restart(self, unit: str, t: Transition, now: float) -> None:
        # A restart in flight answers every failure seen meanwhile (another check of the
        # same unit, lagging behind): its outcome is probed once it returned. A failed
        # probe after that (HALF_OPEN -> OPEN) says the restart did not help.
        if unit in self._restarting:
            return
        last = self._policy(unit).last_restart
        recent = last is not None and now - last < self.s.cooldown
        if t.old is BreakerState.HALF_OPEN or not recent:
            self._wanted.add(unit)

    def _log_status(self, cs: CheckState, old: Status) -> None:
        journal.status(cs.name, cs.unit, cs.result, old)

    def _log_breaker(self, cs: CheckState, t: Transition | None) -> None:
        journal.breaker(cs.name, cs.unit, cs.result, t, settling=cs.breaker.settling)

    def _own_fault(self, faults: list[Fault], now: float) -> None:
        for alert in self.own.observe(faults, now):
            journal.own_fault(alert)
            self._publish(alert)

    # -- restarts

    def _restart_what_is_down(self, now: float) -> None:
        if self.own.impaired:  # its own failure never restarts anything
            if self._wanted and not self._held_logged:
                log.warning(
                    "%s down, but the watchdog cannot run all its checks: restarts wait",
                    ", ".join(sorted(self._wanted)),
                    extra={"fields": {"check": "watchdog", "action": "restart_held"}},
                )
                self._held_logged = True
            return
        self._held_logged = False
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
            if unit.startswith(OWNED_BY_CHANGE) and self.change_running():
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
        hung = any(cs.result.timed_out for cs in down)
        if hung:
            fields["hung"] = "1"  # no answer at all within the timeout
        if unit != SWITCH_UNIT and any(s.verb == "kill" for s in steps(unit, hung=hung)):
            why += "; killed first"
        log.warning("%sing %s (%s)", verb, unit, why, extra={"fields": fields})
        try:
            await asyncio.to_thread(self._reset_and_restart, unit, hung)
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
            self.checks.recheck_addresses()  # PgBouncer binds its addresses when it starts
            now = self.clock()
            for cs in self.states.values():  # probe what the restart did, from now on
                if cs.unit == unit:
                    self._log_breaker(cs, cs.breaker.restarted(now))

    def _reset_and_restart(self, unit: str, hung: bool) -> None:
        if unit == SWITCH_UNIT:
            if self.repair_switch is None:
                raise AipbxError("this watchdog cannot restore the nft switch table")
            self.repair_switch()
            return
        t = self.current
        runs_in = t.postgres_cluster if t is not None and unit == POSTGRESQL_UNIT else None
        for step in steps(unit, hung=hung, runs_in=runs_in):
            if step.verb == "kill":
                self.services.kill(step.unit, step.arg)
            elif step.verb == "reset_failed":
                self.services.reset_failed(step.unit)
            elif step.verb == "start":
                self.services.start(step.unit)
            else:
                self.services.restart(step.unit)

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
            "watchdog": self.own.state_doc(now, wall),
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
        self.own.resume(doc.get("watchdog"), now, wall)

    # -- what the API shows

    def _wall_of(self, mono: float) -> float:
        return self.wall() - (self.clock() - mono)

    def snapshot(self) -> dict[str, Any]:
        return view.snapshot(self)

    def summary(self) -> dict[str, Any]:
        return view.summary(self)
