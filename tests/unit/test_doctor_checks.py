"""doctor runs every check it has (a check written but not listed never ran: the renewal
check did not), and the renewal check reports a failed renewal."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from appliance import acme
from appliance.actions import doctor
from appliance.paths import Paths


def test_every_check_function_is_run() -> None:
    defined = {
        name
        for name, fn in inspect.getmembers(doctor, inspect.isfunction)
        if name.startswith("check_") and fn.__module__ == doctor.__name__
    }
    assert {c.__name__ for c in doctor.CHECKS} == defined


def test_a_failed_renewal_is_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(tmp_path)
    monkeypatch.setattr(acme, "certbot_unit_run", lambda: None)
    assert doctor.check_renewal(paths, None) == []  # type: ignore[arg-type]
    record = acme.status_path(paths)
    record.parent.mkdir(parents=True)
    record.write_text(
        json.dumps({"last_error": {"at": 1_800_000_000, "message": "nginx refused the chain"}})
    )
    (f,) = doctor.check_renewal(paths, None)  # type: ignore[arg-type]
    assert (f.check, f.severity) == ("certificate renewal", "warning")
    assert "nginx refused the chain" in f.message and "certbot.service" in f.hint


@pytest.mark.parametrize(
    "argv",
    [
        ["upgrade", "/nonexistent.tar.gz", "--yes"],
        ["rollback", "--yes"],
        ["restart", "--yes"],
        ["backup"],
        ["restore", "/nonexistent.dump", "--yes"],
        ["migrations", "list"],
    ],
)
def test_what_needs_setup_exits_4_before_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    from appliance import __main__ as cli

    monkeypatch.setenv("AIPBX_ROOT", str(tmp_path))
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert cli.main(argv) == 4
    err = capsys.readouterr().err
    assert "the appliance is not set up" in err and "hint: run `aipbxctl setup" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing was created
