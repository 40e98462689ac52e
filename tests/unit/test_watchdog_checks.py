"""How answers are judged, the PostgreSQL startup packet, the settings, and one Monitor
driven round by round with a fake clock, scripted check results and a fake Services that
records what it was asked to do."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.services import UnitState
from appliance.watchdog import probes
from appliance.watchdog.alerts import Alert, Severity
from appliance.watchdog.checks import (
    Targets,
    cert_level,
    disk_level,
    judge_answer,
    target_of,
    unit_of,
)
from appliance.watchdog.model import Result, Status, worst
from appliance.watchdog.monitor import Monitor
from appliance.watchdog.settings import Settings, from_config, seconds


def test_settings_defaults_match_the_config_defaults() -> None:
    assert from_config(config.Watchdog()) == Settings()
    assert seconds("200ms") == 0.2 and seconds("2s") == 2 and seconds("5m") == 300
    text = '[watchdog]\ninterval = "200ms"\ntimeout = "300ms"\nslow_threshold = "150ms"\n'
    s = from_config(config.parse(text).watchdog)
    # the timeout is capped at the interval: a round never takes longer than the interval
    assert (s.interval, s.timeout, s.slow) == (0.2, 0.2, 0.15)


def test_config_refuses_inconsistent_thresholds() -> None:
    with pytest.raises(ConfigError) as e:
        config.parse('[watchdog]\nslow_threshold = "3s"\ndisk_crit_pct = 20\ninterval = "0ms"\n')
    msg = e.value.message
    assert "aipbx.toml:2: watchdog.slow_threshold must be shorter than watchdog.timeout" in msg
    assert "aipbx.toml:3: watchdog.disk_crit_pct must be below disk_warn_pct" in msg
    assert "aipbx.toml:4: watchdog.interval must be longer than 0" in msg
    with pytest.raises(ConfigError) as e:
        config.parse('[watchdog]\napi_bind = ""\n[alerts]\nwebhook_url = "ftp://x"\n')
    assert "watchdog.api_bind" in e.value.message and "alerts.webhook_url" in e.value.message


def test_slow_answers_are_warnings() -> None:
    assert judge_answer(0.2, 1.0, "HTTP 200").status is Status.OK
    r = judge_answer(1.5, 1.0, "HTTP 200")
    assert r.status is Status.WARNING and r.error == "slow: answered in 1.50 s (over 1 s)"


def test_disk_and_cert_levels() -> None:
    assert [disk_level(p, 10, 5) for p in (50, 10, 9.9, 5, 4.9)] == [
        Status.OK,
        Status.OK,
        Status.WARNING,
        Status.WARNING,
        Status.CRITICAL,
    ]
    assert [cert_level(d, 14, 3) for d in (90, 15, 14, 4, 3, -1)] == [
        Status.OK,
        Status.OK,
        Status.WARNING,
        Status.WARNING,
        Status.CRITICAL,
        Status.CRITICAL,
    ]


def test_overall_status_is_the_worst() -> None:
    assert worst([Status.OK, Status.IDLE]) is Status.OK
    assert worst([Status.IDLE]) is Status.IDLE
    assert worst([Status.OK, Status.WARNING, Status.CRITICAL]) is Status.CRITICAL


def test_pg_startup_packet_is_protocol_3() -> None:
    pkt = probes.pg_startup_packet("aipbx_user", "aipbx_production")
    (length, proto) = struct.unpack("!II", pkt[:8])
    assert length == len(pkt) and proto == 196608
    assert pkt[8:].split(b"\0")[:4] == [b"user", b"aipbx_user", b"database", b"aipbx_production"]
    assert pkt.endswith(b"\0\0")
    body = b"SFATAL\0C57P03\0Mthe database system is starting up\0\0"
    assert probes.pg_error_message(body) == "the database system is starting up"


def targets(color: str | None = "blue") -> Targets:
    return Targets(
        color=color,
        backend_host="10.203.0.2",
        backend_unit=f"aipbx-backend@{color}.service",
        http_port=5005,
        ws_port=3033,
        nginx_port=443,
        postgres_port=5432,
        pgbouncer_port=6432,
        pgbouncer_set_up=True,
        db_user="u",
        db_name="d",
        disk_paths=(Path("/"),),
        cert=None,
    )


def test_units_and_targets_of_checks() -> None:
    t = targets()
    assert unit_of("backend_http", t) == unit_of("backend_ws", t) == "aipbx-backend@blue.service"
    assert unit_of("nginx", t) == "nginx.service"
    assert unit_of("postgresql", t) == "postgresql.service"
    assert unit_of("pgbouncer", t) == "aipbx-pgbouncer.service"
    assert unit_of("disk", t) is None
    assert unit_of("backend_http", targets(None)) is None
    assert target_of("backend_ws", t) != target_of("backend_ws", targets("green"))


class FakeServices:
    def __init__(self, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.clock = clock
        self.calls: list[tuple[str, str]] = []
        self.restarted_at: list[float] = []
        self.on_restart: Callable[[], None] = lambda: None

    def state(self, unit: str) -> UnitState:
        return UnitState(unit, "active", "running", "enabled", "", 1)

    def is_active(self, unit: str) -> bool:
        return True

    def start(self, unit: str) -> None:
        self.calls.append(("start", unit))

    def stop(self, unit: str) -> None:
        self.calls.append(("stop", unit))

    def restart(self, unit: str) -> None:
        self.calls.append(("restart", unit))
        self.restarted_at.append(self.clock())
        self.on_restart()

    def reload(self, unit: str) -> None:
        self.calls.append(("reload", unit))

    def enable(self, unit: str, *, now: bool = False) -> None:
        self.calls.append(("enable", unit))

    def disable(self, unit: str, *, now: bool = False) -> None:
        self.calls.append(("disable", unit))

    def daemon_reload(self) -> None:
        pass

    def reset_failed(self, unit: str) -> None:
        self.calls.append(("reset_failed", unit))

    def kill(self, unit: str, signal: str) -> None:
        self.calls.append((f"kill {signal}", unit))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedChecks:
    """Stands in for Checks: answers what the test says, counts runs, and takes a little
    time on the fake clock as real checks do."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.status: dict[str, Status] = {}
        self.runs: dict[str, int] = {}
        self.healthy_from: float | None = None  # all ok from then on

    async def run(self, check: str, t: Targets) -> Result:
        self.runs[check] = self.runs.get(check, 0) + 1
        self.clock.now += 0.05
        if self.healthy_from is not None and self.clock.now >= self.healthy_from:
            self.status.clear()
        status = self.status.get(check, Status.OK)
        return Result(status, 0.05, "" if status is Status.OK else "refused")

    def recheck_addresses(self) -> None:
        pass


class Alerts:
    def __init__(self) -> None:
        self.got: list[Alert] = []

    def publish(self, alert: Alert) -> None:
        self.got.append(alert)


BACKEND = ("backend_http", "backend_ws")
UNIT = "aipbx-backend@blue.service"


Rounds = Callable[[int], Awaitable[None]]


def rig(
    settings: Settings, enabled: tuple[str, ...]
) -> tuple[Monitor, Clock, FakeServices, Alerts, ScriptedChecks, Rounds]:
    clock = Clock()
    services, alerts, checks = FakeServices(clock), Alerts(), ScriptedChecks(clock)
    m = Monitor(
        settings,
        lambda: targets(),
        services,
        alerts,
        clock=clock,
        wall=lambda: 0.0,
        enabled=enabled,
    )
    m.checks = checks  # type: ignore[assignment]

    async def rounds(n: int) -> None:
        for _ in range(n):
            await m.round()
            while m._restarting:  # let the restart thread finish
                await asyncio.sleep(0.001)
            clock.now += settings.interval

    return m, clock, services, alerts, checks, rounds


def test_monitor_restarts_a_unit_once_per_opening_and_alerts_once_per_incident() -> None:
    settings = Settings(
        interval=1, failures_to_open=3, cooldown=5, critical_after=10, restart_budget=3
    )
    m, clock, services, alerts, checks, rounds = rig(settings, (*BACKEND, "nginx"))

    async def scenario() -> None:
        await rounds(2)
        assert services.calls == []
        checks.status = {c: Status.CRITICAL for c in BACKEND}
        await rounds(2)
        assert services.calls == []
        await rounds(1)  # the third failure opens both breakers: one restart of the unit
        # a hung backend is killed, not stopped gracefully, then restarted
        assert services.calls == [("kill SIGKILL", UNIT), ("reset_failed", UNIT), ("restart", UNIT)]
        # The restart returned: the unit is probed every round from now on, and failures
        # within the cool-down are the unit still starting, not a failed restart.
        runs = checks.runs["backend_http"], checks.runs["backend_ws"]
        await rounds(4)
        assert (checks.runs["backend_http"], checks.runs["backend_ws"]) == (
            runs[0] + 4,
            runs[1] + 4,
        )
        assert m.snapshot()["checks"]["backend_http"]["breaker"] == "half_open"
        assert len(services.restarted_at) == 1
        await rounds(2)  # still failing past the cool-down: open again, second restart
        assert len(services.restarted_at) == 2
        snap = m.snapshot()
        assert snap["checks"]["backend_http"]["breaker"] == "half_open"
        assert snap["restarts"][UNIT]["total"] == 2
        await rounds(20)  # a third restart, then over budget: no more, one CRITICAL says so
        assert len(services.restarted_at) == 3
        assert m.snapshot()["restarts"][UNIT]["exhausted"] is True
        # never sooner than the cool-down after the previous restart
        gaps = [b - a for a, b in itertools.pairwise(services.restarted_at)]
        assert all(g >= settings.cooldown for g in gaps), gaps
        checks.status = {}
        await rounds(10)
        assert m.snapshot()["checks"]["backend_http"]["breaker"] == "closed"
        assert m.snapshot()["status"] == "ok"
        assert m.snapshot()["restarts"][UNIT]["exhausted"] is False

    asyncio.run(scenario())
    got = [(a.severity, a.check) for a in alerts.got]
    # one incident of the unit: its two checks and its exhausted budget are one alert
    unit_checks = ("backend_http", "backend_ws", f"restart:{UNIT}")
    assert sum(got.count((Severity.CRITICAL, c)) for c in unit_checks) == 1, got
    assert sum(got.count((Severity.INFO, c)) for c in unit_checks) == 1, got
    assert not any(a.check == "nginx" for a in alerts.got)


def test_a_lagging_breaker_of_the_same_unit_does_not_restart_it_again() -> None:
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=60)
    m, clock, services, alerts, checks, rounds = rig(settings, BACKEND)

    def restart_fixes_it_in_a_while() -> None:
        checks.healthy_from = clock.now + 2.5

    services.on_restart = restart_fixes_it_in_a_while

    async def scenario() -> None:
        checks.status = {"backend_http": Status.CRITICAL}
        await rounds(1)
        checks.status["backend_ws"] = Status.CRITICAL
        await rounds(1)  # http opens: restart
        assert len(services.restarted_at) == 1
        await rounds(1)  # ws opens too, while the unit is still coming up
        assert m.snapshot()["checks"]["backend_ws"]["breaker"] == "open"
        await rounds(15)
        snap = m.snapshot()
        assert [snap["checks"][c]["breaker"] for c in BACKEND] == ["closed", "closed"]

    asyncio.run(scenario())
    assert len(services.restarted_at) == 1
    assert alerts.got == []


def test_monitor_idles_backend_checks_without_a_live_color() -> None:
    clock = Clock()
    services, alerts, checks = FakeServices(clock), Alerts(), ScriptedChecks(clock)
    settings = Settings(failures_to_open=1, cooldown=5)
    current = {"t": targets()}
    m = Monitor(settings, lambda: current["t"], services, alerts, clock=clock, wall=lambda: 0.0)
    m.checks = checks  # type: ignore[assignment]

    async def scenario() -> None:
        checks.status = {"backend_http": Status.CRITICAL}
        await m.round()
        assert m.snapshot()["checks"]["backend_http"]["breaker"] == "open"
        # the color goes away (e.g. a test rig without releases): breaker reset, no restarts
        current["t"] = targets(None)
        checks.status = {"backend_http": Status.IDLE}
        clock.now += 10
        await m.round()
        snap = m.snapshot()
        assert snap["checks"]["backend_http"]["state"] == "idle"
        assert snap["checks"]["backend_http"]["breaker"] == "closed"
        assert snap["live_color"] is None

    asyncio.run(scenario())


def test_a_missing_switch_table_is_applied_again_not_restarted_as_a_unit() -> None:
    """The switch check's "unit" is the nft table: the breaker opening calls the repair
    (appliance.reconcile.network in the daemon), never systemctl, and not during a change."""
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=60)
    m, _, services, _, checks, rounds = rig(settings, ("switch",))
    repaired: list[int] = []
    m.repair_switch = lambda: repaired.append(1)
    assert unit_of("switch", targets()) == "nft table inet aipbx"
    assert unit_of("switch", targets(None)) is None

    async def scenario() -> None:
        checks.status = {"switch": Status.CRITICAL}
        changing = {"now": True}
        m.change_running = lambda: changing["now"]
        await rounds(3)
        assert repaired == []  # an upgrade owns the table meanwhile
        changing["now"] = False
        await rounds(1)
        assert repaired == [1]
        assert services.calls == []
        assert m.snapshot()["restarts"]["nft table inet aipbx"]["total"] == 1

    asyncio.run(scenario())
