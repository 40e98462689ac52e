"""Issue 11, item 2, against the real daemon (bin/aipbx-watchdog under a temporary root):
a local user holding thousands of connections to the API must not exhaust its file
descriptors, and when the daemon cannot open a socket at all (RLIMIT_NOFILE lowered under
it) it restarts nothing, says so once, and checks again when descriptors come back.

nginx and PostgreSQL are small fakes on loopback that answer as the real ones do (HTTP 204
for /aipbx-health, an authentication request for a startup packet). `systemctl` is a fake
on PATH that records its arguments: nothing on this host is ever restarted, and any
restart the daemon tried would be in its record. The breakers open at the first failure,
so a single failure blamed on a service would show."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.watchdog import api
from tests.integration.procs import free_port, stop
from tests.integration.test_watchdog_daemon import OPENER, REPO, _root

pytestmark = pytest.mark.integration

FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
exit 0
"""


class _Nginx(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.wfile.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")


class _Postgres(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.request.recv(1024)
        self.wfile.write(b"R\0\0\0\x08\0\0\0\x05")  # AuthenticationMD5Password-ish


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def serving(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    srv = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _health(port: int) -> dict[str, Any] | None:
    try:
        with OPENER.open(f"http://127.0.0.1:{port}/system-health", timeout=1) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except (OSError, ValueError):
        return None


def _until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed(s: socket.socket) -> bool:
    """Whether the peer closed or reset this connection (nothing else is ever sent)."""
    try:
        return s.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def flood(port: int, n: int) -> list[socket.socket]:
    """n connections opened one after the other and left silent, as `nobody` did."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2)
        with contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def _all_ok(h: dict[str, Any] | None) -> bool:
    return (
        h is not None
        and h["checks"]["nginx"]["state"] == "ok"
        and h["checks"]["postgresql"]["state"] == "ok"
        and h["watchdog"]["state"] == "ok"
    )


def test_held_connections_and_no_descriptors_restart_nothing(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "systemctl").write_text(FAKE_SYSTEMCTL)
    (fake_bin / "systemctl").chmod(0o755)
    calls = fake_bin / "calls"
    api_port = free_port()
    log = tmp_path / "watchdog.log"
    with serving(_Nginx) as nginx_port, serving(_Postgres) as pg_port:
        root = _root(
            tmp_path,
            "[watchdog]\n"
            f"api_port = {api_port}\n"
            'interval = "200ms"\ntimeout = "500ms"\nslow_threshold = "150ms"\n'
            'failures_to_open = 1\ncooldown = "1s"\ncritical_after = "0s"\n'
            f"[backend]\nhttp_port = {nginx_port}\n"
            f"[database]\npostgres_port = {pg_port}\n",
        )
        env = {**os.environ, "AIPBX_ROOT": str(root), "PYTHONPATH": str(REPO)}
        for k in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            env.pop(k, None)
        env["PATH"] = f"{fake_bin}:{env['PATH']}"
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

        def as_under_systemd() -> None:  # systemd's default LimitNOFILE=1024:524288
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "bin/aipbx-watchdog")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=as_under_systemd,
            )
        held: list[socket.socket] = []
        try:
            _until(lambda: _all_ok(_health(api_port)), 20, "nginx and PostgreSQL ok")
            baseline = _fds(proc.pid)

            # -- 2,500 connections held open, as `nobody` did: the excess is closed at once
            held += flood(api_port, 2500)
            # what it holds is the cap's worth (the excess is accepted and closed at once)
            _until(
                lambda: _fds(proc.pid) <= baseline + api.MAX_CONNECTIONS + 4,
                10,
                "no more descriptors than the cap's",
            )
            _until(
                lambda: sum(map(_closed, held)) >= len(held) - api.MAX_CONNECTIONS,
                10,
                "the connections over the cap closed",
            )
            time.sleep(1)  # five rounds with the cap full of silent clients
            # the silent ones are cut off too, and the API answers again
            _until(lambda: all(map(_closed, held)), 10, "every held connection cut off")
            h = _until(lambda: _health(api_port), 10, "the API to answer again")
            assert _all_ok(h), h

            # -- no descriptor at all: RLIMIT_NOFILE lowered under the running daemon
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (3, hard))
            _until(lambda: b"the watchdog cannot run its checks" in log.read_bytes(), 10, "it")
            time.sleep(2)  # ten rounds without a socket
            # a client meanwhile: accept() fails with EMFILE, and uvloop closes the listener
            assert _health(api_port) is None
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (1024, hard))
            h = _until(
                lambda: (x := _health(api_port)) is not None and _all_ok(x) and x, 20, "ok again"
            )
            assert proc.poll() is None
        finally:
            for s in held:
                s.close()
            stop(proc)
    text = log.read_text()
    lines = text.splitlines()
    said = [ln for ln in lines if ln.startswith("the watchdog cannot run its checks")]
    assert len(said) == 1 and "EMFILE" in said[0], text  # once, in the journal (CRITICAL)
    alerted = [ln for ln in lines if ln.startswith("CRITICAL alert: the watchdog cannot")]
    assert len(alerted) == 1, text  # and one alert about the watchdog itself
    assert "restarting" not in text and "Traceback" not in text, text
    assert all(r["total"] == 0 for r in h["restarts"].values()), h["restarts"]
    recorded = calls.read_text().splitlines() if calls.exists() else []
    assert not [c for c in recorded if c.split()[0] in ("restart", "kill", "stop")], recorded
