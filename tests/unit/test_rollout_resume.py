"""What a rollout does next (appliance.resume): from the phase state.json recorded, the
boot-time clock and what was observed. The same decisions drive a running upgrade and
`aipbxctl reconcile` resuming an interrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.boottime import Deadline, Now, in_seconds
from appliance.colors import Color
from appliance.resume import Act, drain, pending, probation
from appliance.state import Draining, Probation, State

BOOT = "boot-a"
NOW = Now(BOOT, 1000.0, 1_700_000_000.0)


def _p(left: float, old: Color | None = Color.BLUE) -> Probation:
    return Probation(Color.GREEN, "app-2", old, Deadline(BOOT, NOW.boottime + left), 60.0)


def test_probation_goes_on_until_its_deadline() -> None:
    d = probation(_p(30), NOW, failures=0, unit_active=True, old_up=True)
    assert d.act is Act.PROBE and d.wait_s == 1.0
    d = probation(_p(0.4), NOW, failures=2, unit_active=True, old_up=True)
    assert d.act is Act.PROBE and d.wait_s == pytest.approx(0.4)


def test_probation_passes_at_its_deadline() -> None:
    assert probation(_p(0), NOW, failures=0, unit_active=True, old_up=True).act is Act.PASS
    assert probation(_p(-5), NOW, failures=1, unit_active=True, old_up=True).act is Act.PASS


def test_three_failures_in_a_row_or_a_stopped_unit_roll_back() -> None:
    d = probation(_p(30), NOW, failures=3, unit_active=True, old_up=True)
    assert d.act is Act.ROLL_BACK and "3 health checks failed" in d.why
    d = probation(_p(30), NOW, failures=0, unit_active=False, old_up=True)
    assert d.act is Act.ROLL_BACK and "unit stopped" in d.why
    # even at the deadline: a failure seen is a failure
    assert probation(_p(0), NOW, failures=3, unit_active=True, old_up=True).act is Act.ROLL_BACK


def test_a_failure_with_nothing_to_go_back_to_keeps_the_new_color() -> None:
    assert probation(_p(30), NOW, failures=3, unit_active=True, old_up=False).act is Act.KEEP
    assert probation(_p(30, old=None), NOW, failures=3, unit_active=True, old_up=True).act is (
        Act.KEEP
    )


def test_a_reboot_ends_probation() -> None:
    later = Now("boot-b", 5.0, NOW.wall + 60)
    d = probation(_p(3600), later, failures=0, unit_active=True, old_up=False)
    assert d.act is Act.PASS and "restarted" in d.why


def test_a_wall_clock_jump_changes_nothing() -> None:
    p = _p(30)
    for wall in (0.0, NOW.wall - 86400 * 365, NOW.wall + 86400 * 365):
        d = probation(p, Now(BOOT, NOW.boottime, wall), failures=0, unit_active=True, old_up=True)
        assert d.act is Act.PROBE and d.why == "30s left"
        dr = drain(
            Draining(Color.BLUE, p.until), Color.GREEN, Now(BOOT, NOW.boottime, wall), idle=False
        )
        assert dr.act is Act.WAIT


def test_drain_waits_until_idle_or_its_deadline() -> None:
    d = Draining(Color.BLUE, in_seconds(NOW, 120))
    assert drain(d, Color.GREEN, NOW, idle=False).act is Act.WAIT
    assert drain(d, Color.GREEN, NOW, idle=True).act is Act.STOP_OLD
    late = Now(BOOT, NOW.boottime + 121, NOW.wall)
    assert drain(d, Color.GREEN, late, idle=False).why == "deadline"
    assert drain(d, Color.GREEN, NOW, idle=None).act is Act.WAIT  # not looked at


def test_drain_ends_when_the_color_is_live_again_or_after_a_reboot() -> None:
    d = Draining(Color.BLUE, in_seconds(NOW, 120))
    assert drain(d, Color.BLUE, NOW, idle=False).act is Act.LIVE_AGAIN
    rebooted = Now("boot-b", 1.0, NOW.wall)
    r = drain(d, Color.GREEN, rebooted, idle=False)
    assert r.act is Act.STOP_OLD and "restarted" in r.why


def test_a_legacy_wall_clock_deadline_has_passed() -> None:
    legacy = Deadline.from_doc({"color": "blue", "deadline": NOW.wall + 3600})
    assert legacy.left(NOW) == 0 and not legacy.same_boot(NOW)
    assert drain(Draining(Color.BLUE, legacy), Color.GREEN, NOW, idle=False).act is Act.STOP_OLD


def test_pending_names_the_step_to_resume() -> None:
    assert pending(State(live_color=Color.BLUE), NOW).act is Act.NONE
    st = State(live_color=Color.GREEN, probation=_p(30), upgrading="app-2")
    assert pending(st, NOW).act is Act.PROBE
    # probation comes first: the drain is recorded only when it passed
    st = st.with_(draining=Draining(Color.BLUE, in_seconds(NOW, 60)))
    assert pending(st, NOW).act is Act.PROBE
    # killed before the switch: the new color never went live
    st = State(live_color=Color.BLUE, colors={"green": "app-2"}, upgrading="app-2")
    assert pending(st, NOW).act is Act.ABANDON
    st = State(live_color=Color.GREEN, draining=Draining(Color.BLUE, in_seconds(NOW, 60)))
    assert pending(st, NOW).act is Act.WAIT
    # a probation record for a color that is not live: moot
    st = State(live_color=Color.BLUE, probation=_p(30))
    assert pending(st, NOW).act is Act.PASS


def test_a_containers_boot_is_its_pid1s_start_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import boottime

    (tmp_path / "boot_id").write_text("b1\n")
    (tmp_path / "stat").write_text(
        "1 (systemd (x) y) S 0 1 1 0 -1 4194560 " + "0 " * 12 + "4242 0\n"
    )
    monkeypatch.setattr(boottime, "BOOT_ID", tmp_path / "boot_id")
    monkeypatch.setattr(boottime, "INIT_STAT", tmp_path / "stat")
    assert boottime.boot_id() == "b1/4242"
    (tmp_path / "stat").unlink()
    assert boottime.boot_id() == "b1"
