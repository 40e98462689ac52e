"""GET /system-health (JSON) and GET /metrics (Prometheus) on 127.0.0.1:6030 by default.

A few lines of HTTP/1.1 on asyncio's own server rather than aiohttp: two read-only GETs,
answered and closed, and the watchdog stays under its memory budget (aiohttp's server
costs about 9 MB of RSS).

Bound to loopback, it also refuses peers that are not loopback: the colors' veths accept
packets for 127.0.0.0/8 (route_localnet, for RTP), so a bind alone is not the whole fence.
Binding another address (watchdog.api_bind) is the explicit choice to serve others."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import Callable
from typing import Any

from appliance.watchdog import metrics

READ_TIMEOUT_S = 5.0
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


class Server:
    def __init__(self, server: asyncio.AbstractServer) -> None:
        self._server = server

    async def cleanup(self) -> None:
        self._server.close()
        await self._server.wait_closed()


async def serve(health: Callable[[], dict[str, Any]], bind: str, port: int) -> Server:
    """Start the API; the caller keeps the server and calls `cleanup()` at the end."""
    loopback_only = is_loopback(bind)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str((writer.get_extra_info("peername") or ("",))[0])
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                status, ctype, body = respond(
                    parts[0], parts[1], peer, health, loopback_only=loopback_only
                )
            head_only = bool(parts) and parts[0] == "HEAD"
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if head_only else body)
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, bind, port, reuse_address=True, limit=MAX_HEAD)
    return Server(server)
