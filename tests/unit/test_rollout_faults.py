"""Rollouts under faults, on a fake host (tests/rollout_world.py): aipbxctl killed after the
switch or before it, a reboot, a full disk at every write. What must hold: state.json and
the colors' links agree (or reconcile makes them agree), nft serves what state.json names,
an interrupted rollout is resumed with the steps it would have run (the rest of its
probation, then the drain until its deadline), and a failure is one line and an audit
record, never a traceback."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from appliance import fsutil as fsutil_mod
from appliance import releases, state, upgrade
from appliance.actions import rollout
from appliance.colors import Color
from appliance.errors import AipbxError
from appliance.paths import Paths
from tests.rollout_world import CFG, Units, World, install, links, live_on, release

BLUE, GREEN = "aipbx-backend@blue.service", "aipbx-backend@green.service"


class Killed(BaseException):
    """SIGKILL, as far as the code under test can tell: nothing after it runs."""


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Paths, Units, World]:
    w = World(tmp_path / "world.json")
    w.set("clock", ["boot-a", 1000.0])
    install(monkeypatch, w)
    paths = Paths(tmp_path / "root")
    units = Units(w)
    release(paths, "1.0")
    release(paths, "2.0")
    live_on(paths, units, Color.BLUE, "app-1.0")
    return paths, units, w


def _ctx(paths: Paths, units: Units, out: list[str]) -> upgrade.Ctx:
    return upgrade.Ctx(paths, CFG, units, upgrade.Timeline(out=out.append))


def _args(**kw: Any) -> dict[str, Any]:
    a = {"probation": 30.0, "drain": 120.0, "health_timeout": None, "json": True, "yes": True}
    return {**a, "restore_db": False, "to": None, "artifact": None, **kw}


def _kill_at_first_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import health

    def killed(*a: Any, **k: Any) -> Any:
        raise Killed

    monkeypatch.setattr(health, "http_probe", killed)


def _killed_after_the_switch(
    paths: Paths, units: Units, monkeypatch: pytest.MonkeyPatch, out: list[str]
) -> None:
    with monkeypatch.context() as m:
        _kill_at_first_probe(m)
        with pytest.raises(Killed):
            upgrade.deploy(
                _ctx(paths, units, out),
                releases.get(paths, "app-2.0"),
                upgrade.Options(probation_s=30, drain_s=120),
            )


def test_the_switch_records_probation_first(
    host: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, units, w = host
    _killed_after_the_switch(paths, units, monkeypatch, [])
    st = state.load(paths.state)
    assert st.live_color is Color.GREEN and w.get()["nft"] == "green"
    assert st.probation is not None and st.probation.old_color is Color.BLUE
    assert st.probation.until.at == 1030.0 and st.probation.drain_s == 120
    assert st.upgrading == "app-2.0" and st.draining is None
    assert st.history == ("app-2.0",)
    # the old color runs on (it is what probation would switch back to), but a reboot,
    # which ends probation and the drain, does not start it again
    assert units.is_active(BLUE) and units.state(BLUE).enabled == "disabled"
    assert links(paths) == {"blue": "app-1.0", "green": "app-2.0"}


def test_reconcile_after_a_kill_resumes_probation_then_drains_until_the_deadline(
    host: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    paths, units, w = host
    _killed_after_the_switch(paths, units, monkeypatch, [])
    w.set("busy", {"blue": 2})  # two WebSockets stay on blue: the drain runs to its deadline
    mark = len(w.events())
    changes = rollout.run_reconcile(paths, units)
    out = capsys.readouterr().out
    events = w.events()[mark:]
    stop = events.index(f"stop {BLUE}")
    assert events.count("probe green") >= 29  # the rest of the 30 s probation, every second
    assert all(e != "probe green" for e in events[stop:])  # then the drain, then the stop
    assert f"stop {GREEN}" not in events
    assert "resuming the probation of app-2.0 on green" in out
    assert "passed probation" in out and "still on blue are cut" in out
    # the drain began when probation ended (1030) and lasted its 120 s
    assert w.get()["clock"][1] >= 1150.0
    st = state.load(paths.state)
    assert (st.live_color, st.probation, st.draining, st.upgrading) == (Color.GREEN, None, None, "")
    assert any("the drain of blue ended: stopped" in c for c in changes)


def test_reconcile_after_a_kill_switches_back_when_the_new_color_fails_probation(
    host: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    paths, units, w = host
    _killed_after_the_switch(paths, units, monkeypatch, [])
    w.set("unhealthy", ["green"])
    changes = rollout.run_reconcile(paths, units)
    st = state.load(paths.state)
    assert st.live_color is Color.BLUE and w.get()["nft"] == "blue"
    assert "app-2.0" in st.failed and st.probation is None and st.upgrading == ""
    assert not units.is_active(GREEN) and units.is_active(BLUE)
    assert units.state(BLUE).enabled == "enabled"
    assert any("failed probation on green" in c and "switched back to blue" in c for c in changes)
    # the summary names the table as it ends (it was green when reconcile began)
    assert changes[0] == "nft table: live color blue"
    assert "green stopped" in capsys.readouterr().out


def test_reconcile_after_a_reboot_ends_probation_and_drain_at_once(
    host: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    paths, units, w = host
    _killed_after_the_switch(paths, units, monkeypatch, [])
    w.set("clock", ["boot-b", 12.0])  # a reboot: blue, disabled, did not come back
    w.set("active", [GREEN])
    mark = len(w.events())
    rollout.run_reconcile(paths, units)
    events = w.events()[mark:]
    assert "probe green" not in events
    assert "restarted during probation" in capsys.readouterr().out
    st = state.load(paths.state)
    assert (st.live_color, st.probation, st.draining) == (Color.GREEN, None, None)


def test_killed_before_the_switch_reconcile_stops_the_new_color(
    host: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from appliance import health

    paths, units, w = host

    def killed(*a: Any, **k: Any) -> Any:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(health, "wait_healthy", killed)
        m.setattr(upgrade, "abandon", lambda *a: None)  # a SIGKILL runs no clean-up
        with pytest.raises(Killed):
            upgrade.deploy(
                _ctx(paths, units, []),
                releases.get(paths, "app-2.0"),
                upgrade.Options(probation_s=30, drain_s=120),
            )
    st = state.load(paths.state)
    assert st.live_color is Color.BLUE and st.upgrading == "app-2.0" and st.probation is None
    assert units.is_active(GREEN)
    changes = rollout.run_reconcile(paths, units)
    assert "an interrupted upgrade to app-2.0 ended; live is app-1.0" in changes
    assert f"stopped {GREEN}" in changes
    assert "app-2.0" in state.load(paths.state).failed
    assert w.get()["nft"] == "blue"


def test_another_upgrade_waits_for_an_interrupted_probation(
    host: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, units, _ = host
    _killed_after_the_switch(paths, units, monkeypatch, [])
    with pytest.raises(AipbxError, match="interrupted during its probation") as e:
        upgrade.restart(_ctx(paths, units, []), upgrade.Options(probation_s=1, drain_s=1))
    assert e.value.hint and "aipbxctl reconcile" in e.value.hint
    # a rollback goes back from it, instantly: blue still runs app-1.0
    out: list[str] = []
    figures = upgrade.rollback(_ctx(paths, units, out), None, upgrade.Options(1, 1))
    assert figures["instant"] is True
    st = state.load(paths.state)
    assert st.live_color is Color.BLUE and st.probation is None and st.upgrading == ""
    assert st.draining is not None and st.draining.color is Color.GREEN
    assert any("the database stays as it is" in line for line in out)


def test_a_rollout_that_passes_leaves_no_phase_behind(
    host: tuple[Paths, Units, World], capsys: Any
) -> None:
    paths, units, w = host
    result = rollout.run_rollout(paths, units, _args(probation=5.0, drain=10.0), "restart")
    assert result["ok"] and result["old_color"] == "stopped"
    st = state.load(paths.state)
    assert (st.live_color, st.probation, st.draining, st.upgrading) == (Color.GREEN, None, None, "")
    assert st.phase() == "done" and w.get()["nft"] == "green"
    assert links(paths) == {"blue": "app-1.0", "green": "app-1.0"}


# --- a full disk at every write -----------------------------------------------------------


def _no_space_at(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """The n-th write of state.json or of a color's link fails with ENOSPC."""
    seen = [0]
    real_save, real_link = state.save, fsutil_mod.atomic_symlink

    def counted(what: str) -> None:
        seen[0] += 1
        if seen[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device", what)

    def save(path: Path, st: state.State) -> None:
        counted(str(path))
        real_save(path, st)

    def link(target: str | Path, path: Path) -> None:
        counted(str(path))
        real_link(target, path)

    monkeypatch.setattr(state, "save", save)
    monkeypatch.setattr(upgrade, "atomic_symlink", link)
    return seen


def _agree(paths: Paths, w: World) -> None:
    st = state.load(paths.state)
    for color, rel in links(paths).items():
        assert st.colors.get(color) == rel, (color, rel, st.colors)
    assert w.get()["nft"] == (str(st.live_color) if st.live_color else None)
    assert f"aipbx-backend@{st.live_color}.service" in w.get()["active"]


@pytest.mark.parametrize("verb", ["upgrade", "restart", "rollback"])
def test_a_full_disk_at_any_write_leaves_state_and_links_in_agreement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any, capsys: Any, verb: str
) -> None:
    from appliance.release.pack import pack

    src = tmp_path / "src"
    src.mkdir()
    (src / "main.js").write_text("// 2.0\n")
    artifact = pack(src, tmp_path, name="app", version="2.0", kind="backend", command=["node"])
    for n in range(1, 40):
        root = tmp_path / f"n{n}"
        w = World(root.with_suffix(".json"))
        w.set("clock", ["boot-a", 1000.0])
        with monkeypatch.context() as m:
            install(m, w)
            paths, units = Paths(root), Units(w)
            release(paths, "1.0")
            if verb != "upgrade":
                release(paths, "2.0")
            if verb == "rollback":  # app-2.0 live on green, app-1.0 still up on blue
                live_on(paths, units, Color.GREEN, "app-2.0")
                (paths.colors / "blue").symlink_to("../releases/app-1.0")
                st = state.load(paths.state)
                state.save(
                    paths.state,
                    st.with_(
                        colors={"blue": "app-1.0", "green": "app-2.0"},
                        previous_color=Color.BLUE,
                    ),
                )
                units.start(BLUE)
            else:
                live_on(paths, units, Color.BLUE, "app-1.0")
            caplog.clear()
            before = links(paths)
            seen = _no_space_at(m, n)
            args = _args(probation=2.0, drain=2.0, artifact=str(artifact))
            try:
                rollout.run_rollout(paths, units, args, verb)
            except AipbxError as e:
                assert "No space left on device" in e.message, e.message
                assert e.hint and "free space" in e.hint
                assert "\n" not in e.message
                audits = [r.getMessage() for r in caplog.records if r.name == "aipbx.audit"]
                assert any(f"audit: {verb} by" in a and ": failed" in a for a in audits)
                # state.json is written first: a link is never ahead of it
                st = state.load(paths.state)
                for color, rel in links(paths).items():
                    assert rel in (st.colors.get(color), before.get(color)), (n, color, rel)
            else:
                assert seen[0] < n  # no write failed: every write point was tried
                break
        # what the next command (or reconcile) finds: it puts everything in line
        rollout.run_reconcile(paths, units)
        _agree(paths, w)
    else:
        pytest.fail("more writes than expected")
    assert n > {"upgrade": 6, "restart": 5, "rollback": 2}[verb]  # it tried every write


def test_a_wall_clock_jump_neither_ends_nor_prolongs_a_drain(
    host: tuple[Paths, Units, World], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    paths, units, w = host
    w.set("busy", {"blue": 1})
    st = state.load(paths.state)
    state.save(paths.state, st.with_(live_color=Color.GREEN, colors={"blue": "app-1.0"}))
    for jump in (365 * 86400.0, -365 * 86400.0):
        w.set("clock", ["boot-a", 1000.0])
        units.start(BLUE)
        monkeypatch.setattr(time, "time", lambda j=jump: 1_700_000_000.0 + j)
        out: list[str] = []
        assert upgrade.drain_and_stop(_ctx(paths, units, out), Color.BLUE, 120) == "stopped"
        assert w.get()["clock"][1] == pytest.approx(1120.0)  # 120 s of boot time, no more
        assert any("deadline: 1 WebSocket(s)" in line for line in out)
