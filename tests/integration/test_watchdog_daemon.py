"""The real entry point (bin/aipbx-watchdog's main) as a subprocess under a temporary root:
sd_notify READY/STATUS/WATCHDOG on a socket of ours, /system-health on a free port, a clean
stop on SIGTERM. Its breakers are set never to open, so it restarts nothing on this host."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.procs import free_port, stop

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_daemon_notifies_serves_and_stops(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/aipbx").mkdir(parents=True)
    (root / "var/lib/aipbx").mkdir(parents=True)
    port = free_port()
    (root / "etc/aipbx/aipbx.toml").write_text(
        "[watchdog]\n"
        f"api_port = {port}\n"
        'interval = "200ms"\ntimeout = "500ms"\nslow_threshold = "400ms"\n'
        "failures_to_open = 1000000\n"
        "[database]\n"
        f"postgres_port = {free_port()}\n"
    )
    (root / "etc/aipbx/secrets.env").write_text("TELEGRAM_BOT_TOKEN=never-shown\n")
    sock_path = Path(tempfile.mkdtemp(prefix="aipbx-notify-")) / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(0.2)
    env = {
        **os.environ,
        "AIPBX_ROOT": str(root),
        "NOTIFY_SOCKET": str(sock_path),
        "WATCHDOG_USEC": "1000000",
        "PYTHONPATH": str(REPO),
    }
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bin/aipbx-watchdog")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 15
        health = None
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages += notify.recv(4096).decode().splitlines()
            if "READY=1" in messages and messages.count("WATCHDOG=1") >= 3:
                try:
                    with OPENER.open(f"http://127.0.0.1:{port}/system-health", timeout=1) as r:
                        health = json.loads(r.read())
                    break
                except OSError:
                    pass
        assert health is not None, (messages, proc.poll())
        rss_kib = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0])
        print(f"watchdog RSS under test: {rss_kib / 1024:.1f} MiB")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop(proc)
        notify.close()
    assert messages[0] == "READY=1"
    assert any(m.startswith("STATUS=live color none; checks: ") for m in messages), messages
    assert health["live_color"] is None
    assert health["checks"]["backend_http"]["state"] == "idle"
    assert health["checks"]["postgresql"]["state"] == "critical"
    assert health["checks"]["postgresql"]["error"] == "connection refused"
    assert health["checks"]["postgresql"]["breaker"] == "closed"
    assert health["alerts"]["telegram"]["enabled"] is False
    assert "chat" in health["alerts"]["telegram"]["reason"]
    assert health["alerts"]["webhook"]["reason"] == "alerts.webhook_url is not set"
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "never-shown" not in stderr
    assert "Traceback" not in stderr, stderr


def test_start_up_reconcile_starts_the_live_backend(tmp_path: Path) -> None:
    import asyncio

    from appliance import state
    from appliance.colors import Color
    from appliance.paths import Paths
    from appliance.services import UnitState
    from appliance.watchdog import reconcile
    from tests.integration.test_watchdog_loop import FakeBackend, FakeServices

    class Inactive(FakeServices):
        def state(self, unit: str) -> UnitState:
            return UnitState(unit, "failed", "failed", "enabled", "", 0)

    paths = Paths(tmp_path)
    services = Inactive(FakeBackend(0, 0))
    assert asyncio.run(reconcile.apply(paths, services)) == []  # no state.json: nothing
    state.save(paths.state, state.State(live_color=Color.GREEN))
    actions = asyncio.run(reconcile.apply(paths, services))
    assert [(a.verb, a.unit) for a in actions] == [("start", "aipbx-backend@green.service")]
    assert [(verb, unit) for verb, unit, _ in services.calls] == [
        ("start", "aipbx-backend@green.service")
    ]


def test_a_thread_still_busy_does_not_hold_up_the_exit() -> None:
    """A `systemctl restart` in a thread waits for the unit's start job; the daemon's stop
    must not wait for it. Here a thread sleeps 60 s: the exit comes after the 2 s grace,
    with the thread named in the log."""
    code = (
        "import asyncio, time\n"
        "from appliance.log import setup\n"
        "from appliance.watchdog.daemon import run_bounded\n"
        "setup(identifier='t', stderr=True)\n"
        "async def main():\n"
        "    asyncio.get_running_loop().run_in_executor(None, time.sleep, 60)\n"
        "    await asyncio.sleep(0.1)\n"
        "run_bounded(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert 2 <= took < 10, took
    assert "exiting with 1 thread(s) still busy" in proc.stderr, proc.stderr
