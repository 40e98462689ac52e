"""The backend's environment: no ANSI colour codes in the journal unless asked for."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from appliance import config, launcher
from appliance.colors import Color
from appliance.launcher import backend_env, strip_csi, strips_colours
from appliance.release.manifest import Kind, Manifest

CFG = config.parse("")
RELEASE = Path("/opt/aipbx/releases/aipbx-1.0.0")


def _env(base: dict[str, str], release_env: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    m = Manifest(
        name="aipbx", version="1.0.0", kind=Kind.BACKEND, command=("node",), env=release_env
    )
    return backend_env(CFG, Color.BLUE, m, RELEASE, base)


def test_no_color_by_default() -> None:
    assert _env({"PATH": "/usr/bin"})["NO_COLOR"] == "1"


@pytest.mark.parametrize(
    "base", [{"NO_COLOR": ""}, {"NO_COLOR": "0"}, {"FORCE_COLOR": "1"}, {"FORCE_COLOR": "0"}]
)
def test_the_operators_choice_is_kept(base: dict[str, str]) -> None:
    # /etc/aipbx/backend.env (EnvironmentFile=) reaches the launcher as its environment
    env = _env(base)
    assert {k: env[k] for k in base} == base
    if "NO_COLOR" not in base:
        assert "NO_COLOR" not in env


def test_a_release_may_ask_for_colour() -> None:
    assert "NO_COLOR" not in _env({}, (("FORCE_COLOR", "1"),))


def test_backend_env_file_may_ask_for_colour() -> None:
    from appliance import appenv

    m = Manifest(name="aipbx", version="1.0.0", kind=Kind.BACKEND, command=("node",))
    files = appenv.Files(operator={"FORCE_COLOR": "1"}, setup={})
    env = backend_env(CFG, Color.BLUE, m, RELEASE, {}, files)
    assert env["FORCE_COLOR"] == "1" and "NO_COLOR" not in env
    assert backend_env(CFG, Color.BLUE, m, RELEASE, {}, appenv.Files({}, {}))["NO_COLOR"] == "1"


def test_strips_colours_unless_asked_for() -> None:
    assert strips_colours({"NO_COLOR": "1"})
    assert not strips_colours({"NO_COLOR": "1", "FORCE_COLOR": "1"})
    assert not strips_colours({})


NEST = (
    "\x1b[32m[Nest] 375  - \x1b[39m11/29/2026, 5:01:32 PM \x1b[32m    LOG\x1b[39m "
    "\x1b[33m[WsServerGateway]\x1b[39m WS server started on port: \x1b[33m3033\x1b[39m\n"
    "{ error: \x1b[32m'ECONNREFUSED'\x1b[39m, code: \x1b[33m-111\x1b[39m } \x1b[1;31mbold\x1b[0m\n"
)


def test_the_filter_leaves_the_text_and_no_control_sequence() -> None:
    out = strip_csi(NEST.encode()).decode()
    assert "\x1b" not in out
    assert out == (
        "[Nest] 375  - 11/29/2026, 5:01:32 PM     LOG [WsServerGateway] WS server started "
        "on port: 3033\n{ error: 'ECONNREFUSED', code: -111 } bold\n"
    )


def _through_filter_then_exec(script: str) -> tuple[int, str]:
    """Fork; the child does what the launcher does (_through_filter(), then exec the app:
    here python3 -c `script`) with its stdout on a pipe; (the child's PID, what came out)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            os.close(r)
            os.close(w)
            launcher._through_filter()
            os.execv(sys.executable, [sys.executable, "-c", script])
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return pid, text


def test_the_app_runs_in_this_process_with_its_output_through_the_filter() -> None:
    """_through_filter() then exec: what the app writes to stdout and stderr reaches the
    original stdout without control sequences, and the app keeps the launcher's PID."""
    script = "import os,sys; print('\\x1b[33mout\\x1b[39m', os.getpid(), flush=True); "
    script += "print('\\x1b[31merr\\x1b[0m', file=sys.stderr)"
    pid, text = _through_filter_then_exec(script)
    lines = sorted(text.splitlines())
    assert lines == ["err", f"out {pid}"], text


def test_the_filter_outlives_a_sigterm_and_passes_the_last_lines() -> None:
    """systemd SIGTERMs every process of the unit at a stop: the filter must still pass
    what the app writes while it shuts down, then end at EOF."""
    script = (
        "import os, subprocess, time\n"
        "print('before', flush=True)\n"
        "subprocess.run(['pkill', '-TERM', '-P', str(os.getpid())])  # the filter\n"
        "time.sleep(0.3)\n"
        "print('\\x1b[31mlast words\\x1b[0m', flush=True)\n"
    )
    _, text = _through_filter_then_exec(script)
    assert text.splitlines() == ["before", "last words"], text


def test_lines_split_across_reads_and_a_line_that_never_ends(tmp_path: Path) -> None:
    """filter_stream on real pipes: a control sequence cut by the pipe's chunks is still
    removed (whole lines are filtered), and output without a newline is not lost at EOF."""
    r, w = os.pipe()
    out = tmp_path / "out"
    data = ("x" * 70000 + "\x1b[33mA\x1b[39m\n") * 3 + "tail \x1b[1mno newline"
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            with os.fdopen(w, "wb") as f:
                f.write(data.encode())
        finally:
            os._exit(0)
    os.close(w)
    with out.open("wb") as f:
        launcher.filter_stream(r, f.fileno(), os.getppid())
    os.waitpid(pid, 0)
    signal_reset()
    assert out.read_text() == ("x" * 70000 + "A\n") * 3 + "tail no newline"


def signal_reset() -> None:
    """filter_stream set the signals of a filter process; put this test process's back."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, 0)
    launcher._on_parent_death(0)


def test_the_filter_ends_soon_after_the_app_even_if_the_pipe_stays_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process of the app's that keeps its stdout (the pipe) and outlives it: the filter
    gets no EOF, yet ends AFTER_APP_S after the app died, so it cannot hold the unit's stop
    until TimeoutStopSec (it once held it 30 s, and the unit ended `failed`)."""
    monkeypatch.setattr(launcher, "AFTER_APP_S", 0.5)
    script = (
        "import subprocess\n"
        "p = subprocess.Popen(['sleep', '120'], start_new_session=True)  # keeps the pipe\n"
        "print('bye', p.pid, flush=True)\n"
    )
    started = time.monotonic()
    _, text = _through_filter_then_exec(script)  # returns when the filter has ended
    took = time.monotonic() - started
    word, pid = text.split()
    os.kill(int(pid), 9)  # the sleep this test started
    assert word == "bye", text
    assert took < 60, took  # not at the sleep's end (120 s): a bound only a defect breaks
