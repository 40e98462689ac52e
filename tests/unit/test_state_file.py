"""state.json: what the rollout records survives a round trip; a file that is not one the
appliance writes is one line naming it (exit 1) for every command, and a finding for
`doctor` (exit 5), never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from appliance import __main__ as cli
from appliance import boottime, state
from appliance.actions import doctor
from appliance.boottime import Deadline, in_seconds
from appliance.colors import Color
from appliance.paths import Paths
from appliance.services import UnitState


def test_the_phase_records_round_trip() -> None:
    until = Deadline("boot-a", 1030.0, 1_700_000_030.0)
    st = state.State(
        live_color=Color.GREEN,
        colors={"blue": "app-1", "green": "app-2"},
        previous_color=Color.BLUE,
        probation=state.Probation(Color.GREEN, "app-2", Color.BLUE, until, 120.0, "restart"),
        draining=state.Draining(Color.BLUE, until),
        upgrading="app-2",
    )
    assert state.State.from_json(st.to_json()) == st
    doc = json.loads(st.to_json())
    # an older reader (and a script) still finds the drain's deadline in epoch seconds
    assert doc["draining"]["deadline"] == 1_700_000_030.0
    assert doc["probation"]["boot_id"] == "boot-a"
    assert st.phase() == "probation"
    assert st.colors_kept() == {"blue", "green"}


def test_a_legacy_drain_record_reads_as_over() -> None:
    text = json.dumps(
        {"live_color": "green", "draining": {"color": "blue", "deadline": 1e12}, "schema": 1}
    )
    st = state.State.from_json(text)
    assert st.draining is not None and st.draining.until.boot_id == ""


CORRUPT = {
    "truncated": b'{"live_color": "gre',
    "not JSON": b"\x00\x01garbage",
    "not UTF-8": b'{"live_color": "\xff"}',
    "a list": b"[1, 2]",
    "a bad color": b'{"live_color": "purple"}',
    "colors not an object": b'{"colors": [1]}',
    "a drain without its color": b'{"draining": {"deadline": 5}}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "empty": b"",
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_state_is_one_line_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(state.StateError) as e:
        state.load(path)
    assert e.value.message.startswith(f"{path}: ")
    assert "\n" not in e.value.message and e.value.hint and "reconcile" in e.value.hint
    assert e.value.exit_code == 1


def test_state_that_is_not_a_regular_file(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(state.StateError, match="not a regular file"):
        state.load(d)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(state.StateError, match="not a regular file"):
        state.load(fifo)  # refused without blocking
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(state.StateError, match="symlink"):
        state.load(link)
    big = tmp_path / "big"
    big.write_bytes(b" " * (state.MAX_BYTES + 1))
    with pytest.raises(state.StateError, match="larger than"):
        state.load(big)
    assert state.load(tmp_path / "missing") == state.State()


class _Units:
    def state(self, unit: str) -> UnitState:
        return UnitState(unit, "active", "running", "enabled", "", 1)

    def is_active(self, unit: str) -> bool:
        return True


def test_doctor_reports_a_corrupt_state_as_a_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(tmp_path)
    paths.state.parent.mkdir(parents=True)
    paths.state.write_text('{"live_color": ')
    only = (doctor.check_state, doctor.check_units, doctor.check_app_env)
    monkeypatch.setattr(doctor, "CHECKS", only)
    findings = doctor.diagnose(paths, _Units())  # type: ignore[arg-type]
    state_findings = [f for f in findings if f.check == "state"]
    assert len(state_findings) == 1
    assert state_findings[0].message.startswith(f"{paths.state}: corrupt state")
    assert "reconcile" in state_findings[0].hint


def test_doctor_turns_any_check_that_cannot_run_into_a_finding(tmp_path: Path) -> None:
    from appliance.errors import AipbxError

    def broken(paths: Paths, services: Any) -> list[doctor.Finding]:
        raise AipbxError("cannot read something", hint="fix it")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(doctor, "CHECKS", (broken,))
        (f,) = doctor.diagnose(Paths(tmp_path), _Units())  # type: ignore[arg-type]
    assert (f.check, f.severity, f.message, f.hint) == (
        "broken",
        "error",
        "cannot read something",
        "fix it",
    )


def test_doctor_names_an_interrupted_rollout_and_a_link_out_of_line(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.colors.mkdir(parents=True)
    (paths.colors / "green").symlink_to("../releases/app-1")
    until = in_seconds(boottime.now(), 30)
    st = state.State(
        live_color=Color.GREEN,
        colors={"green": "app-2"},
        probation=state.Probation(Color.GREEN, "app-2", Color.BLUE, until, 60.0),
        upgrading="app-2",
    )
    state.save(paths.state, st)
    findings = doctor.check_state(paths, _Units())  # type: ignore[arg-type]
    messages = [f.message for f in findings]
    assert any(
        "points at ../releases/app-1, but state.json says green runs app-2" in m for m in messages
    )
    assert any("interrupted during its probation on green" in m for m in messages)


@pytest.mark.parametrize(
    ("blue", "says"), [("active", "blue still runs"), ("inactive", "blue is not running")]
)
def test_doctor_says_whether_the_color_to_switch_back_to_runs(
    tmp_path: Path, blue: str, says: str
) -> None:
    paths = Paths(tmp_path)
    until = in_seconds(boottime.now(), 30)
    probation = state.Probation(Color.GREEN, "app-2", Color.BLUE, until, 60.0)
    state.save(paths.state, state.State(live_color=Color.GREEN, probation=probation))

    class Units(_Units):
        def is_active(self, unit: str) -> bool:
            return unit != "aipbx-backend@blue.service" or blue == "active"

    (f,) = doctor.check_state(paths, Units())  # type: ignore[arg-type]
    assert (f.check, f.severity) == ("rollout", "error") and says in f.message, f


def test_doctor_after_a_reboot_says_the_probation_is_over(tmp_path: Path) -> None:
    """A probation recorded in another boot ended with it (the old color, disabled at the
    switch, did not come back): a warning that reconcile records the end, not a claim
    that the old color still runs."""
    paths = Paths(tmp_path)
    probation = state.Probation(Color.GREEN, "app-2", Color.BLUE, Deadline("boot-a", 9.0), 60.0)
    state.save(paths.state, state.State(live_color=Color.GREEN, probation=probation))
    (f,) = doctor.check_state(paths, _Units())  # type: ignore[arg-type]
    assert (f.check, f.severity) == ("rollout", "warning"), f
    assert "is over (the machine restarted" in f.message and "still runs" not in f.message
    assert "reconcile" in f.hint


@pytest.mark.parametrize(("command", "code"), [(["status"], 1), (["doctor"], 5)])
def test_the_cli_with_a_corrupt_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, command: list[str], code: int
) -> None:
    paths = Paths(tmp_path)
    paths.state.parent.mkdir(parents=True)
    paths.state.write_bytes(b"\xff\xfe")
    monkeypatch.setenv("AIPBX_ROOT", str(tmp_path))
    from appliance.actions import status
    from appliance.services import SystemdServices

    monkeypatch.setattr(SystemdServices, "state", lambda self, u: _Units().state(u))
    monkeypatch.setattr(SystemdServices, "is_active", lambda self, u: True)
    monkeypatch.setattr(status, "fetch_health", lambda url: None)
    monkeypatch.setattr(
        doctor, "CHECKS", (doctor.check_state, doctor.check_units, doctor.check_app_env)
    )
    assert cli.main(command) == code
    out, err = capsys.readouterr()
    if code == 1:
        assert err.splitlines()[0] == f"aipbxctl: {paths.state}: not UTF-8 text (byte 0)"
        assert err.splitlines()[1].startswith("hint: ")
        assert "Traceback" not in err
    else:
        assert f"error: state: {paths.state}: not UTF-8 text" in out


def test_the_cli_turns_an_oserror_into_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import errno

    from appliance.actions import rollout

    def full(*a: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/aipbx/state.json")

    monkeypatch.setattr(rollout, "list_releases", full)
    assert cli.main(["releases"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "aipbxctl: /var/lib/aipbx/state.json: No space left on device",
        "hint: free space on that file system (`df -h`; `aipbxctl releases` lists old "
        "releases; `journalctl --vacuum-size=…`)",
    ]
