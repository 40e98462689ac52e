"""At start the watchdog brings the units in line with state.json: the live color's backend
must run. (nginx's upstream and the nft table are reconciled by appliance.reconcile, run
by aipbx-netns@ and `aipbxctl reconcile`; the watchdog does not touch them.)

`plan` decides from the state and the units' observed states; `apply` does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from appliance import state as state_mod
from appliance.paths import Paths
from appliance.services import Services
from appliance.state import State

log = logging.getLogger("aipbx.watchdog")

# ActiveState values of a unit that is up or on its way up: nothing to do.
RUNNING = frozenset({"active", "activating", "reloading"})


@dataclass(frozen=True)
class Action:
    verb: str  # "start"
    unit: str
    reason: str


def backend_unit(color: str) -> str:
    return f"aipbx-backend@{color}.service"


def units_to_observe(st: State) -> list[str]:
    return [backend_unit(str(st.live_color))] if st.live_color else []


def plan(st: State, observed: Mapping[str, str]) -> list[Action]:
    """`observed` maps a unit to its ActiveState (a unit missing from it is unknown)."""
    if st.live_color is None:
        return []
    unit = backend_unit(str(st.live_color))
    active = observed.get(unit, "unknown")
    if active in RUNNING:
        return []
    return [Action("start", unit, f"{st.live_color} is live but its backend is {active}")]


async def apply(paths: Paths, services: Services) -> list[Action]:
    """Read the state, look at the units, carry out the plan. Errors are logged, not raised:
    the checks that follow will see what is still wrong."""
    try:
        st = state_mod.load(paths.state)
    except Exception as e:
        log.error("reconcile: %s", e, extra={"fields": {"action": "reconcile"}})
        return []
    observed = {}
    for unit in units_to_observe(st):
        try:
            observed[unit] = (await asyncio.to_thread(services.state, unit)).active
        except Exception as e:
            log.error("reconcile: cannot read the state of %s: %s", unit, e)
    actions = plan(st, observed)
    for a in actions:
        fields = {"action": a.verb, "unit": a.unit, "state": observed.get(a.unit, "unknown")}
        log.warning("reconcile: %s %s (%s)", a.verb, a.unit, a.reason, extra={"fields": fields})
        try:
            await asyncio.to_thread(services.start, a.unit)
        except Exception as e:
            log.error(
                "reconcile: %s %s failed: %s",
                a.verb,
                a.unit,
                e,
                extra={"fields": {**fields, "outcome": "failed"}},
            )
        else:
            log.info(
                "reconcile: %s %s: done",
                a.verb,
                a.unit,
                extra={"fields": {**fields, "outcome": "ok"}},
            )
    return actions
