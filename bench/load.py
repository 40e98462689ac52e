#!/usr/bin/python3
"""The benchmark's load generator: HTTP writes, WebSocket pings and UDP flows against the
appliance for the whole length of an upgrade, with everything a later analysis needs.

Standalone on purpose (stdlib + aiohttp, uvloop when importable): it is copied into the booted
Debian 12 machine and run there with /usr/bin/python3.

- HTTP: an open-loop scheduler issues POST {base}/api/writes at a fixed rate whatever the
  server does (a slow server is not offered less load); latency counts from the moment a
  request was due, so a stalled scheduler shows up as latency, not as a lower rate. Every
  request carries a fresh id; a 2xx echoing that id is a write acknowledged after COMMIT.
- WebSocket: N connections, each sending "ping" every second and expecting "pong <version>".
  A close, an error or 5 s without a pong is a drop; the slot then reconnects as a NEW
  connection, so a drop is never hidden.
- UDP: one socket (its own source port, i.e. its own conntrack flow) per flow, each sending
  fixed-size packets carrying a sequence number; replies are "<version> " + the payload.
  Optionally a short fresh flow every N seconds shows which color new flows reach.

All times written are epoch seconds (time.time() at start plus time.monotonic() offsets, so a
wall-clock step during the run cannot bend them); the orchestrator stamps its events with
time.time() on the same host, which makes the two comparable. Timeline rows are per second
since the start (row t covers [t, t+1) s).

The report (--out, JSON, schema "aipbx-bench-load/1"):
  started_at, stopped_at, ended_at (epoch s), stop_cause (duration|stop-file|signal|error),
  config (the arguments), runtime (python, aiohttp, loop, cpus),
  summary: http_sent/ok/failed, http_fail_reasons {reason: n}, http_retries, http_versions,
    http_sent_rps, http_ok_rps, http_p50_ms, http_p99_ms, http_p50_ms_after_warmup,
    http_p99_ms_after_warmup (requests due from --warmup-s on), http_max_sched_lag_ms,
    ws_connections, ws_drops, ws_connect_failures {reason: n}, ws_pongs, udp_sent, udp_recv,
    udp_lost, udp_sent_pps, udp_new_flows, cpu_user_s, cpu_system_s, cpu_pct (of one core),
    max_rss_kb
  timeline: [{t, at, span_s, http_sent, http_ok, http_failed, http_fail_reasons, http_p50_ms,
    http_p99_ms, http_versions, sched_lag_ms, ws_open, ws_pongs, ws_drops, ws_connect_failed,
    ws_versions, udp_sent, udp_recv, udp_flows_alive, udp_versions, cpu_pct}]
    (HTTP counted in the second a request was due, answers in the second they arrived)
  ws_connections: [{slot, gen, opened, closed, close_reason ("end" = closed by us at the
    end; anything else is a drop), pings, pongs, runs, versions}]
  udp_flows, udp_new_flows: [{flow, port, started, sent, received, lost, late_window_s,
    duplicates, reordered, malformed, errors, runs, versions}]
  where runs = [{version, count, first, last}] in the order answers came and
  versions = {version: {count, first, last}};
  writes_acked: [id, ...] every id whose POST /api/writes was acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import socket
import struct
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

SCHEMA = "aipbx-bench-load/1"
WS_SILENCE_S = 5.0  # no pong for this long: the connection is dropped
RECONNECT_DELAY_S = 1.0
UDP_MAGIC = b"AIPB"
UDP_HEADER = struct.Struct("!4sHI")  # magic, flow number, sequence number
NEW_FLOW_PACKETS = 10
NEW_FLOW_WAIT_S = 1.0
HEADERS = {"Content-Type": "application/json"}


class Clock:
    """Seconds since the start, from the monotonic clock; epoch() converts for output."""

    def __init__(self) -> None:
        self.mono0 = time.monotonic()
        self.epoch0 = time.time()

    def now(self) -> float:
        return time.monotonic() - self.mono0

    def epoch(self, t: float) -> float:
        return round(self.epoch0 + t, 4)


class Second:
    """What happened in one second of the run."""

    __slots__ = (
        "cpu_pct",
        "http_fail_reasons",
        "http_failed",
        "http_latencies",
        "http_ok",
        "http_sent",
        "http_versions",
        "sched_lag_ms",
        "udp_flows",
        "udp_recv",
        "udp_sent",
        "udp_versions",
        "ws_connect_failed",
        "ws_drops",
        "ws_open",
        "ws_pongs",
        "ws_versions",
    )

    def __init__(self) -> None:
        self.http_sent = 0
        self.http_ok = 0
        self.http_failed = 0
        self.http_latencies: list[float] = []
        self.http_versions: Counter[str] = Counter()
        self.http_fail_reasons: Counter[str] = Counter()
        self.sched_lag_ms = 0.0
        self.ws_open: int | None = None
        self.ws_pongs = 0
        self.ws_drops = 0
        self.ws_connect_failed = 0
        self.ws_versions: Counter[str] = Counter()
        self.udp_sent = 0
        self.udp_recv = 0
        self.udp_flows: set[int] = set()
        self.udp_versions: Counter[str] = Counter()
        self.cpu_pct: float | None = None


class Timeline:
    def __init__(self) -> None:
        self.seconds: list[Second] = []

    def at(self, t: float) -> Second:
        i = max(0, int(t))
        while len(self.seconds) <= i:
            self.seconds.append(Second())
        return self.seconds[i]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats going wrong
    return sorted_values[int(rank) - 1]


class Runs:
    """Versions in the order they answered, run-length encoded: [{version, count, first,
    last}], plus first/last/count per version."""

    def __init__(self) -> None:
        self.runs: list[list[Any]] = []  # [version, count, first_t, last_t]
        self.by_version: dict[str, list[Any]] = {}  # version -> [count, first_t, last_t]

    def add(self, version: str, t: float) -> None:
        if self.runs and self.runs[-1][0] == version:
            run = self.runs[-1]
            run[1] += 1
            run[3] = t
        else:
            self.runs.append([version, 1, t, t])
        seen = self.by_version.get(version)
        if seen is None:
            self.by_version[version] = [1, t, t]
        else:
            seen[0] += 1
            seen[2] = t

    def dump(self, clock: Clock) -> dict[str, Any]:
        return {
            "runs": [
                {"version": v, "count": n, "first": clock.epoch(a), "last": clock.epoch(b)}
                for v, n, a, b in self.runs
            ],
            "versions": {
                v: {"count": n, "first": clock.epoch(a), "last": clock.epoch(b)}
                for v, (n, a, b) in self.by_version.items()
            },
        }


# -- HTTP


class HttpLoad:
    def __init__(self, args: argparse.Namespace, clock: Clock, tl: Timeline) -> None:
        self.url = args.base_url.rstrip("/") + "/api/writes"
        self.rps = float(args.http_rps)
        self.timeout = float(args.http_timeout)
        self.retries = int(args.http_retries)
        self.ssl: Any = False if args.insecure else None
        self.conns = int(args.http_conns)
        self.tick = float(args.http_tick_ms) / 1000
        self.end = float(args.duration)  # nothing is due at or after it
        self.clock = clock
        self.tl = tl
        # past this many requests in flight the server is hopeless: do not pile up tasks
        self.max_in_flight = int(self.rps * self.timeout * 1.5) + 100
        self.in_flight: set[asyncio.Task[None]] = set()
        self.acked: list[str] = []
        self.retried: Counter[str] = Counter()
        self.sent = 0
        self.max_lag = 0.0
        self.session: Any = None

    async def run(self, stop: asyncio.Event) -> None:
        if self.rps <= 0:
            return
        connector = aiohttp.TCPConnector(limit=self.conns, ssl=self.ssl, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self.session = session
            await self.schedule(stop)
            if self.in_flight:
                _, pending = await asyncio.wait(self.in_flight, timeout=self.timeout + 2)
                for task in pending:  # cannot happen with total= timeouts; never hang on it
                    task.cancel()

    async def schedule(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rps
        # a batch per tick: fewer wake-ups (CPU) against up to one tick of added latency
        tick = max(interval, self.tick)
        start = self.clock.now()
        while not stop.is_set():
            now = self.clock.now()
            due = start + self.sent * interval
            if due >= self.end:
                await stop.wait()
                break
            if due <= now:
                lag = now - due
                second = self.tl.at(due)
                second.sched_lag_ms = max(second.sched_lag_ms, lag * 1000)
                self.max_lag = max(self.max_lag, lag)
            while due <= now and due < self.end and not stop.is_set():
                self.sent += 1
                if len(self.in_flight) >= self.max_in_flight:
                    self.record(due, None, "client_backlog")
                else:
                    task = loop.create_task(self.request(due))
                    self.in_flight.add(task)
                    task.add_done_callback(self.in_flight.discard)
                due = start + self.sent * interval
            # at high rates a batch per tick; at low rates sleep until the next one is due
            await asyncio.sleep(tick if interval < tick else max(0.0, due - self.clock.now()))

    async def request(self, due: float) -> None:
        row_id = uuid.uuid4().hex
        body = b'{"id":"' + row_id.encode() + b'"}'
        attempt = 0
        while True:
            version, reason = await self.post(row_id, body)
            # a write with the same id is idempotent on the backend, so a retry is safe;
            # only connections the server closed under us are retried, and only when asked
            if (
                reason in ("ServerDisconnectedError", "ClientOSError")
                and attempt < self.retries
                and self.clock.now() - due < self.timeout
            ):
                attempt += 1
                self.retried[str(reason)] += 1
                continue
            break
        if version is not None:
            self.acked.append(row_id)
        self.record(due, version, reason)

    async def post(self, row_id: str, body: bytes) -> tuple[str | None, str | None]:
        try:
            async with self.session.post(self.url, data=body, headers=HEADERS) as resp:
                payload = await resp.read()
                if not 200 <= resp.status < 300:
                    return None, f"http_{resp.status}"
        except TimeoutError:
            return None, "timeout"
        except (aiohttp.ClientError, OSError) as e:
            return None, type(e).__name__
        try:
            doc = json.loads(payload)
        except ValueError:
            return None, "bad_body"
        if not isinstance(doc, dict) or doc.get("id") != row_id:
            return None, "bad_body"
        return str(doc.get("version")), None

    def record(self, due: float, version: str | None, reason: str | None) -> None:
        second = self.tl.at(due)
        second.http_sent += 1
        if reason is None:
            second.http_ok += 1
            second.http_versions[str(version)] += 1
            second.http_latencies.append(self.clock.now() - due)
        else:
            second.http_failed += 1
            second.http_fail_reasons[reason] += 1


# -- WebSocket


class WsConn:
    """One WebSocket connection, from open to close."""

    def __init__(self, slot: int, gen: int, opened: float) -> None:
        self.slot = slot
        self.gen = gen
        self.opened = opened
        self.closed: float | None = None
        self.close_reason: str | None = None
        self.last_pong = opened
        self.pings = 0
        self.pongs = 0
        self.runs = Runs()

    def dump(self, clock: Clock) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "gen": self.gen,
            "opened": clock.epoch(self.opened),
            "closed": None if self.closed is None else clock.epoch(self.closed),
            "close_reason": self.close_reason,
            "pings": self.pings,
            "pongs": self.pongs,
            **self.runs.dump(clock),
        }


class WsLoad:
    def __init__(self, args: argparse.Namespace, clock: Clock, tl: Timeline) -> None:
        self.url = args.ws_url
        self.n = int(args.ws)
        self.ssl: Any = False if args.insecure else None
        self.clock = clock
        self.tl = tl
        self.conns: list[WsConn] = []
        self.connect_failures: Counter[str] = Counter()

    def open_count(self) -> int:
        return sum(1 for c in self.conns if c.closed is None)

    async def run(self, stop: asyncio.Event) -> None:
        if self.n <= 0 or not self.url:
            return
        # its own session: 50 long-lived sockets must not eat the HTTP connector's slots
        connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl)
        async with aiohttp.ClientSession(connector=connector) as session:
            stop_waiter = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.gather(
                    *(self.slot(session, i, stop, stop_waiter) for i in range(self.n))
                )
            finally:
                stop_waiter.cancel()

    async def slot(
        self, session: Any, slot: int, stop: asyncio.Event, stop_waiter: asyncio.Future[Any]
    ) -> None:
        offset = slot / self.n  # spread the pings over the second
        gen = 0
        while not stop.is_set():
            try:
                ws = await asyncio.wait_for(
                    session.ws_connect(self.url, autoping=True, heartbeat=None), 5.0
                )
            except TimeoutError:
                reason = "timeout"
            except (aiohttp.ClientError, OSError) as e:
                reason = type(e).__name__
            else:
                await self.connection(ws, slot, gen, offset, stop, stop_waiter)
                gen += 1
                reason = ""
            if reason:
                self.connect_failures[reason] += 1
                self.tl.at(self.clock.now()).ws_connect_failed += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RECONNECT_DELAY_S)

    async def connection(
        self,
        ws: Any,
        slot: int,
        gen: int,
        offset: float,
        stop: asyncio.Event,
        stop_waiter: asyncio.Future[Any],
    ) -> None:
        clock = self.clock
        conn = WsConn(slot, gen, clock.now())
        self.conns.append(conn)
        reader = asyncio.ensure_future(self.read(ws, conn))
        next_ping = conn.opened + offset
        reason = ""
        while not reason:
            now = clock.now()
            if stop.is_set():
                reason = "end"
            elif reader.done():
                reason = reader.result() if not reader.cancelled() else "cancelled"
            elif now - conn.last_pong > WS_SILENCE_S:
                reason = f"no_pong_{WS_SILENCE_S:g}s"
            elif now >= next_ping:
                try:
                    await ws.send_str("ping")
                    conn.pings += 1
                except (aiohttp.ClientError, OSError, RuntimeError) as e:
                    reason = f"send_failed: {type(e).__name__}"
                next_ping = max(next_ping + 1.0, now + 0.5)
            else:
                await asyncio.wait({reader, stop_waiter}, timeout=next_ping - now)
        # the reader stamped a close it saw itself; otherwise the drop is declared now
        closed = conn.closed if conn.closed is not None else clock.now()
        conn.closed = closed
        conn.close_reason = reason
        if reason != "end":
            self.tl.at(closed).ws_drops += 1
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2.0)

    async def read(self, ws: Any, conn: WsConn) -> str:
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    text = msg.data
                    if text.startswith("pong "):
                        now = self.clock.now()
                        version = text[5:].strip()
                        conn.last_pong = now
                        conn.pongs += 1
                        conn.runs.add(version, now)
                        second = self.tl.at(now)
                        second.ws_pongs += 1
                        second.ws_versions[version] += 1
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    conn.closed = self.clock.now()
                    return f"error: {type(ws.exception()).__name__}"
        except (aiohttp.ClientError, OSError) as e:
            conn.closed = self.clock.now()
            return f"error: {type(e).__name__}"
        conn.closed = self.clock.now()
        return f"closed: {ws.close_code}"

    def dump(self) -> list[dict[str, Any]]:
        return [c.dump(self.clock) for c in self.conns]


# -- UDP


class Flow(asyncio.DatagramProtocol):
    def __init__(self, number: int, size: int, clock: Clock, tl: Timeline, steady: bool) -> None:
        self.number = number
        self.size = size
        self.clock = clock
        self.tl = tl
        self.steady = steady
        self.pad = b"\0" * (size - UDP_HEADER.size)
        self.transport: Any = None
        self.port = 0
        self.started = 0.0
        self.sent = 0
        self.received = 0
        self.duplicates = 0
        self.reordered = 0
        self.malformed = 0
        self.errors = 0
        self.max_seq = -1
        self.seen: set[int] = set()
        self.runs = Runs()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])

    def send(self, addr: tuple[Any, ...]) -> None:
        packet = UDP_HEADER.pack(UDP_MAGIC, self.number & 0xFFFF, self.sent) + self.pad
        self.transport.sendto(packet, addr)
        self.sent += 1
        self.tl.at(self.clock.now()).udp_sent += 1

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # versions never hold a space (release names forbid it); the payload may
        space = data.find(b" ")
        payload = data[space + 1 :]
        if space <= 0 or len(payload) != self.size:
            self.malformed += 1
            return
        magic, number, seq = UDP_HEADER.unpack_from(payload)
        if magic != UDP_MAGIC or number != self.number & 0xFFFF or seq >= self.sent:
            self.malformed += 1
            return
        if seq in self.seen:
            self.duplicates += 1
            return
        self.seen.add(seq)
        self.received += 1
        if seq < self.max_seq:
            self.reordered += 1
        else:
            self.max_seq = seq
        now = self.clock.now()
        version = data[:space].decode("ascii", "replace")
        self.runs.add(version, now)
        second = self.tl.at(now)
        second.udp_recv += 1
        second.udp_versions[version] += 1
        if self.steady:
            second.udp_flows.add(self.number)

    def error_received(self, exc: Exception) -> None:
        self.errors += 1

    def dump(self, late_window_s: float) -> dict[str, Any]:
        return {
            "flow": self.number,
            "port": self.port,
            "started": self.clock.epoch(self.started),
            "sent": self.sent,
            "received": self.received,
            # counted after the late window: a reply that came back out of order or late
            # (within the window) is not lost
            "lost": self.sent - self.received,
            "late_window_s": late_window_s,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "malformed": self.malformed,
            "errors": self.errors,
            **self.runs.dump(self.clock),
        }


class UdpLoad:
    def __init__(self, args: argparse.Namespace, clock: Clock, tl: Timeline) -> None:
        self.host = args.udp_host
        self.port = int(args.udp_port)
        self.n = int(args.udp_flows)
        self.pps = float(args.udp_pps)
        self.size = int(args.udp_size)
        self.new_every = float(args.new_udp_flow_every or 0)
        self.late_window = float(args.udp_late_window)
        self.end = float(args.duration)  # nothing is due at or after it
        self.clock = clock
        self.tl = tl
        self.flows: list[Flow] = []
        self.new_flows: list[Flow] = []
        if self.size < UDP_HEADER.size:
            raise SystemExit(f"load: --udp-size must be at least {UDP_HEADER.size}")

    async def open(self, flow: Flow, family: int) -> Flow:
        loop = asyncio.get_running_loop()
        local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        await loop.create_datagram_endpoint(lambda: flow, local_addr=local, family=family)
        flow.started = self.clock.now()
        return flow

    async def run(self, stop: asyncio.Event) -> None:
        if not self.host or (self.n <= 0 and self.new_every <= 0) or self.pps <= 0:
            return
        family, _, _, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        for i in range(self.n):
            self.flows.append(
                await self.open(Flow(i, self.size, self.clock, self.tl, True), family)
            )
        tasks = [asyncio.ensure_future(self.steady(stop, addr))]
        if self.new_every > 0:
            tasks.append(asyncio.ensure_future(self.fresh(stop, addr, family)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for f in self.flows + self.new_flows:
                if f.transport is not None:
                    f.transport.close()

    async def steady(self, stop: asyncio.Event, addr: tuple[Any, ...]) -> None:
        tick = max(1.0 / self.pps, 0.01)
        start = self.clock.now()
        last = math.ceil((self.end - start) * self.pps)  # packets due before the end
        while not stop.is_set():
            due = min(int((self.clock.now() - start) * self.pps) + 1, last)
            for flow in self.flows:
                for _ in range(min(due - flow.sent, int(self.pps))):  # catch up, a second at most
                    flow.send(addr)
            if due >= last and all(f.sent >= last for f in self.flows):
                await stop.wait()
                break
            next_due = start + due / self.pps
            await asyncio.sleep(max(0.001, min(tick, next_due - self.clock.now())))
        # replies to the last packets (and late ones) still count within the window
        await asyncio.sleep(self.late_window)

    async def fresh(self, stop: asyncio.Event, addr: tuple[Any, ...], family: int) -> None:
        """A short fresh flow every new_every seconds on the clock (they may overlap)."""
        running: list[asyncio.Future[None]] = []
        k = 1
        while k * self.new_every < self.end:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, k * self.new_every - self.clock.now()))
            if stop.is_set():
                break
            flow = Flow(999 + k, self.size, self.clock, self.tl, steady=False)
            self.new_flows.append(flow)
            running.append(asyncio.ensure_future(self.short_flow(flow, addr, family)))
            k += 1
        await asyncio.gather(*running)

    async def short_flow(self, flow: Flow, addr: tuple[Any, ...], family: int) -> None:
        await self.open(flow, family)
        try:
            for _ in range(NEW_FLOW_PACKETS):
                flow.send(addr)
                await asyncio.sleep(1.0 / self.pps)
            await asyncio.sleep(NEW_FLOW_WAIT_S)
        finally:
            flow.transport.close()
            flow.transport = None


# -- the run


def row(t: int, s: Second, clock: Clock, end: float) -> dict[str, Any]:
    lat = sorted(s.http_latencies)
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return {
        "t": t,
        "at": clock.epoch(float(t)),
        "span_s": round(min(1.0, end - t), 3),  # the last second may be cut short
        "http_sent": s.http_sent,
        "http_ok": s.http_ok,
        "http_failed": s.http_failed,
        "http_fail_reasons": dict(s.http_fail_reasons),
        "http_p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "http_p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "http_versions": dict(s.http_versions),
        "sched_lag_ms": round(s.sched_lag_ms, 2),
        "ws_open": s.ws_open,
        "ws_pongs": s.ws_pongs,
        "ws_drops": s.ws_drops,
        "ws_connect_failed": s.ws_connect_failed,
        "ws_versions": dict(s.ws_versions),
        "udp_sent": s.udp_sent,
        "udp_recv": s.udp_recv,
        "udp_flows_alive": len(s.udp_flows),
        "udp_versions": dict(s.udp_versions),
        "cpu_pct": s.cpu_pct,
    }


def report(
    args: argparse.Namespace,
    clock: Clock,
    tl: Timeline,
    http: HttpLoad,
    ws: WsLoad,
    udp: UdpLoad,
    stopped: float,
    stop_cause: str,
    cpu: tuple[float, float],
) -> dict[str, Any]:
    ended = clock.now()
    # seconds that saw load; later ones only drained
    n_rows = max(1, math.ceil(min(stopped, float(args.duration))))
    rows = [row(t, tl.at(t), clock, min(stopped, float(args.duration))) for t in range(n_rows)]
    all_lat = sorted(x for s in tl.seconds for x in s.http_latencies)
    ok = sum(s.http_ok for s in tl.seconds)
    failed = sum(s.http_failed for s in tl.seconds)
    reasons: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    for s in tl.seconds:
        reasons.update(s.http_fail_reasons)
        versions.update(s.http_versions)
    udp_sent = sum(f.sent for f in udp.flows)
    udp_recv = sum(f.received for f in udp.flows)
    p50, p99 = percentile(all_lat, 50), percentile(all_lat, 99)
    warm = int(math.ceil(float(args.warmup_s)))
    steady = sorted(x for s in tl.seconds[warm:] for x in s.http_latencies)
    p50w, p99w = percentile(steady, 50), percentile(steady, 99)
    cpu_s = cpu[0] + cpu[1]
    summary = {
        "elapsed_s": round(stopped, 3),
        "http_target_rps": http.rps,
        "http_sent": http.sent,
        "http_ok": ok,
        "http_failed": failed,
        "http_fail_reasons": dict(reasons),
        "http_retries": dict(http.retried),
        "http_versions": dict(versions),
        "http_sent_rps": round(http.sent / stopped, 1) if stopped else 0.0,
        "http_ok_rps": round(ok / stopped, 1) if stopped else 0.0,
        "http_p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "http_p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "http_p50_ms_after_warmup": None if p50w is None else round(p50w * 1000, 2),
        "http_p99_ms_after_warmup": None if p99w is None else round(p99w * 1000, 2),
        "http_max_sched_lag_ms": round(http.max_lag * 1000, 2),
        "ws_connections": len(ws.conns),
        "ws_drops": sum(1 for c in ws.conns if c.close_reason not in (None, "end")),
        "ws_connect_failures": dict(ws.connect_failures),
        "ws_pongs": sum(c.pongs for c in ws.conns),
        "udp_sent": udp_sent,
        "udp_recv": udp_recv,
        "udp_lost": udp_sent - udp_recv,
        "udp_sent_pps": round(udp_sent / stopped, 1) if stopped else 0.0,
        "udp_new_flows": len(udp.new_flows),
        "cpu_user_s": round(cpu[0], 2),
        "cpu_system_s": round(cpu[1], 2),
        "cpu_pct": round(100 * cpu_s / ended, 1) if ended else 0.0,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    return {
        "schema": SCHEMA,
        "clock": "epoch seconds: time.time() at start + time.monotonic() offsets",
        "started_at": clock.epoch(0.0),
        "stopped_at": clock.epoch(stopped),
        "ended_at": clock.epoch(ended),
        "stop_cause": stop_cause,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "runtime": {
            "python": sys.version.split()[0],
            "aiohttp": aiohttp.__version__,
            "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "cpus": os.cpu_count(),
        },
        "summary": summary,
        "timeline": rows,
        "ws_connections": ws.dump(),
        "udp_flows": [f.dump(udp.late_window) for f in udp.flows],
        "udp_new_flows": [f.dump(udp.late_window) for f in udp.new_flows],
        "writes_acked": http.acked,
    }


async def ticker(
    args: argparse.Namespace, clock: Clock, tl: Timeline, ws: WsLoad, stop: asyncio.Event
) -> str:
    """Once a second: sample what is open, CPU, and whether to stop."""
    stop_file = Path(args.stop_file) if args.stop_file else None
    cpu_before = time.process_time()
    t = 1
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, t - clock.now()))
        if stop.is_set():
            return "signal"
        second = tl.at(t - 1)
        second.ws_open = ws.open_count()
        cpu_now = time.process_time()
        second.cpu_pct = round(100 * (cpu_now - cpu_before), 1)
        cpu_before = cpu_now
        if t % 10 == 0:
            print(
                f"load: t={t}s http ok={second.http_ok} failed={second.http_failed} "
                f"ws_open={second.ws_open} udp_recv={second.udp_recv} cpu={second.cpu_pct}%",
                file=sys.stderr,
                flush=True,
            )
        if t >= args.duration:
            return "duration"
        if stop_file is not None and stop_file.exists():
            return "stop-file"
        t += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = Clock()
    cpu0 = os.times()
    tl = Timeline()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http, ws, udp = HttpLoad(args, clock, tl), WsLoad(args, clock, tl), UdpLoad(args, clock, tl)
    loads = [asyncio.ensure_future(x.run(stop)) for x in (http, ws, udp)]
    tick = asyncio.ensure_future(ticker(args, clock, tl, ws, stop))
    # a part that is switched off returns at once; one that fails stops the run
    stop_cause = ""
    waiting: set[asyncio.Future[Any]] = {tick, *loads}
    while not stop_cause:
        done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is tick:
                stop_cause = stop_cause or tick.result()
            elif task.exception() is not None:
                print(f"load: {task.exception()!r}", file=sys.stderr)
                stop_cause = "error"
    stopped = clock.now()
    stop.set()
    drain = float(args.http_timeout) + float(args.udp_late_window) + 10
    _, pending = await asyncio.wait([tick, *loads], timeout=drain)
    for task in pending:
        task.cancel()
    for task in loads:
        if task.done() and not task.cancelled() and task.exception() is not None:
            if stop_cause != "error":
                print(f"load: {task.exception()!r}", file=sys.stderr)
            stop_cause = "error"
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user, cpu1.system - cpu0.system)
    return report(args, clock, tl, http, ws, udp, stopped, stop_cause, cpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--base-url", required=True, help="e.g. https://127.0.0.1")
    p.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    p.add_argument("--ws-url", default="", help="e.g. wss://127.0.0.1/ws/ (none: no WS)")
    p.add_argument("--udp-host", default="", help="e.g. 127.0.0.1 (none: no UDP)")
    p.add_argument("--udp-port", type=int, default=3032)
    p.add_argument("--http-rps", type=float, default=500)
    p.add_argument("--http-conns", type=int, default=64, help="keep-alive connections")
    p.add_argument("--http-timeout", type=float, default=5.0)
    p.add_argument(
        "--http-tick-ms",
        type=float,
        default=5.0,
        help="scheduler tick: requests due within one go out together (latency counts from "
        "when each was due, so it includes up to one tick)",
    )
    p.add_argument(
        "--http-retries",
        type=int,
        default=0,
        help="retry a write (same id) when the server closed a reused connection",
    )
    p.add_argument("--ws", type=int, default=50, help="WebSocket connections")
    p.add_argument("--udp-flows", type=int, default=20)
    p.add_argument("--udp-pps", type=float, default=50, help="packets/s per flow")
    p.add_argument("--udp-size", type=int, default=172, help="payload bytes")
    p.add_argument("--udp-late-window", type=float, default=1.0, help="seconds")
    p.add_argument("--new-udp-flow-every", type=float, default=0, help="seconds (0: none)")
    p.add_argument("--duration", type=float, default=120, help="seconds, at most")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=0,
        help="whole seconds at the start left out of the *_after_warmup latencies",
    )
    p.add_argument("--stop-file", default="", help="stop early once this file exists")
    p.add_argument("--out", required=True, help="the JSON report")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 24 * 3600:
        p.error("--duration: 0 < seconds <= 86400")
    if not 0 <= args.warmup_s < args.duration:
        p.error("--warmup-s: 0 <= seconds < --duration")
    if args.http_rps < 0 or args.http_rps > 100_000:
        p.error("--http-rps: 0..100000")
    if args.stop_file and Path(args.stop_file).exists():
        p.error(f"--stop-file {args.stop_file} exists already; remove it first")
    return args


def write_atomically(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    doc = asyncio.run(run(args))
    write_atomically(out, doc)
    s = doc["summary"]
    print(
        f"load: {doc['stop_cause']} after {s['elapsed_s']}s: http ok={s['http_ok']} "
        f"failed={s['http_failed']} ({s['http_ok_rps']}/s ok of {s['http_target_rps']:g}/s, "
        f"p99 {s['http_p99_ms']} ms), ws {s['ws_connections']} conns {s['ws_drops']} drops, "
        f"udp sent={s['udp_sent']} lost={s['udp_lost']}, cpu {s['cpu_pct']}% -> {out}",
        file=sys.stderr,
    )
    return 1 if doc["stop_cause"] == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
