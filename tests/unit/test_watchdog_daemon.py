"""The supervising loop pings systemd while rounds run within their deadline, and stops
pinging when a round is stuck, so that WatchdogSec= kills the daemon."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from appliance.watchdog import daemon
from appliance.watchdog.settings import Settings


class Pings(daemon.Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[float, str]] = []

    def notify(self, msg: str) -> None:
        self.got.append((time.monotonic(), msg))


class FakeMonitor:
    def __init__(self, hang_after: int) -> None:
        self.rounds = 0
        self.hang_after = hang_after

    async def round(self) -> None:
        self.rounds += 1
        if self.rounds > self.hang_after:
            await asyncio.sleep(3600)  # a round that never ends

    def snapshot(self) -> dict[str, Any]:
        return {"live_color": None, "checks": {"disk": {"state": "ok"}}}

    def summary(self) -> dict[str, Any]:
        return self.snapshot()


def test_pings_stop_when_a_round_is_stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    settings = Settings(interval=0.1, timeout=0.1)
    monitor = FakeMonitor(hang_after=3)
    pings = Pings()

    async def scenario() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(
            daemon.supervise(monitor, settings, pings, stop, grace=0.2)  # type: ignore[arg-type]
        )
        while monitor.rounds <= 3:
            await asyncio.sleep(0.01)
        stuck_at = time.monotonic()
        await asyncio.sleep(1.0)
        stop.set()
        task.cancel()
        return stuck_at

    stuck_at = asyncio.run(scenario())
    watchdog = [t for t, m in pings.got if m == "WATCHDOG=1"]
    assert len([t for t in watchdog if t < stuck_at]) >= 3
    # pinged while the stuck round was within timeout + grace, then never again
    last = max(watchdog)
    assert stuck_at < last <= stuck_at + settings.timeout + 0.2 + 0.06
    assert ("STATUS=live color none; checks: 1 ok") in [m for _, m in pings.got]


def test_the_api_listener_is_known_gone_when_its_socket_is_closed() -> None:
    """uvloop closes the listening socket when accept() fails with EMFILE: the daemon
    serves again once the socket is closed, or its descriptor holds another file."""
    import socket

    from appliance.watchdog.api import Server

    class Fake:
        def __init__(self, sockets: list[socket.socket]) -> None:
            self.sockets = sockets

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    with s, open(__file__, "rb") as other:
        server = Server(Fake([s]))  # type: ignore[arg-type]
        assert server.listening()
        fd = s.fileno()
        s.close()
        assert not server.listening()  # closed
        os.dup2(other.fileno(), fd)  # the same number, another file
        try:
            assert not server.listening()
        finally:
            os.close(fd)


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_sd_notify_datagrams(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    import socket

    name = f"aipbx-notify-test-{os.getpid()}"
    recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        recv.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        recv.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    recv.settimeout(5)
    with recv:
        n = daemon.Notifier()
        n.notify("READY=1")
        n.notify("WATCHDOG=1")
        assert [recv.recv(64), recv.recv(64)] == [b"READY=1", b"WATCHDOG=1"]


def test_notifier_is_silent_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    daemon.Notifier().notify("READY=1")  # nothing to send to, no error
    assert daemon.notify_address("vsock:2:1234") is None
    assert daemon.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert daemon.notify_address("@x") == b"\0x"
