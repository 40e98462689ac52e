"""The real entry point (bin/aipbx-watchdog's main) as a subprocess under a temporary root:
sd_notify READY/STATUS/WATCHDOG on a socket of ours, /system-health on a free port, a clean
stop on SIGTERM. Its breakers open only after 100 failures (longer than any test here
runs), and `systemctl` on its PATH is a fake: it restarts nothing on this host."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.integration.procs import free_port, stop

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stopped(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The exit code; if it does not exit in time, where each of its threads was (its
    faulthandler prints them on SIGABRT) goes into the failure."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"no exit {timeout} s after SIGTERM:\n{err.decode()}") from None


def _root(tmp_path: Path, toml: str) -> Path:
    """A root for AIPBX_ROOT with aipbx.toml."""
    root = tmp_path / "root"
    (root / "etc/aipbx").mkdir(parents=True)
    (root / "var/lib/aipbx").mkdir(parents=True)
    (root / "etc/aipbx/aipbx.toml").write_text(toml)
    return root


def _daemon(root: Path, **env: str) -> subprocess.Popen[bytes]:
    """bin/aipbx-watchdog under `root`, logging to stderr; `env` on top (NOTIFY_SOCKET...)."""
    full = {**os.environ, "AIPBX_ROOT": str(root), "PYTHONPATH": str(REPO)}
    for k in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        full.pop(k, None)
    fake_bin = root.parent / "fake-bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "systemctl").write_text("#!/bin/sh\nexit 0\n")  # every unit "active"
    (fake_bin / "systemctl").chmod(0o755)
    full["PATH"] = f"{fake_bin}:{full['PATH']}"
    return subprocess.Popen(
        [sys.executable, str(REPO / "bin/aipbx-watchdog")],
        env={**full, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_daemon_notifies_serves_and_stops(tmp_path: Path) -> None:
    port = free_port()
    root = _root(
        tmp_path,
        "[watchdog]\n"
        f"api_port = {port}\n"
        'interval = "200ms"\ntimeout = "500ms"\nslow_threshold = "400ms"\n'
        "failures_to_open = 100\n"
        "[database]\n"
        f"postgres_port = {free_port()}\n",
    )
    (root / "etc/aipbx/alerts.env").write_text("TELEGRAM_BOT_TOKEN=never-shown\n")
    sock_path = Path(tempfile.mkdtemp(prefix="aipbx-notify-")) / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(0.2)
    proc = _daemon(root, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
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
        assert stopped(proc, 10) == 0
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


class _Hook(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.got.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_undelivered_alert_survives_a_restart_and_is_not_repeated(tmp_path: Path) -> None:
    """PostgreSQL is down (nothing on its port) and the webhook is down too: the CRITICAL
    waits in the spool. The watchdog restarts (as a package upgrade restarts it), the
    webhook comes up: the CRITICAL from before arrives, once, and the open incident is
    not alerted again."""
    hook_port = free_port()
    root = _root(
        tmp_path,
        "[watchdog]\n"
        f"api_port = {free_port()}\n"
        'interval = "200ms"\ntimeout = "500ms"\nslow_threshold = "400ms"\n'
        'critical_after = "0s"\nfailures_to_open = 100\n'
        "[alerts]\n"
        f'webhook_url = "http://127.0.0.1:{hook_port}/hook"\nsend_timeout = "1s"\n'
        "[database]\n"
        f"postgres_port = {free_port()}\npgbouncer_port = {free_port()}\n",
    )
    spool = root / "var/lib/aipbx/watchdog/alerts.json"

    def queued() -> list[dict[str, Any]]:
        try:
            doc = json.loads(spool.read_text())
        except (OSError, ValueError):
            return []
        entries: list[dict[str, Any]] = doc["queues"].get("webhook", [])
        return [e for e in entries if e["check"] == "postgresql"]

    first = _daemon(root)
    try:
        entry = _until(queued, 15, "the CRITICAL in the spool")[0]
        first.send_signal(signal.SIGTERM)
        assert first.wait(10) == 0
    finally:
        stop(first)
    assert entry["severity"] == "CRITICAL" and entry["incident"] == "postgresql#1", entry
    saved = json.loads(spool.read_text())["monitor"]["incidents"]["postgresql"]
    assert saved["critical_sent"] is True and saved["count"] == 1, saved

    _Hook.got = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", hook_port), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    second = _daemon(root)
    try:
        _until(lambda: [a for a in _Hook.got if a["incident"] == "postgresql#1"], 15, "delivery")
        time.sleep(2)  # ten more rounds with PostgreSQL still down
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
    finally:
        stop(second)
        srv.shutdown()
    sent = [a for a in _Hook.got if a["check"] == "postgresql"]
    assert [(a["severity"], a["incident"]) for a in sent] == [("CRITICAL", "postgresql#1")], sent
    # the alert raised before the restart (its time), not a new one for the same outage
    raised = datetime.fromtimestamp(entry["wall"], UTC).isoformat(timespec="seconds")
    assert sent[0]["time"] == raised, (sent, entry)
    assert queued() == []


def test_a_notify_socket_nobody_reads_does_not_block_the_daemon(tmp_path: Path) -> None:
    """sd_notify over a datagram socket: when its reader lags, the queue (10 messages)
    fills. The daemon must go on (and stop on SIGTERM), not block in a ping."""
    port = free_port()
    root = _root(
        tmp_path,
        f'[watchdog]\napi_port = {port}\ninterval = "100ms"\ntimeout = "100ms"\n'
        'slow_threshold = "50ms"\nfailures_to_open = 100\n'
        f"[database]\npostgres_port = {free_port()}\n",
    )
    sock_path = Path(tempfile.mkdtemp(prefix="aipbx-notify-")) / "notify"
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unread.bind(str(sock_path))
    proc = _daemon(root, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="200000")
    try:
        time.sleep(3)  # some 60 pings: the queue filled long ago
        # still serving: the loop is not stuck in a ping
        with OPENER.open(f"http://127.0.0.1:{port}/system-health", timeout=2) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert stopped(proc, 10) == 0
    finally:
        stop(proc)
        unread.close()
