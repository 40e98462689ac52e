"""Health probes of a color, from the host: HTTP (healthy when the answer is < 500) and a
WebSocket handshake (healthy on 101). Stdlib only; each with a timeout."""

from __future__ import annotations

import base64
import http.client
import os
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    ok: bool
    latency_s: float
    detail: str  # status or error, for the journal and the operator


def http_probe(host: str, port: int, path: str, timeout: float = 2.0) -> Probe:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "aipbx-health"})
        resp = conn.getresponse()
        resp.read()
        return Probe(resp.status < 500, time.monotonic() - t0, f"HTTP {resp.status}")
    except (OSError, http.client.HTTPException) as e:
        return Probe(False, time.monotonic() - t0, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def ws_probe(host: str, port: int, path: str, timeout: float = 2.0) -> Probe:
    t0 = time.monotonic()
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(request.encode())
            head = s.recv(1024).split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError as e:
        return Probe(False, time.monotonic() - t0, f"{type(e).__name__}: {e}")
    ok = head.startswith("HTTP/1.1 101")
    return Probe(ok, time.monotonic() - t0, head or "no answer")


def wait_healthy(
    host: str,
    http_port: int,
    ws_port: int,
    http_path: str,
    ws_path: str,
    timeout: float,
    *,
    interval: float = 0.25,
    alive: object = None,
) -> tuple[bool, str]:
    """Poll until both probes pass or `timeout` passes; `alive()` (if given) returning False
    stops early (the unit died). Returns (healthy, last detail)."""
    deadline = time.monotonic() + timeout
    detail = "not probed"
    while time.monotonic() < deadline:
        h = http_probe(host, http_port, http_path)
        w = ws_probe(host, ws_port, ws_path) if h.ok else None
        if h.ok and w is not None and w.ok:
            return True, f"{h.detail}, websocket {w.detail}"
        detail = h.detail if not h.ok else f"websocket: {w.detail if w else '?'}"
        if callable(alive) and not alive():
            return False, f"the unit stopped ({detail})"
        time.sleep(interval)
    return False, f"not healthy after {timeout:.0f}s ({detail})"
