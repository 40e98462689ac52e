"""GET /system-health (JSON) and GET /metrics (Prometheus) on 127.0.0.1:6030 by default.

Bound to loopback, it also refuses peers that are not loopback: the colors' veths accept
packets for 127.0.0.0/8 (route_localnet, for RTP), so a bind alone is not the whole fence.
Binding another address (watchdog.api_bind) is the explicit choice to serve others."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from appliance.watchdog import metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def make_app(health: Callable[[], dict[str, Any]], *, loopback_only: bool) -> web.Application:
    @web.middleware
    async def loopback_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback_only and not is_loopback(request.remote or ""):
            raise web.HTTPForbidden(text="the watchdog API answers loopback clients only\n")
        return await handler(request)

    async def system_health(request: web.Request) -> web.Response:
        body = json.dumps(health(), indent=2, sort_keys=True) + "\n"
        return web.Response(text=body, content_type="application/json")

    async def prometheus(request: web.Request) -> web.Response:
        body = metrics.render(health()).encode()
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    app = web.Application(middlewares=[loopback_guard])
    app.router.add_get("/system-health", system_health)
    app.router.add_get("/metrics", prometheus)
    return app


async def serve(health: Callable[[], dict[str, Any]], bind: str, port: int) -> web.AppRunner:
    """Start the API; the caller keeps the runner and calls `cleanup()` at the end."""
    app = make_app(health, loopback_only=is_loopback(bind))
    # No access log: a scrape every few seconds would flood the journal.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, bind, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
