"""GET /system-health (JSON) and GET /metrics (Prometheus) on 127.0.0.1:6030 by default.

A few lines of HTTP/1.1 on asyncio's own server rather than aiohttp: two read-only GETs,
answered and closed, and the watchdog stays under its memory budget (aiohttp's server
costs about 9 MB of RSS).

Bound to loopback, it also refuses peers that are not loopback: the colors' veths accept
packets for 127.0.0.0/8 (route_localnet, for RTP), so a bind alone is not the whole fence.
Binding another address (watchdog.api_bind) is the explicit choice to serve others.

Any local user can connect, so the API must never eat the descriptors the checks need:
at most MAX_CONNECTIONS at a time (one more is closed at once, before anything is read),
each with a deadline for the whole exchange (a client that sends its request slowly, or
never reads the answer, is cut off), and one request per connection (no keep-alive)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from appliance.watchdog import metrics

MAX_CONNECTIONS = 16
HEAD_TIMEOUT_S = 2.0  # the request head must have arrived by then
DEADLINE_S = 5.0  # the whole exchange, answer taken included
MAX_HEAD = 8192


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def respond(
    method: str,
    path: str,
    peer: str,
    health: Callable[[], dict[str, Any]],
    *,
    loopback_only: bool,
) -> tuple[int, str, bytes]:
    """Pure: (status, content type, body) for one request."""
    if loopback_only and not is_loopback(peer):
        return 403, "text/plain", b"the watchdog API answers loopback clients only\n"
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"only GET\n"
    route = path.split("?", 1)[0]
    if route == "/system-health":
        body = json.dumps(health(), indent=2, sort_keys=True) + "\n"
        return 200, "application/json", body.encode()
    if route == "/metrics":
        return 200, metrics.CONTENT_TYPE, metrics.render(health()).encode()
    return 404, "text/plain", b"not found: /system-health or /metrics\n"


_REASONS = {
    200: "OK",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
}


def _identity(fd: int) -> tuple[int, int] | None:
    """Which open file `fd` is (device, inode), or None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def accepting(fd: int) -> bool:
    """Whether the socket at `fd` is in the listen state (SO_ACCEPTCONN): a listener that
    was shut down keeps its descriptor and inode but accepts nothing. No descriptor is
    made (the socket object only borrows `fd`)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False
    finally:
        sock.detach()


class Server:
    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        fds = [s.fileno() for s in server.sockets]
        self._listeners = [(fd, _identity(fd)) for fd in fds]

    def listening(self) -> bool:
        """Whether each socket it listened on is still open at its descriptor. uvloop
        closes a server's listening socket for good when accept() fails with EMFILE (no
        descriptor left) and still says is_serving(): the daemon asks this every few
        seconds and serves again. One fstat and one SO_ACCEPTCONN per socket (a closed
        descriptor, a listener no longer listening, or one
        reused for another file, is not the same inode): reading /proc/net/tcp instead
        walks the kernel's whole TCP hash table, ~2 ms of system CPU a call."""
        # No socket at all (uvloop had closed it before this object looked): not serving.
        return bool(self._listeners) and all(
            ident is not None and _identity(fd) == ident and accepting(fd)
            for fd, ident in self._listeners
        )

    async def cleanup(self) -> None:
        self._server.close()
        await self._server.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    health: Callable[[], dict[str, Any]],
    loopback_only: bool,
) -> None:
    peer = str((writer.get_extra_info("peername") or ("",))[0])
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3:
        status, ctype, body = 400, "text/plain", b"bad request\n"
    else:
        status, ctype, body = respond(parts[0], parts[1], peer, health, loopback_only=loopback_only)
    head_only = bool(parts) and parts[0] == "HEAD"
    writer.write(
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + (b"" if head_only else body)
    )
    await writer.drain()


async def serve(health: Callable[[], dict[str, Any]], bind: str, port: int) -> Server:
    """Start the API; the caller keeps the server and calls `cleanup()` at the end."""
    loopback_only = is_loopback(bind)
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= MAX_CONNECTIONS:
            writer.transport.abort()  # its descriptor is freed now, not after a timeout
            return
        active += 1
        done = False
        try:
            await asyncio.wait_for(_exchange(reader, writer, health, loopback_only), DEADLINE_S)
            done = True
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        finally:
            active -= 1
            if done:
                writer.close()  # the answer is written out: a plain close
            else:
                writer.transport.abort()  # never wait for a client that does not read

    server = await asyncio.start_server(handle, bind, port, reuse_address=True, limit=MAX_HEAD)
    return Server(server)
