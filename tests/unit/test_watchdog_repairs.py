"""How the watchdog repairs (issue 11, items 9 and 10): a hung unit is killed before its
restart (PostgreSQL through its cluster's unit, not Debian's wrapper), a restart in flight
is the answer to every failure seen meanwhile (no second restart when it returns), its
outcome is probed at once, and PgBouncer must listen on every color's veth address."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from appliance import pgbouncer
from appliance.colors import Color
from appliance.watchdog import probes
from appliance.watchdog.breaker import Breaker, BreakerState
from appliance.watchdog.checks import Checks, Targets
from appliance.watchdog.model import Result, Status
from appliance.watchdog.restarts import Step, steps
from appliance.watchdog.settings import Settings
from appliance.watchdog.targets import cluster_unit, connect_host
from tests.unit.test_watchdog_checks import Clock, FakeServices, targets
from tests.unit.test_watchdog_ownfault import Scripted, rig

CLUSTER = "postgresql@15-main.service"
HUNG = Result(Status.CRITICAL, 2.0, "no answer within 2 s", timed_out=True)
REFUSED = Result(Status.CRITICAL, 0.01, "connection refused")


def test_restart_steps() -> None:
    assert steps("nginx.service", hung=False) == [
        Step("reset_failed", "nginx.service"),
        Step("restart", "nginx.service"),
    ]
    assert steps("nginx.service", hung=True)[0] == Step("kill", "nginx.service", "SIGKILL")
    # the backend is always killed, a netns anchor never (its restart wires it again)
    assert steps("aipbx-backend@blue.service", hung=False)[0].verb == "kill"
    assert [s.verb for s in steps("aipbx-netns@green.service", hung=True)] == [
        "reset_failed",
        "restart",
    ]
    # Debian's wrapper runs no process: the cluster's unit is killed, the wrapper restarted
    assert steps("postgresql.service", hung=True, runs_in=CLUSTER) == [
        Step("kill", CLUSTER, "SIGKILL"),
        Step("reset_failed", CLUSTER),
        Step("restart", "postgresql.service"),
        Step("start", CLUSTER),
    ]


def settling(br: Breaker) -> bool:
    return br.settling  # a call: mypy does not narrow it from one assert to the next


def test_after_a_restart_the_breaker_probes_at_once_and_settles_for_a_cooldown() -> None:
    br = Breaker(failures_to_open=1, cooldown=10)
    br.record(False, 0)
    assert br.restarted(3) is not None and br.probing and settling(br)
    assert br.record(False, 4) is None and br.record(False, 12.9) is None  # still starting
    t = br.record(False, 13)  # a whole cool-down after the restart: it did not help
    assert t is not None and t.new is BreakerState.OPEN and not settling(br)
    br.restarted(20)
    t = br.record(True, 21)
    assert t is not None and t.new is BreakerState.CLOSED and not settling(br)
    assert br.restarted(22) is None  # only an open breaker


async def _rounds(m: object, clock: Clock, n: int) -> None:
    """Rounds that do not wait for restarts in flight (they run in threads)."""
    for _ in range(n):
        await m.round()  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        clock.now += m.s.interval  # type: ignore[attr-defined]


class SlowRestart(FakeServices):
    """A restart that does not return until the test says so (systemd waiting out a stop
    timeout); it fixes the service once it returns."""

    def __init__(self, clock: Clock, checks: Scripted) -> None:
        super().__init__(clock)
        self.checks = checks
        self.go = threading.Event()

    def restart(self, unit: str) -> None:
        super().restart(unit)
        assert self.go.wait(10)
        self.checks.results = {}


def test_a_hung_postgresql_is_killed_restarted_once_and_probed_when_it_returns() -> None:
    """Item 9: PostgreSQL stopped (SIGSTOP). Its cluster's processes are killed, not
    stopped gracefully; while the restart runs, however long, no probe runs and nothing
    is restarted again; when it returns, the next round probes and finds it well."""
    settings = Settings(interval=1, failures_to_open=3, cooldown=5, critical_after=60)
    m, clock, _, _, checks = rig(settings)
    services = SlowRestart(clock, checks)
    m.services = services
    t = replace(targets(), postgres_cluster=CLUSTER)
    m.targets = lambda: t

    async def scenario() -> None:
        await _rounds(m, clock, 2)
        checks.results = {"postgresql": HUNG}
        await _rounds(m, clock, 3)  # three timeouts: open, restart under way
        assert m.snapshot()["restarts"]["postgresql.service"]["restarting"] is True
        runs = m.states["postgresql"].runs
        await _rounds(m, clock, 20)  # far past the cool-down: the restart still runs
        assert m.states["postgresql"].runs == runs
        assert m.snapshot()["checks"]["postgresql"]["breaker"] == "open"
        services.go.set()
        while m._restarting:
            await asyncio.sleep(0.01)
        assert m.snapshot()["checks"]["postgresql"]["breaker"] == "half_open"
        await _rounds(m, clock, 1)
        assert m.snapshot()["checks"]["postgresql"]["breaker"] == "closed"
        await _rounds(m, clock, 20)

    asyncio.run(scenario())
    assert services.calls == [
        ("kill SIGKILL", CLUSTER),
        ("reset_failed", CLUSTER),
        ("restart", "postgresql.service"),
        ("start", CLUSTER),
    ]


def test_a_refusing_service_is_restarted_without_a_kill() -> None:
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=60)
    m, clock, services, _, checks = rig(settings)

    async def scenario() -> None:
        checks.results = {"nginx": REFUSED, "pgbouncer": HUNG}
        await _rounds(m, clock, 3)

    asyncio.run(scenario())
    assert ("restart", "nginx.service") in services.calls
    assert ("kill SIGKILL", "nginx.service") not in services.calls
    assert ("kill SIGKILL", "aipbx-pgbouncer.service") in services.calls


def test_a_failure_seen_during_a_restart_does_not_restart_again() -> None:
    """The issue's ~87 s: the half-open probe failed while the first restart still ran,
    and a second restart followed it at once."""
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=60)
    m, clock, _, _, checks = rig(settings)
    services = SlowRestart(clock, checks)
    m.services = services

    async def scenario() -> None:
        checks.results = {"backend_http": HUNG}
        await _rounds(m, clock, 2)  # http opens: restart (in flight)
        checks.results = {"backend_http": HUNG, "backend_ws": HUNG}
        await _rounds(m, clock, 10)  # ws opens too, meanwhile
        assert m.snapshot()["checks"]["backend_ws"]["breaker"] == "open"
        services.go.set()
        while m._restarting:
            await asyncio.sleep(0.01)
        await _rounds(m, clock, 20)
        snap = m.snapshot()
        assert [snap["checks"][c]["breaker"] for c in ("backend_http", "backend_ws")] == [
            "closed",
            "closed",
        ]

    asyncio.run(scenario())
    assert [c for c in services.calls if c[0] == "restart"] == [
        ("restart", "aipbx-backend@blue.service")
    ]


def test_pgbouncer_missing_an_address_on_the_host_repairs_that_colors_netns() -> None:
    """Item 10: the green veth is gone from the host. The repair is its namespace unit
    (which wires it again), never killed, and not while an upgrade owns the colors."""
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=60)
    m, clock, services, _, checks = rig(settings)
    netns = "aipbx-netns@green.service"
    missing = Result(Status.CRITICAL, error="10.203.0.5 is not on this host", unit=netns)
    changing = {"now": True}
    m.change_running = lambda: changing["now"]

    async def scenario() -> None:
        checks.results = {"pgbouncer": missing}
        await _rounds(m, clock, 4)
        assert services.calls == []  # an upgrade runs: it owns the colors' units
        assert m.snapshot()["checks"]["pgbouncer"]["unit"] == netns
        changing["now"] = False
        await _rounds(m, clock, 1)
        while m._restarting:
            await asyncio.sleep(0.01)
        checks.results = {}
        await _rounds(m, clock, 2)
        assert m.snapshot()["checks"]["pgbouncer"]["unit"] == "aipbx-pgbouncer.service"

    asyncio.run(scenario())
    assert services.calls == [("reset_failed", netns), ("restart", netns)]


LISTEN = (("10.203.0.1", "aipbx-netns@blue.service"), ("10.203.0.5", "aipbx-netns@green.service"))


def _pgbouncer(
    monkeypatch: pytest.MonkeyPatch, *, on_host: set[str], listening: set[str]
) -> Result:
    async def startup(host: str, port: int, user: str, db: str) -> str:
        return "authentication requested"

    async def connect(host: str, port: int) -> str:
        if host not in listening:
            raise ConnectionRefusedError(111, "Connection refused")
        return "connected"

    monkeypatch.setattr(probes, "pg_startup", startup)
    monkeypatch.setattr(probes, "tcp_connect", connect)
    monkeypatch.setattr(probes, "address_on_host", lambda a: a in on_host)
    t: Targets = replace(targets(), pgbouncer_listen=LISTEN)
    checks = Checks(Settings(timeout=1, slow=0.5), FakeServices(), Clock())
    return asyncio.run(checks.run("pgbouncer", t))


def test_pgbouncer_must_listen_on_every_colors_address(monkeypatch: pytest.MonkeyPatch) -> None:
    both = {"10.203.0.1", "10.203.0.5"}
    r = _pgbouncer(monkeypatch, on_host=both, listening=both)
    assert r.status is Status.OK and "listens on 10.203.0.1, 10.203.0.5 too" in r.detail
    # started before the green veth was up: the address is there now, PgBouncer is not
    r = _pgbouncer(monkeypatch, on_host=both, listening={"10.203.0.1"})
    assert r.status is Status.CRITICAL and r.unit is None
    assert r.error.startswith("PgBouncer does not listen on 10.203.0.5:6432")
    # the green veth is gone from the host: its namespace unit is what needs repair
    r = _pgbouncer(monkeypatch, on_host={"10.203.0.1"}, listening=both)
    assert r.status is Status.CRITICAL and r.unit == "aipbx-netns@green.service"
    assert r.error.startswith("10.203.0.5 is not on this host")


def test_pgbouncer_listens_where_setup_renders_it() -> None:
    addrs = pgbouncer.listen_addrs("10.203.0.0/24")
    assert addrs == [("127.0.0.1", None), ("10.203.0.1", Color.BLUE), ("10.203.0.5", Color.GREEN)]


def test_the_cluster_unit_behind_debians_wrapper(tmp_path: Path) -> None:
    etc = tmp_path / "etc/postgresql"
    assert cluster_unit(etc, 5432) is None
    (etc / "15/main").mkdir(parents=True)
    (etc / "15/main/postgresql.conf").write_text("# port = 1\nport = 5433\t# (change...)\n")
    assert cluster_unit(etc, 5432) == CLUSTER  # the only one, whatever it says
    (etc / "16/other").mkdir(parents=True)
    (etc / "16/other/postgresql.conf").write_text("listen_addresses = '*'\n")  # 5432
    assert cluster_unit(etc, 5432) == "postgresql@16-other.service"
    assert cluster_unit(etc, 5433) == CLUSTER
    assert cluster_unit(etc, 6000) is None
    # /etc/postgresql hidden from the watchdog: the only running cluster's pid file
    run = tmp_path / "run/postgresql"
    run.mkdir(parents=True)
    (run / "15-main.pid").write_text("42\n")
    (run / ".s.PGSQL.5432.lock").write_text("")
    assert cluster_unit(tmp_path / "nowhere", 5432, run) == CLUSTER
    (run / "16-other.pid").write_text("43\n")
    assert cluster_unit(tmp_path / "nowhere", 5432, run) is None
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("::") == "::1"
    assert connect_host("127.0.0.1") == "127.0.0.1"
