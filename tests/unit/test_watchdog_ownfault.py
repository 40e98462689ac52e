"""The watchdog's own failure told from a service's (issue 11, item 2): errors that say the
watchdog could not check (no descriptor, memory, thread, process) make a check UNKNOWN,
which never counts against a breaker, never opens a service's incident and never restarts
anything; the watchdog says once that it is impaired, holds every restart meanwhile, and
says once that it checks again."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from appliance.errors import CommandError
from appliance.watchdog import probes
from appliance.watchdog.alerts import Severity
from appliance.watchdog.checks import Checks, Targets
from appliance.watchdog.faults import own_fault
from appliance.watchdog.model import Result, Status, worst
from appliance.watchdog.monitor import Monitor
from appliance.watchdog.ownfault import Fault, OwnFault
from appliance.watchdog.settings import Settings
from tests.unit.test_watchdog_checks import Alerts, Clock, FakeServices, targets

EMFILE = OSError(errno.EMFILE, "Too many open files")


def _from(cause: BaseException) -> CommandError:
    """What appliance.run raises when a fork fails: a CommandError from the OSError."""
    try:
        raise CommandError(["systemctl"], 126, f"systemctl: {cause}") from cause
    except CommandError as e:
        return e


@pytest.mark.parametrize(
    "e",
    [
        EMFILE,
        OSError(errno.ENFILE, "Too many open files in system"),
        OSError(errno.ENOMEM, "Cannot allocate memory"),
        OSError(errno.ENOBUFS, "No buffer space available"),
        OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"),
        PermissionError(errno.EPERM, "Operation not permitted"),
        MemoryError(),
        RuntimeError("can't start new thread"),
        _from(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")),
        _from(EMFILE),
    ],
)
def test_the_watchdogs_own_failures(e: BaseException) -> None:
    assert own_fault(e) is not None


@pytest.mark.parametrize(
    "e",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        TimeoutError(),
        EOFError(),
        probes.ProbeError("the database system is starting up"),
        CommandError(["nft"], 1, "Error: No such file or directory"),
        RuntimeError("something else"),
    ],
)
def test_a_services_failures(e: BaseException) -> None:
    assert own_fault(e) is None


def test_a_services_error_raised_while_handling_our_own_is_the_services() -> None:
    try:
        try:
            raise EMFILE
        except OSError:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused") from None
    except ConnectionRefusedError as e:
        assert own_fault(e) is None


def test_an_error_answer_that_says_full_is_busy_not_broken() -> None:
    too_many = b"SFATAL\0C53300\0Msorry, too many clients already\0\0"
    assert isinstance(probes.pg_error(too_many), probes.ProbeBusy)
    bouncer = b"SERROR\0C08P01\0Mno more connections allowed (max_client_conn)\0\0"
    assert isinstance(probes.pg_error(bouncer), probes.ProbeBusy)
    starting = b"SFATAL\0C57P03\0Mthe database system is starting up\0\0"
    e = probes.pg_error(starting)
    assert not isinstance(e, probes.ProbeBusy) and str(e) == "the database system is starting up"


def _run(check: str, t: Targets, monkeypatch: pytest.MonkeyPatch, fail: BaseException) -> Result:
    async def refused(host: str, port: int) -> object:
        raise fail

    monkeypatch.setattr(probes, "_open", refused)
    checks = Checks(Settings(timeout=1, slow=0.5), FakeServices(), Clock())
    return asyncio.run(checks.run(check, t))


@pytest.mark.parametrize("check", ["nginx", "postgresql", "pgbouncer", "backend_http", "switch"])
def test_a_check_that_cannot_open_a_socket_is_unknown(
    check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _run(check, targets(), monkeypatch, EMFILE)
    assert r.status is Status.UNKNOWN, r
    assert r.error == "no file descriptor left in the watchdog (EMFILE)"
    # the same check, refused: the service's failure
    r = _run(check, targets(), monkeypatch, ConnectionRefusedError(111, "Connection refused"))
    assert r.status is Status.CRITICAL or check == "switch", r


def test_a_full_database_is_a_warning_not_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    async def full(*args: object) -> str:
        raise probes.ProbeBusy("sorry, too many clients already")

    monkeypatch.setattr(probes, "pg_startup", full)
    checks = Checks(Settings(timeout=1, slow=0.5), FakeServices(), Clock())
    r = asyncio.run(checks.run("postgresql", targets()))
    assert r.status is Status.WARNING and not r.status.failed
    assert r.error == "turns new clients away: sorry, too many clients already"


def test_an_unknown_check_makes_the_overall_status_unknown_unless_one_is_critical() -> None:
    assert worst([Status.OK, Status.UNKNOWN, Status.WARNING]) is Status.UNKNOWN
    assert worst([Status.UNKNOWN, Status.CRITICAL]) is Status.CRITICAL
    assert not Status.UNKNOWN.failed


def test_own_fault_tracker_alerts_once_per_episode_and_once_when_over() -> None:
    own = OwnFault(recover_after=3)
    fault = [Fault("nginx", "no file descriptor left in the watchdog (EMFILE)")]
    first = own.observe(fault, 10)
    assert [(a.severity, a.check, a.incident) for a in first] == [
        (Severity.CRITICAL, "watchdog", "watchdog#1")
    ]
    assert "no file descriptor left" in first[0].text and "restarts nothing" in first[0].text
    assert own.state_doc(now=10, wall_now=10)["started"] == 10
    assert own.observe(fault, 11) == [] and own.observe([], 12) == []
    assert own.observe(fault, 13) == []  # the streak starts again
    assert own.observe([], 14) == [] and own.observe([], 15) == []
    over = own.observe([], 16)
    assert [(a.severity, a.incident) for a in over] == [(Severity.INFO, "watchdog#1")]
    assert "started" not in own.state_doc(now=16, wall_now=16) and own.observe([], 17) == []
    # a restart of the watchdog in the middle of an episode: not alerted again
    own.observe(fault, 20)
    doc = own.state_doc(now=21, wall_now=1021)
    again = OwnFault(recover_after=3)
    again.resume(doc, now=5, wall_now=1022)
    assert again.impaired and again.observe(fault, 6) == [] and again.count == 2


class Scripted:
    """Stands in for Checks: each check answers what the test sets (OK by default)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.results: dict[str, Result] = {}

    async def run(self, check: str, t: Targets) -> Result:
        self.clock.now += 0.05
        return self.results.get(check, Result(Status.OK, 0.05, detail="fine"))

    def recheck_addresses(self) -> None:
        pass


UNKNOWN = Result(Status.UNKNOWN, error="no file descriptor left in the watchdog (EMFILE)")
REFUSED = Result(Status.CRITICAL, 0.01, "connection refused")
CHECKS = ("nginx", "postgresql", "pgbouncer", "backend_http", "backend_ws", "disk")


def rig(settings: Settings) -> tuple[Monitor, Clock, FakeServices, Alerts, Scripted]:
    clock = Clock()
    services, alerts, checks = FakeServices(clock), Alerts(), Scripted(clock)
    m = Monitor(
        settings, lambda: targets(), services, alerts, clock=clock, wall=lambda: 0.0,
        enabled=CHECKS,
    )  # fmt: skip
    m.checks = checks  # type: ignore[assignment]
    return m, clock, services, alerts, checks


async def _rounds(m: Monitor, clock: Clock, n: int) -> None:
    for _ in range(n):
        await m.round()
        while m._restarting:
            await asyncio.sleep(0.001)
        clock.now += m.s.interval


def test_exhausted_descriptors_restart_nothing_and_are_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attack of item 2: every check fails with EMFILE for a long time. Nothing is
    restarted or killed, no service incident is opened, one CRITICAL about the watchdog
    itself; then descriptors come back, the checks resume, one INFO."""
    caplog.set_level(logging.INFO, "aipbx")
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=3)
    m, clock, services, alerts, checks = rig(settings)

    async def scenario() -> None:
        await _rounds(m, clock, 2)
        checks.results = {c: UNKNOWN for c in CHECKS}
        await _rounds(m, clock, 30)
        snap = m.snapshot()
        assert snap["status"] == "unknown"
        assert snap["watchdog"]["state"] == "impaired" and snap["watchdog"]["restarts_held"]
        assert "EMFILE" in snap["watchdog"]["error"]
        for c in CHECKS:
            assert snap["checks"][c]["state"] == "unknown"
            assert snap["checks"][c]["breaker"] == "closed"
            assert snap["checks"][c]["failures"] == 0
        checks.results = {}
        await _rounds(m, clock, 3)
        snap = m.snapshot()
        assert snap["status"] == "ok" and snap["watchdog"]["state"] == "ok"

    asyncio.run(scenario())
    assert services.calls == []
    assert [(a.severity, a.check) for a in alerts.got] == [
        (Severity.CRITICAL, "watchdog"),
        (Severity.INFO, "watchdog"),
    ]
    own = [r for r in caplog.records if getattr(r, "fields", {}).get("check") == "watchdog"]
    assert [(r.levelname, r.fields["action"]) for r in own] == [  # type: ignore[attr-defined]
        ("CRITICAL", "own_fault"),
        ("INFO", "own_fault_over"),
    ]


def test_while_impaired_a_real_failure_waits_for_its_restart() -> None:
    """Some checks cannot run while another is refused: the refused one is real, but no
    restart happens until the watchdog can check everything again; then it does."""
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=60)
    m, clock, services, alerts, checks = rig(settings)

    async def scenario() -> None:
        checks.results = {"nginx": REFUSED, "postgresql": UNKNOWN}
        await _rounds(m, clock, 5)
        assert m.snapshot()["checks"]["nginx"]["breaker"] == "open"
        assert services.calls == []
        checks.results = {"nginx": REFUSED}
        await _rounds(m, clock, 3)

    asyncio.run(scenario())
    assert ("restart", "nginx.service") in services.calls


def test_an_open_incident_is_left_alone_while_its_check_is_unknown() -> None:
    settings = Settings(interval=1, failures_to_open=2, cooldown=5, critical_after=3)
    m, clock, services, alerts, checks = rig(settings)

    async def scenario() -> None:
        checks.results = {"disk": Result(Status.CRITICAL, error="low disk space")}
        await _rounds(m, clock, 5)
        checks.results = {"disk": UNKNOWN}
        await _rounds(m, clock, 10)  # neither recovered nor alerted again
        checks.results = {}
        await _rounds(m, clock, 5)

    asyncio.run(scenario())
    disk = [(a.severity, a.incident) for a in alerts.got if a.check == "disk"]
    assert disk == [(Severity.CRITICAL, "disk#1"), (Severity.INFO, "disk#1")]


def test_the_spool_keeps_the_watchdogs_own_incident(tmp_path: Path) -> None:
    settings = Settings(interval=1, failures_to_open=2, critical_after=3)
    m, clock, _, alerts, checks = rig(settings)
    checks.results = {"nginx": UNKNOWN}
    asyncio.run(_rounds(m, clock, 2))
    doc = m.alert_state()
    assert doc["watchdog"]["count"] == 1 and "started" in doc["watchdog"]
    again, clock2, _, alerts2, checks2 = rig(settings)
    again.resume_alert_state(doc)
    checks2.results = {"nginx": UNKNOWN}
    asyncio.run(_rounds(again, clock2, 3))
    assert alerts2.got == []  # the same episode: not alerted twice
