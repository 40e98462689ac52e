"""aipbxctl SIGKILLed mid-rollout, for real (a process of its own on the fake host of
tests/rollout_world.py, the real clock): the next `aipbxctl reconcile` resumes the steps
the rollout would have run. Right after the switch: the rest of the probation (the new
color probed until the recorded deadline), then the old color's drain, then its stop; in
the drain: the drain, then the stop. The old color is never stopped before its drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance import boottime, state
from appliance.actions import rollout
from appliance.colors import Color
from appliance.paths import Paths
from tests.rollout_world import Units, World, install, live_on, release

REPO = Path(__file__).resolve().parents[2]
BLUE = "aipbx-backend@blue.service"


def _run_until(root: Path, world: Path, probation: float, drain: float, line: str) -> list[str]:
    """Start the rollout; SIGKILL it as soon as it prints a line containing `line`."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.rollout_driver",
            *(str(x) for x in (root, world, probation, drain)),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    assert proc.stdout is not None
    for out in proc.stdout:
        seen.append(out.rstrip("\n"))
        if line in out:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen
    return seen


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Paths, Units, World]:
    w = World(tmp_path / "world.json")  # the real clock
    install(monkeypatch, w)
    paths, units = Paths(tmp_path / "root"), Units(w)
    release(paths, "1.0")
    live_on(paths, units, Color.BLUE, "app-1.0")
    return paths, units, w


def test_killed_right_after_the_switch(host: tuple[Paths, Units, World], capsys: Any) -> None:
    paths, units, w = host
    w.set("busy", {"blue": 1})  # a WebSocket on blue: it must drain, not be cut at once
    seen = _run_until(paths.root, w.file, 3, 600, "switch:")
    st = state.load(paths.state)
    assert st.live_color is Color.GREEN and st.probation is not None, seen
    assert units.is_active(BLUE) and w.get()["nft"] == "green"
    mark = len(w.events())
    w.set("busy", {})  # the client leaves during the resumed probation
    rollout.run_reconcile(paths, units)
    events = w.events()[mark:]
    out = capsys.readouterr().out
    assert "resuming the probation of app-1.0 on green" in out
    assert "probe green" in events
    stop = events.index(f"stop {BLUE}")
    assert stop > max(i for i, e in enumerate(events) if e == "probe green")
    assert "blue drained" in out
    st = state.load(paths.state)
    assert (st.live_color, st.probation, st.draining, st.upgrading) == (Color.GREEN, None, None, "")


def test_killed_in_the_drain(host: tuple[Paths, Units, World], capsys: Any) -> None:
    paths, units, w = host
    w.set("busy", {"blue": 1})
    _run_until(paths.root, w.file, 0, 600, "passed probation")
    st = state.load(paths.state)
    assert st.draining is not None and st.draining.color is Color.BLUE
    assert st.draining.until.left(boottime.now()) > 500
    assert units.is_active(BLUE)  # the kill did not stop it
    w.set("busy", {})
    changes = rollout.run_reconcile(paths, units)
    assert "the drain of blue ended: stopped" in changes
    assert not units.is_active(BLUE)
