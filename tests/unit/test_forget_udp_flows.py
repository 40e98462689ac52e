"""When a color stops, the UDP conntrack entries that still lead to it are deleted: the
argv, the count, and that every place that stops a color does it after the stop."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance import config, drain, reconcile, state, upgrade
from appliance.colors import Color
from appliance.errors import CommandError
from appliance.paths import Paths
from appliance.services import UnitState

CFG = config.parse('[network]\nsubnet = "10.203.0.0/24"\n')


def test_argv_deletes_flows_dnated_to_the_color_and_those_it_started() -> None:
    assert drain.forget_argvs(CFG, Color.GREEN) == [
        ["conntrack", "-D", "-p", "udp", "--reply-src", "10.203.0.6", "--reply-port-src", "3032"],
        ["conntrack", "-D", "-p", "udp", "--orig-src", "10.203.0.6", "--orig-port-src", "3032"],
    ]


def test_the_count_is_what_conntrack_says_it_deleted() -> None:
    msg = "conntrack v1.4.7 (conntrack-tools): {} flow entries have been deleted.\n"
    assert drain.deleted_count(msg.format(0)) == 0
    assert drain.deleted_count(msg.format(12)) == 12
    assert (
        drain.deleted_count("conntrack v1.4.7 (conntrack-tools): Operation not permitted") is None
    )


def _fake_run(answers: list[tuple[int, str]], calls: list[list[str]]) -> Any:
    def run(argv: Sequence[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        code, err = answers.pop(0)
        return subprocess.CompletedProcess(list(argv), code, "", err)

    return run


def test_forget_sums_both_deletions_and_a_failure_counts_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aipbx.drain")
    calls: list[list[str]] = []
    done = "x: {} flow entries have been deleted."
    # conntrack exits 1 when it deleted nothing: that is not a failure
    monkeypatch.setattr(drain, "run", _fake_run([(0, done.format(2)), (1, done.format(0))], calls))
    assert drain.forget_udp_flows(CFG, Color.BLUE) == 2
    assert [c[4] for c in calls] == ["--reply-src", "--orig-src"]
    assert "forgot 2 UDP flow(s) still leading to blue" in caplog.text
    monkeypatch.setattr(
        drain,
        "run",
        _fake_run([(1, "conntrack: Operation not permitted"), (0, done.format(1))], []),
    )
    assert drain.forget_udp_flows(CFG, Color.BLUE) == 1
    assert "cannot forget the UDP flows of blue: conntrack: Operation not permitted" in caplog.text


def test_forget_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(argv: Sequence[str], **_: Any) -> subprocess.CompletedProcess[str]:
        raise CommandError(argv, 127, "conntrack: not found")

    monkeypatch.setattr(drain, "run", missing)
    assert drain.forget_udp_flows(CFG, Color.GREEN) == 0


class _Services:
    """Records what was done, in order; every unit is running until stopped."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.stopped: set[str] = set()

    def state(self, unit: str) -> UnitState:
        active = "inactive" if unit in self.stopped else "active"
        return UnitState(unit, active, "", "enabled", "", 0)

    def is_active(self, unit: str) -> bool:
        return unit not in self.stopped

    def stop(self, unit: str) -> None:
        self.stopped.add(unit)
        self.log.append(f"stop {unit}")

    def __getattr__(self, verb: str) -> Any:
        return lambda unit, **_: self.log.append(f"{verb} {unit}")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    log: list[str] = []

    def forget(cfg: config.Config, color: Color) -> int:
        log.append(f"forget {color}")
        return 3

    monkeypatch.setattr(drain, "forget_udp_flows", forget)
    monkeypatch.setattr(drain, "usage", lambda cfg, color: drain.Usage(ws=0, udp_flows=0))
    return log


def test_the_end_of_a_drain_forgets_the_stopped_colors_flows(
    tmp_path: Path, events: list[str]
) -> None:
    paths = Paths(tmp_path)
    state.save(paths.state, state.State(live_color=Color.GREEN, colors={"blue": "a-1"}))
    out: list[str] = []
    tl = upgrade.Timeline(out=out.append)
    ctx = upgrade.Ctx(paths, CFG, _Services(events), tl)
    assert upgrade.drain_and_stop(ctx, Color.BLUE, 0) == "stopped"
    stop = events.index("stop aipbx-backend@blue.service")
    assert events.index("forget blue") > stop
    assert any(
        "blue stopped; 3 UDP flow(s) that led to it now go to the live color" in s for s in out
    )


def test_reconcile_forgets_the_flows_of_a_color_it_stops(tmp_path: Path, events: list[str]) -> None:
    paths = Paths(tmp_path)
    state.save(paths.state, state.State(live_color=Color.GREEN, colors={"green": "a-2"}))
    changes = reconcile.units(paths, _Services(events), CFG)
    assert events.index("forget blue") > events.index("stop aipbx-backend@blue.service")
    assert "forget green" not in events
    assert "3 UDP flow(s) that led to blue go to the live color" in changes
