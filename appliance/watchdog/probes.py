"""Network probes on asyncio streams, each bounded by the caller's timeout: a TCP connect, an
HTTP status line, a WebSocket handshake and a PostgreSQL startup packet (answered with an
authentication request by PostgreSQL and PgBouncer alike: no driver, no password). Each
returns what it saw, or raises OSError/ProbeError. A connect alone proves little: the
kernel completes it for a process that is stopped; the answer proves the process runs."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import socket
import struct

PG_PROTOCOL_3 = 196608
PG_AUTH_REQUEST = b"R"
PG_ERROR = b"E"


class ProbeError(Exception):
    """The peer answered, but not as a healthy one does."""


class ProbeBusy(ProbeError):
    """The peer answers but turns new clients away because it is full (PostgreSQL's
    too_many_connections, PgBouncer's max_client_conn): it serves the clients it has, a
    restart would not help, and anyone who can open connections could cause it."""


# PostgreSQL's SQLSTATE too_many_connections, and what PgBouncer says at max_client_conn.
PG_TOO_MANY = "53300"
BOUNCER_FULL = "no more connections allowed"


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


def _close(writer: asyncio.StreamWriter) -> None:
    # Not awaited: a hung peer must not keep the probe (and its timeout) waiting.
    writer.close()


async def tcp_connect(host: str, port: int) -> str:
    _, writer = await _open(host, port)
    _close(writer)
    return "connected"


def address_on_host(addr: str) -> bool:
    """Whether `addr` is one of this host's addresses: a bind to it works (no packet is
    sent). Other errors (EMFILE...) are raised."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


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


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def get_request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {_authority(host, port)}\r\nUser-Agent: aipbx-watchdog\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode()


def websocket_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {_authority(host, port)}\r\n"
        "User-Agent: aipbx-watchdog\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def pg_startup_packet(user: str, database: str) -> bytes:
    params = b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database), ("application_name", "watchdog"))
    )
    body = struct.pack("!I", PG_PROTOCOL_3) + params + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def pg_error_fields(payload: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse body by their one-letter code (C: SQLSTATE, M...)."""
    return {
        f[:1].decode(errors="replace"): f[1:].decode(errors="replace")
        for f in payload.split(b"\0")
        if f
    }


def pg_error_message(payload: bytes) -> str:
    """The M (message) field of an ErrorResponse body."""
    return pg_error_fields(payload).get("M", "error without a message")


def pg_error(payload: bytes) -> ProbeError:
    """What an ErrorResponse to the startup packet means: full (ProbeBusy) or not well."""
    fields = pg_error_fields(payload)
    message = fields.get("M", "error without a message")
    if fields.get("C") == PG_TOO_MANY or BOUNCER_FULL in message:
        return ProbeBusy(message)
    return ProbeError(message)


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
            raise pg_error(payload)
        raise ProbeError(f"unexpected answer {kind!r}")
    finally:
        _close(writer)
