"""The start-up reconcile's decisions: state.json and the units' observed states in, actions
out."""

from __future__ import annotations

import pytest

from appliance.colors import Color
from appliance.state import State
from appliance.watchdog.reconcile import Action, plan, units_to_observe

BLUE = "aipbx-backend@blue.service"


def test_nothing_live_nothing_to_do() -> None:
    assert units_to_observe(State()) == []
    assert plan(State(), {BLUE: "inactive"}) == []


@pytest.mark.parametrize("active", ["active", "activating", "reloading"])
def test_a_running_live_backend_is_left_alone(active: str) -> None:
    assert plan(State(live_color=Color.BLUE), {BLUE: active}) == []


@pytest.mark.parametrize("active", ["inactive", "failed", "deactivating"])
def test_a_live_backend_that_is_not_running_is_started(active: str) -> None:
    st = State(live_color=Color.BLUE)
    assert units_to_observe(st) == [BLUE]
    assert plan(st, {BLUE: active}) == [
        Action("start", BLUE, f"blue is live but its backend is {active}")
    ]


def test_only_the_live_color_is_started() -> None:
    st = State(live_color=Color.GREEN)
    actions = plan(st, {BLUE: "inactive", "aipbx-backend@green.service": "failed"})
    assert [a.unit for a in actions] == ["aipbx-backend@green.service"]


def test_an_unobserved_unit_counts_as_not_running() -> None:
    (a,) = plan(State(live_color=Color.BLUE), {})
    assert a.verb == "start" and "unknown" in a.reason
