"""Network probes on asyncio streams, each bounded by the caller's timeout: a TCP connect, an
HTTP status line, a WebSocket handshake and a PostgreSQL startup packet (answered with an
authentication request by PostgreSQL and PgBouncer alike: no driver, no password). Each
returns what it saw, or raises OSError/ProbeError."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

PG_PROTOCOL_3 = 196608
PG_AUTH_REQUEST = b"R"
PG_ERROR = b"E"


class ProbeError(Exception):
    """The peer answered, but not as a healthy one does."""


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


def _close(writer: asyncio.StreamWriter) -> None:
    # Not awaited: a hung peer must not keep the probe (and its timeout) waiting.
    writer.close()


async def tcp_connect(host: str, port: int) -> str:
    _, writer = await _open(host, port)
    _close(writer)
    return "connected"


async def http_status(host: str, port: int, request: bytes) -> int:
    """Send a raw HTTP/1.1 request and return the status code of the answer."""
    reader, writer = await _open(host, port)
    try:
        writer.write(request)
        line = await reader.readline()
    finally:
        _close(writer)
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ProbeError(f"not an HTTP answer: {line[:60]!r}" if line else "closed without answer")
    return int(parts[1])


def get_request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: aipbx-watchdog\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode()


def websocket_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: aipbx-watchdog\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def pg_startup_packet(user: str, database: str) -> bytes:
    params = b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database), ("application_name", "watchdog"))
    )
    body = struct.pack("!I", PG_PROTOCOL_3) + params + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def pg_error_message(payload: bytes) -> str:
    """The M (message) field of an ErrorResponse body."""
    for field in payload.split(b"\0"):
        if field[:1] == b"M":
            return field[1:].decode(errors="replace")
    return "error without a message"


async def pg_startup(host: str, port: int, user: str, database: str) -> str:
    """Healthy when the server asks us to authenticate. We then hang up, which both
    PostgreSQL and PgBouncer take silently (as when psql goes to prompt for a password)."""
    reader, writer = await _open(host, port)
    try:
        writer.write(pg_startup_packet(user, database))
        kind = await reader.readexactly(1)
        if kind == PG_AUTH_REQUEST:
            return "authentication requested"
        if kind == PG_ERROR:
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            payload = await reader.readexactly(min(max(length - 4, 0), 4096))
            raise ProbeError(pg_error_message(payload))
        raise ProbeError(f"unexpected answer {kind!r}")
    finally:
        _close(writer)
