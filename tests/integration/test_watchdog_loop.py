"""The watchdog's loop in this process against real processes on loopback: a fake backend
(aiohttp, HTTP /api and a WebSocket endpoint) that is SIGSTOPped to hang it and SIGKILLed to
crash it; a small Services fake that records calls and restarts that backend; a fake
Telegram API, a webhook receiver that is down at first, and a fake SMTP server.

Only processes started here are signalled, by PID."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appliance.services import UnitState
from appliance.watchdog import daemon
from appliance.watchdog.alerts import Alert, Severity
from appliance.watchdog.channels import Alerter, Channel, Email, Telegram, Webhook
from appliance.watchdog.checks import Targets
from appliance.watchdog.monitor import Monitor
from appliance.watchdog.settings import Settings
from tests.integration.procs import free_port, port_open, wait_for

pytestmark = pytest.mark.integration

UNIT = "aipbx-backend@blue.service"
TOKEN = "123456:SECRET-bot-token"

BACKEND = r"""
import asyncio, sys
from aiohttp import web

async def api(request):
    return web.json_response({"ok": True})

async def socketio(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str('0{"sid":"fake"}')
    async for _ in ws:
        pass
    return ws

async def main():
    for port, path, handler in ((int(sys.argv[1]), "/api", api),
                                (int(sys.argv[2]), "/socket.io/", socketio)):
        app = web.Application()
        app.router.add_get(path, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


class FakeBackend:
    def __init__(self, http_port: int, ws_port: int) -> None:
        self.http_port = http_port
        self.ws_port = ws_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-c", BACKEND, str(self.http_port), str(self.ws_port)]
        self.proc = subprocess.Popen(argv)
        wait_for(lambda: port_open(self.http_port) and port_open(self.ws_port), what="backend")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class FakeServices:
    """Services for one fake backend unit: restart kills it (hung or not) and starts it."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.calls: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()

    def _record(self, verb: str, unit: str) -> None:
        with self.lock:
            self.calls.append((verb, unit, time.monotonic()))

    def restarts(self) -> list[float]:
        with self.lock:
            return [t for verb, _, t in self.calls if verb == "restart"]

    def state(self, unit: str) -> UnitState:
        return UnitState(unit, "active", "running", "enabled", "", 0)

    def is_active(self, unit: str) -> bool:
        return True

    def start(self, unit: str) -> None:
        self._record("start", unit)

    def stop(self, unit: str) -> None:
        self._record("stop", unit)

    def restart(self, unit: str) -> None:
        self._record("restart", unit)
        assert unit == UNIT
        self.backend.kill()
        self.backend.start()

    def reload(self, unit: str) -> None:
        self._record("reload", unit)

    def enable(self, unit: str, *, now: bool = False) -> None:
        self._record("enable", unit)

    def disable(self, unit: str, *, now: bool = False) -> None:
        self._record("disable", unit)

    def daemon_reload(self) -> None:
        pass

    def reset_failed(self, unit: str) -> None:
        self._record("reset_failed", unit)

    def kill(self, unit: str, signal: str) -> None:
        self._record(f"kill {signal}", unit)


class Pings(daemon.Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[float, str]] = []

    def notify(self, msg: str) -> None:
        self.got.append((time.monotonic(), msg))


class Receiver:
    """A fake Telegram bot API and webhook receiver on loopback that records what arrives."""

    def __init__(self) -> None:
        self.telegram: list[dict[str, Any]] = []
        self.webhook: list[dict[str, Any]] = []
        self.paths: list[str] = []

    async def _telegram(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.telegram.append(await request.json())
        return web.json_response({"ok": True, "result": {"message_id": len(self.telegram)}})

    async def _webhook(self, request: web.Request) -> web.Response:
        self.webhook.append(await request.json())
        return web.json_response({"ok": True})

    def telegram_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bot{token}/sendMessage", self._telegram)
        return app

    def webhook_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self._webhook)
        return app


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def until(pred: Any, timeout: float, what: str) -> float:
    """Wait (without blocking the loop) until pred() is true; returns when it became so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def severities_by_incident(alerts: list[dict[str, Any]], key: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in alerts:
        out.setdefault(a["incident"], []).append(a[key])
    return out


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    b = FakeBackend(free_port(), free_port())
    b.start()
    yield b
    if b.proc is not None and b.proc.poll() is None:
        b.signal(signal.SIGCONT)
    b.kill()


SETTINGS = Settings(
    interval=0.2,
    timeout=0.5,
    slow=0.4,
    failures_to_open=2,
    cooldown=1.0,
    backoff_initial=0.2,
    backoff_max=1.0,
    restart_budget=5,
    restart_window=60,
    # At once: a crash is restarted (and the breaker probes it) within half a second, too
    # short for any later CRITICAL, and each incident here must alert.
    critical_after=0.0,
)


def targets(b: FakeBackend) -> Targets:
    return Targets(
        color="blue",
        backend_host="127.0.0.1",
        backend_unit=UNIT,
        http_port=b.http_port,
        ws_port=b.ws_port,
        nginx_port=free_port(),
        postgres_port=free_port(),
        pgbouncer_port=free_port(),
        pgbouncer_set_up=False,
        db_user="u",
        db_name="d",
        disk_paths=(Path("/"),),
        cert=None,
    )


def test_hang_and_crash_are_restarted_and_alerted_once_per_incident(
    backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    tg_port, hook_port = free_port(), free_port()
    settings = Settings(**{**SETTINGS.__dict__, "api_port": free_port()})
    services = FakeServices(backend)
    receiver = Receiver()
    t = targets(backend)

    async def scenario() -> None:
        tg = await serve(receiver.telegram_app(), tg_port)
        channels = [
            Channel("telegram", Telegram(f"http://127.0.0.1:{tg_port}", TOKEN, "42"), ""),
            # the webhook's port is closed until later: its alerts must wait, not vanish
            Channel("webhook", Webhook(f"http://127.0.0.1:{hook_port}/hook"), ""),
            Channel("email", None, "alerts.smtp_host not set"),
        ]
        alerter = Alerter(
            channels,
            capacity=50,
            rate_per_min=600,
            timeout=1.0,
            backoff_initial=0.2,
            backoff_max=1.0,
            clock=time.monotonic,
            host="test-host",
        )
        monitor = Monitor(
            settings, lambda: t, services, alerter, enabled=("backend_http", "backend_ws", "disk")
        )
        pings = Pings()
        stop = asyncio.Event()

        def health() -> dict[str, Any]:
            return {**monitor.snapshot(), "alerts": alerter.snapshot()}

        run = asyncio.create_task(
            daemon.run(monitor, settings, pings, stop, health=health, alerter=alerter)
        )
        try:
            await until(
                lambda: monitor.snapshot()["checks"]["backend_ws"]["state"] == "ok", 5, "ws ok"
            )
            assert ("READY=1" in [m for _, m in pings.got]) and monitor.snapshot()["status"] == "ok"

            # -- hang: SIGSTOP. The HTTP check times out, the breaker opens, one restart.
            hung_at = time.monotonic()
            backend.signal(signal.SIGSTOP)
            restarted_at = await until(lambda: services.restarts(), 5, "a restart")
            detection = restarted_at - hung_at
            budget = settings.failures_to_open * (settings.interval + settings.timeout)
            assert detection <= budget + settings.interval + 0.5, detection
            await until(lambda: len(receiver.telegram) >= 2, 10, "CRITICAL and INFO on Telegram")
            assert len(services.restarts()) == 1  # the HTTP and WS breakers share one unit

            # the webhook was down all along; the checks went on regardless
            snap = alerter.snapshot()["webhook"]
            assert snap["failed"] >= 1 and snap["queued"] == 2 and snap["sent"] == 0
            rounds, since = monitor.rounds, time.monotonic()
            await asyncio.sleep(1.0)
            assert monitor.rounds - rounds >= 0.6 / settings.interval, monitor.rounds - rounds
            # and systemd was pinged all along, at least every round
            times = [ts for ts, msg in pings.got if msg == "WATCHDOG=1" and ts > since]
            assert max(b - a for a, b in itertools.pairwise(times)) < 0.5
            hook = await serve(receiver.webhook_app(), hook_port)
            await until(lambda: len(receiver.webhook) >= 2, 10, "webhook delivery after it is back")

            # -- crash: SIGKILL. Connection refused, restart, a second incident.
            backend.kill()
            await until(lambda: len(services.restarts()) == 2, 5, "second restart")
            await until(lambda: len(receiver.telegram) >= 4, 10, "second incident alerts")
            await until(lambda: len(receiver.webhook) >= 4, 10, "second incident on webhook")
            # the receivers count a message when it arrives, the watchdog once it is answered
            await until(
                lambda: all(alerter.snapshot()[c]["sent"] == 4 for c in ("telegram", "webhook")),
                5,
                "the last answers to reach the watchdog",
            )

            # -- the API, on its free port
            async with aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{settings.api_port}"
                async with s.get(f"{base}/system-health") as r:
                    assert r.status == 200
                    h = await r.json()
                async with s.get(f"{base}/metrics") as r:
                    assert r.status == 200
                    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    metrics = await r.text()
            await hook.cleanup()
        finally:
            stop.set()
            await run
            await tg.cleanup()

        assert h["status"] == "ok"
        assert h["checks"]["backend_http"]["state"] == "ok"
        assert h["checks"]["backend_http"]["breaker"] == "closed"
        assert h["checks"]["disk"]["state"] in ("ok", "warning", "critical")
        assert h["restarts"][UNIT]["total"] == 2
        assert h["alerts"]["telegram"] == {
            "enabled": True,
            "reason": "",
            "queued": 0,
            "sent": 4,
            "failed": 0,
            "dropped": 0,
            "last_error": "",
        }
        assert h["alerts"]["webhook"]["sent"] == 4 and h["alerts"]["webhook"]["failed"] >= 1
        assert h["alerts"]["email"]["enabled"] is False
        assert f'aipbx_restarts_total{{unit="{UNIT}"}} 2' in metrics
        assert 'aipbx_alerts_sent_total{channel="webhook"} 4' in metrics
        assert 'aipbx_check_up{check="backend_http"} 1' in metrics
        assert 'aipbx_breaker_state{check="backend_ws",state="closed"} 1' in metrics

    asyncio.run(scenario())

    # one CRITICAL then one INFO per incident of the unit (its HTTP and WebSocket checks
    # are one incident), on both channels, nothing else
    hook = severities_by_incident(receiver.webhook, "severity")
    assert hook == {
        "backend_http#1": ["CRITICAL", "INFO"],
        "backend_http#2": ["CRITICAL", "INFO"],
    }
    texts = [m["text"] for m in receiver.telegram]
    by_incident: dict[str, list[str]] = {}
    for text in texts:
        incident = text.rsplit("incident ", 1)[1]
        by_incident.setdefault(incident, []).append(text.split()[1])
    assert by_incident == hook
    assert all(m["chat_id"] == "42" for m in receiver.telegram)
    assert set(receiver.paths) == {f"/bot{TOKEN}/sendMessage"}
    assert {(w["host"], w["source"]) for w in receiver.webhook} == {("test-host", "aipbx-watchdog")}
    # the journal got the restarts as structured entries, and never the bot token
    restarts = [r for r in caplog.records if getattr(r, "fields", {}).get("action") == "restart"]
    assert restarts and all(r.fields["unit"] == UNIT for r in restarts)  # type: ignore[attr-defined]
    assert TOKEN not in caplog.text


async def smtp_server(port: int, got: list[bytes], auth: list[bytes]) -> asyncio.Server:
    """Just enough SMTP for smtplib: EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake ESMTP\r\n")
        body: list[bytes] = []
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    got.append(b"".join(body))
                    writer.write(b"250 queued\r\n")
                else:
                    body.append(line)
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-fake\r\n250 AUTH PLAIN\r\n")
            elif verb == b"AUTH":
                auth.append(base64.b64decode(line.split()[2]))
                writer.write(b"235 ok\r\n")
            elif verb == b"DATA":
                in_data = True
                writer.write(b"354 go on\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", port)


def test_email_alert_is_delivered_over_smtp(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    got: list[bytes] = []
    auth: list[bytes] = []
    password = "smtp-PASSWORD-never-logged"
    mail = Email("127.0.0.1", port, False, "pbx", password, "pbx@example.test", ("o@example.test",))

    async def scenario() -> None:
        server = await smtp_server(port, got, auth)
        alerter = Alerter(
            [Channel("email", mail, "")],
            capacity=10,
            rate_per_min=60,
            timeout=5,
            backoff_initial=0.1,
            backoff_max=0.5,
            clock=time.monotonic,
            host="test-host",
        )
        alerter.start()
        alerter.publish(Alert(Severity.CRITICAL, "nginx", "nginx is down for 61 s", "nginx#1", 0))
        try:
            await until(lambda: got, 10, "the mail")
        finally:
            await alerter.close()
            server.close()

    asyncio.run(scenario())
    text = got[0].decode()
    assert "Subject: [aipbx test-host] CRITICAL: nginx is down for 61 s" in text
    assert "To: o@example.test" in text
    assert auth == [f"\0pbx\0{password}".encode()]
    assert password not in caplog.text


def test_api_refuses_nothing_on_loopback_and_answers_json() -> None:
    from appliance.watchdog import api

    port = free_port()

    async def scenario() -> tuple[int, dict[str, Any], int]:
        health = {"status": "ok", "checks": {}, "restarts": {}, "alerts": {}}
        runner = await api.serve(lambda: health, "127.0.0.1", port)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/system-health") as r:
                    body = json.loads(await r.text())
                    status = r.status
                async with s.get(f"http://127.0.0.1:{port}/nope") as r:
                    missing = r.status
        finally:
            await runner.cleanup()
        return status, body, missing

    status, body, missing = asyncio.run(scenario())
    assert status == 200 and body["status"] == "ok" and missing == 404
