#!/usr/bin/python3
"""Load on the real aiPBX backend through the appliance, for the length of an upgrade: run
inside the booted machine with Debian's python3, aiohttp and python3-socketio.

- HTTP: GETs through nginx at a fixed rate, open loop (a slow server is not offered less
  load), cycling over --http-path. A request fails when it gets no answer (connection
  error, timeout) or a 5xx (nginx's 502/503/504 when no color answers, or the app's own);
  every answer's status is counted.
- Socket.IO: --sio clients (python-socketio, the websocket transport) over
  wss://…/socket.io/, each recording every connect (with its sid) and disconnect (a
  disconnect it made itself at the end is recorded as "end"). They
  reconnect by themselves after a disconnect, as a browser's client does. When the file
  --more-file appears, --sio-more more clients connect (the "late" ones) and --udp-more
  fresh UDP flows start.
- UDP: flows to the RTP port, one socket (source port, conntrack flow) each, sending
  172-byte packets; the app ignores RTP from a source it does not know, so the test reads
  which color a flow reaches from conntrack, by the source ports written here.

Every second it rewrites --progress (clients connected, requests sent and failed); at the
end (duration, --stop-file, SIGTERM) it writes --out. Times are epoch seconds."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import socketio


class Http:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sent = 0
        self.failed = 0
        self.statuses: Counter[str] = Counter()
        self.fail_reasons: Counter[str] = Counter()
        self.failures: list[tuple[float, str, str]] = []
        self.latencies: list[float] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        conn = aiohttp.TCPConnector(limit=self.args.http_conns, ssl=False)
        timeout = aiohttp.ClientTimeout(total=self.args.http_timeout)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            t0 = time.monotonic()
            n = 0
            while not stop.is_set():
                due = t0 + n / self.args.http_rps
                delay = due - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        break
                path = self.args.http_path[n % len(self.args.http_path)]
                task = asyncio.ensure_future(self.get(session, path, due))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                n += 1
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=self.args.http_timeout + 1)

    async def get(self, session: aiohttp.ClientSession, path: str, due: float) -> None:
        self.sent += 1
        reason = None
        try:
            async with session.get(self.args.base + path) as r:
                await r.read()
                self.statuses[str(r.status)] += 1
                if r.status >= 500:
                    reason = f"HTTP {r.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            reason = type(e).__name__
        if reason:
            self.failed += 1
            self.fail_reasons[reason] += 1
            if len(self.failures) < 100:
                self.failures.append((round(time.time(), 3), path, reason))
        else:
            self.latencies.append((time.monotonic() - due) * 1000)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

        return {
            "sent": self.sent,
            "failed": self.failed,
            "statuses": dict(self.statuses),
            "fail_reasons": dict(self.fail_reasons),
            "failures": self.failures,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
        }


class SioClient:
    def __init__(self, n: int, late: bool, args: argparse.Namespace) -> None:
        self.n = n
        self.late = late
        self.args = args
        self.events: list[tuple[float, str, str]] = []
        self.connected = False
        self.ending = False
        self.client = socketio.AsyncClient(
            reconnection=True,
            reconnection_delay=0.5,
            reconnection_delay_max=2,
            randomization_factor=0.5,
            ssl_verify=False,
        )
        self.client.on("connect", self.on_connect)
        self.client.on("disconnect", self.on_disconnect)

    async def on_connect(self) -> None:
        self.connected = True
        self.events.append((round(time.time(), 3), "connect", str(self.client.sid)))

    async def on_disconnect(self) -> None:
        self.connected = False
        # "end": closed by this client at the end of the run; anything else is a drop
        self.events.append((round(time.time(), 3), "end" if self.ending else "disconnect", ""))

    async def run(self, stop: asyncio.Event) -> None:
        # The first connect is retried here (python-socketio reconnects by itself only
        # after a connection it had was lost).
        while not stop.is_set() and not self.client.connected:
            try:
                await self.client.connect(
                    self.args.base, transports=["websocket"], socketio_path="socket.io"
                )
            except (socketio.exceptions.ConnectionError, OSError) as e:
                self.events.append((round(time.time(), 3), "connect-failed", str(e)[:200]))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        await stop.wait()
        self.ending = True
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    def dump(self) -> dict[str, Any]:
        return {"client": self.n, "late": self.late, "events": self.events}


class Udp:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.flows: list[dict[str, Any]] = []

    async def flow(self, stop: asyncio.Event, fresh: bool) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        rec = {"port": s.getsockname()[1], "fresh": fresh, "started": time.time(), "sent": 0}
        self.flows.append(rec)
        payload = b"\x80" + b"\x00" * 171
        try:
            while not stop.is_set():
                with contextlib.suppress(OSError):  # ECONNREFUSED from an earlier packet
                    s.sendto(payload, (self.args.udp_host, self.args.udp_port))
                    rec["sent"] += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1 / self.args.udp_pps)
        finally:
            s.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.time()
    http = Http(args)
    udp = Udp(args)
    clients = [SioClient(i, False, args) for i in range(args.sio)]
    tasks = [asyncio.ensure_future(http.run(stop))]
    tasks += [asyncio.ensure_future(c.run(stop)) for c in clients]
    tasks += [asyncio.ensure_future(udp.flow(stop, False)) for _ in range(args.udp_flows)]
    more_started = None
    end = time.monotonic() + args.duration
    while not stop.is_set() and time.monotonic() < end:
        if args.stop_file and os.path.exists(args.stop_file):
            break
        if more_started is None and args.more_file and os.path.exists(args.more_file):
            more_started = time.time()
            late = [SioClient(args.sio + i, True, args) for i in range(args.sio_more)]
            clients += late
            tasks += [asyncio.ensure_future(c.run(stop)) for c in late]
            tasks += [asyncio.ensure_future(udp.flow(stop, True)) for _ in range(args.udp_more)]
        progress = {
            "at": time.time(),
            "connected": sum(c.connected for c in clients if not c.late),
            "late_connected": sum(c.connected for c in clients if c.late),
            "http_sent": http.sent,
            "http_failed": http.failed,
            "udp_ports": [f["port"] for f in udp.flows],
        }
        Path(args.progress).write_text(json.dumps(progress))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    stop.set()
    await asyncio.wait(tasks, timeout=args.http_timeout + 5)
    return {
        "started_at": started,
        "stopped_at": time.time(),
        "more_started_at": more_started,
        "http": http.summary(),
        "sio": [c.dump() for c in clients],
        "udp": udp.flows,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="https://127.0.0.1")
    p.add_argument("--http-path", action="append", required=True)
    p.add_argument("--http-rps", type=float, default=20)
    p.add_argument("--http-conns", type=int, default=16)
    p.add_argument("--http-timeout", type=float, default=10)
    p.add_argument("--sio", type=int, default=10)
    p.add_argument("--sio-more", type=int, default=5)
    p.add_argument("--udp-host", default="127.0.0.1")
    p.add_argument("--udp-port", type=int, default=3032)
    p.add_argument("--udp-flows", type=int, default=4)
    p.add_argument("--udp-more", type=int, default=2)
    p.add_argument("--udp-pps", type=float, default=20)
    p.add_argument("--more-file", default="")
    p.add_argument("--stop-file", default="")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--progress", required=True)
    p.add_argument("--out", required=True)
    return p.parse_args()


if __name__ == "__main__":
    a = parse_args()
    doc = asyncio.run(main(a))
    tmp = a.out + ".tmp"
    Path(tmp).write_text(json.dumps(doc))
    os.replace(tmp, a.out)
