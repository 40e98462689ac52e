"""A full /var/lib/aipbx for real: a small tmpfs mounted there, filled with fallocate. The
upgrade's check refuses to start; a disk that fills after the check fails the rollout at
its first write with one line naming state.json, leaves state.json, the links and nft as
they were, and `aipbxctl reconcile` finds everything in line once there is room."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import preflight, state
from appliance.actions import rollout
from appliance.colors import Color
from appliance.errors import AipbxError
from appliance.paths import Paths
from tests.rollout_world import Units, World, install, links, live_on, release

GREEN = "aipbx-backend@green.service"


@pytest.fixture
def full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Paths, Units, World]]:
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a tmpfs")
    w = World(tmp_path / "world.json")
    install(monkeypatch, w)
    paths, units = Paths(tmp_path / "root"), Units(w)
    paths.var.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(paths.var)], check=True)
    try:
        release(paths, "1.0")
        live_on(paths, units, Color.BLUE, "app-1.0")
        free = os.statvfs(paths.var).f_bavail * os.statvfs(paths.var).f_frsize
        subprocess.run(["fallocate", "-l", str(free), str(paths.var / "filler")], check=True)
        yield paths, units, w
    finally:
        subprocess.run(["umount", str(paths.var)], check=False)


def _args() -> dict[str, Any]:
    return {
        "probation": 0.0,
        "drain": 0.0,
        "health_timeout": None,
        "json": False,
        "yes": True,
        "restore_db": False,
        "to": None,
        "artifact": None,
    }


def test_the_check_refuses_before_anything_changes(full: tuple[Paths, Units, World]) -> None:
    paths, units, w = full
    before = paths.state.read_bytes()
    with pytest.raises(preflight.NoSpace) as e:
        rollout.run_rollout(paths, units, _args(), "restart")
    assert f"{paths.var} has 0 MiB free" in e.value.message and "\n" not in e.value.message
    assert paths.state.read_bytes() == before and not units.is_active(GREEN)


def test_a_disk_full_after_the_check(
    full: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    paths, units, w = full
    monkeypatch.setattr(preflight, "check_space", lambda *a, **k: None)  # it filled since
    before = paths.state.read_bytes()
    with pytest.raises(AipbxError) as e:
        rollout.run_rollout(paths, units, _args(), "restart")
    assert e.value.message == f"{paths.state}: No space left on device"
    assert e.value.hint and e.value.hint.startswith("free space on that file system")
    assert paths.state.read_bytes() == before  # the old state, whole
    assert not [p for p in paths.var.iterdir() if p.name.startswith(".state.json.")]
    assert not units.is_active(GREEN) and w.get()["nft"] == "blue"
    assert links(paths) == {"blue": "app-1.0"}
    (paths.var / "filler").unlink()
    rollout.run_reconcile(paths, units)
    st = state.load(paths.state)
    assert (
        st.live_color is Color.BLUE and st.upgrading == "" and links(paths) == {"blue": "app-1.0"}
    )
