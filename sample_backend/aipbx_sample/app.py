"""The sample backend's aiohttp apps. gunicorn serves `app_factory()` on $PORT; the same
process serves WebSocket on 3033 (a second site, like the real backend's hard-coded port) and
the UDP echo on $UDP_SERVER_PORT. On SIGTERM gunicorn's aiohttp worker stops accepting,
lets in-flight requests finish (graceful_timeout), then this closes WebSockets, UDP and the
database pool."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import weakref
from typing import Any, cast

from aiohttp import WSMsgType, web

from aipbx_sample import db
from aipbx_sample.settings import Settings, settings_from_env

log = logging.getLogger("gunicorn.error")

# gunicorn halts (instead of respawning the worker forever) when a worker exits with this
BOOT_ERROR = 3


class UdpEcho(asyncio.DatagramProtocol):
    """Answers each datagram to its own source address:port, like the real backend's RTP."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.prefix + data, addr)


class Sample:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.pool: Any = None
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.ws_runner: web.AppRunner | None = None
        self.udp: asyncio.DatagramTransport | None = None

    # -- answers

    def answer(self, body: dict[str, Any], status: int = 200) -> web.Response:
        return web.json_response({**body, "version": self.settings.version}, status=status)

    async def version_header(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Aipbx-Version"] = self.settings.version

    async def health(self, request: web.Request) -> web.Response:
        up = time.monotonic() - self.started
        fail = self.settings.fail
        if fail.hang_after_s is not None and up >= fail.hang_after_s:
            await asyncio.Event().wait()  # alive, never answering: a hung backend
        if fail.health_after_s is not None and up >= fail.health_after_s:
            return self.answer({"ok": False, "color": self.settings.color}, status=500)
        return self.answer({"ok": True, "color": self.settings.color})

    async def write(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self.answer({"error": "body must be JSON"}, status=400)
        row_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(row_id, str) or not 0 < len(row_id) <= 200:
            return self.answer({"error": 'want {"id": "<1..200 characters>"}'}, status=400)
        if self.pool is None:
            return self.answer({"error": "no database configured"}, status=503)
        s = self.settings
        try:
            stored = await db.insert(self.pool, row_id, s.version, s.color, s.write_delay_s)
        except db.DB_ERRORS as e:
            log.warning("write %s failed: %s", row_id, e)
            return self.answer({"error": "database unavailable"}, status=503)
        # answered only after COMMIT: a 200 is a write that survives anything after it
        return self.answer({"id": row_id, "stored_version": stored})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        if not ws.can_prepare(request).ok:
            return self.answer({"error": "WebSocket only on this port"}, status=400)
        await ws.prepare(request)
        self.sockets.add(ws)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and msg.data == "ping":
                await ws.send_str(f"pong {self.settings.version}")
        return ws

    # -- the WebSocket and UDP listeners live and die with the HTTP app

    async def start_listeners(self, app: web.Application) -> None:
        s = self.settings
        ws_app = web.Application()
        ws_app.router.add_get("/{tail:.*}", self.websocket)
        ws_app.on_response_prepare.append(self.version_header)
        ws_app.on_shutdown.append(self.close_websockets)
        self.ws_runner = web.AppRunner(ws_app, handle_signals=False)
        await self.ws_runner.setup()
        loop = asyncio.get_running_loop()
        try:
            await web.TCPSite(self.ws_runner, "0.0.0.0", s.ws_port, shutdown_timeout=5).start()
            self.udp, _ = await loop.create_datagram_endpoint(
                lambda: UdpEcho(f"{s.version} ".encode()), local_addr=("0.0.0.0", s.udp_port)
            )
        except OSError as e:
            log.error("cannot listen on WebSocket %d / UDP %d: %s", s.ws_port, s.udp_port, e)
            raise SystemExit(BOOT_ERROR) from e
        log.info(
            "aipbx-sample %s (%s): WebSocket on %d, UDP on %d",
            s.version,
            s.color,
            s.ws_port,
            s.udp_port,
        )

    async def close_websockets(self, app: web.Application) -> None:
        for ws in list(self.sockets):
            await ws.close(code=1001, message=b"server shutdown")

    async def stop_listeners(self, app: web.Application) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.ws_runner is not None:
            await self.ws_runner.cleanup()

    async def close_pool(self, app: web.Application) -> None:
        if self.pool is not None:
            await self.pool.close()

    def http_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api", self.health)
        app.router.add_post("/api/writes", self.write)
        app.on_response_prepare.append(self.version_header)
        app.on_startup.append(self.start_listeners)
        app.on_shutdown.append(self.stop_listeners)
        # after in-flight requests finished: their COMMITs still need the pool
        app.on_cleanup.append(self.close_pool)
        return app


async def app_factory() -> web.Application:
    """gunicorn's entry point: `gunicorn aipbx_sample.app:app_factory`."""
    try:
        settings = settings_from_env(os.environ)
    except ValueError as e:
        log.error("bad setting: %s", e)
        raise SystemExit(BOOT_ERROR) from e
    if settings.fail.start:
        log.error("SAMPLE_FAIL=start: failing at start as asked")
        raise SystemExit(BOOT_ERROR)
    sample = Sample(settings)
    if settings.db is not None:
        try:
            sample.pool = await db.open_pool(settings.db, settings.db_wait_s)
        except db.DB_ERRORS as e:
            log.error("database %s:%d unreachable: %s", settings.db.host, settings.db.port, e)
            raise SystemExit(BOOT_ERROR) from e
    return sample.http_app()
