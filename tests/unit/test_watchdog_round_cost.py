"""What the watchdog does not redo every round (its CPU target: 0.5 % of a core at a 1 s
interval): PgBouncer's addresses are looked at every 10 s, after each restart and from any
failure on; the targets are worked out again only when something they follow moved; the
alert spool is not serialized while it is unchanged; the status line needs no snapshot;
memory comes from /proc/meminfo, without psutil."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from appliance import config, state, tls_store
from appliance.colors import Color
from appliance.paths import Paths
from appliance.watchdog import meminfo, probes
from appliance.watchdog.checks import ADDRESSES_EVERY_S, Checks, Targets
from appliance.watchdog.model import Result, Status
from appliance.watchdog.settings import Settings
from appliance.watchdog.spool import Spool
from appliance.watchdog.targets import LiveTargets
from tests.unit.test_watchdog_checks import Clock, FakeServices, targets
from tests.unit.test_watchdog_ownfault import REFUSED, Scripted, rig

LISTEN = (("10.203.0.1", "aipbx-netns@blue.service"), ("10.203.0.5", "aipbx-netns@green.service"))


class Probed:
    """PgBouncer's probes, counted: its answer on loopback, each address's bind test and
    connect."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers = 0
        self.binds: list[str] = []
        self.connects: list[str] = []
        self.down = False  # PgBouncer refuses
        self.listening = {a for a, _ in LISTEN}

        async def startup(host: str, port: int, user: str, db: str) -> str:
            self.answers += 1
            if self.down:
                raise ConnectionRefusedError(111, "Connection refused")
            return "authentication requested"

        async def connect(host: str, port: int) -> str:
            self.connects.append(host)
            if self.down or host not in self.listening:
                raise ConnectionRefusedError(111, "Connection refused")
            return "connected"

        def on_host(addr: str) -> bool:
            self.binds.append(addr)
            return True

        monkeypatch.setattr(probes, "pg_startup", startup)
        monkeypatch.setattr(probes, "tcp_connect", connect)
        monkeypatch.setattr(probes, "address_on_host", on_host)

    def looked(self) -> bool:
        """Whether the addresses were looked at since the last call."""
        seen = bool(self.binds or self.connects)
        self.binds.clear()
        self.connects.clear()
        return seen


def test_pgbouncer_addresses_every_10_s_after_restarts_and_from_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = Probed(monkeypatch)
    clock = Clock()
    checks = Checks(Settings(interval=1, timeout=1, slow=0.5), FakeServices(), clock)
    t: Targets = replace(targets(), pgbouncer_listen=LISTEN)

    runs = 0

    def run() -> Result:
        nonlocal runs
        runs += 1
        return asyncio.run(checks.run("pgbouncer", t))

    r = run()  # at start: every address
    assert p.looked() and r.status is Status.OK
    assert "listens on 10.203.0.1, 10.203.0.5 too" in r.detail
    for _ in range(int(ADDRESSES_EVERY_S) - 1):  # then only the answer on loopback
        clock.now += 1
        r = run()
        assert not p.looked() and r.status is Status.OK and "listens on" in r.detail
    clock.now += 1
    assert run().status is Status.OK and p.looked()  # 10 s on
    clock.now += 1
    assert run().status is Status.OK and not p.looked()
    checks.recheck_addresses()  # the watchdog restarted something
    assert run().status is Status.OK and p.looked()
    # PgBouncer went down: from then on every round, until all listen again
    p.down = True
    clock.now += 1
    assert run().status is Status.CRITICAL
    p.looked()
    p.down, p.listening = False, {"10.203.0.1"}  # back, without green's address
    for _ in range(3):
        clock.now += 1
        r = run()
        assert p.looked() and r.status is Status.CRITICAL
        assert r.error.startswith("PgBouncer does not listen on 10.203.0.5:6432")
    p.listening = {a for a, _ in LISTEN}
    clock.now += 1
    assert run().status is Status.OK and p.looked()
    clock.now += 1
    assert run().status is Status.OK and not p.looked()
    assert p.answers == runs  # the answer on loopback: every round


def test_a_restart_makes_the_next_round_look_at_the_addresses_again() -> None:
    class Counting(Scripted):
        rechecks = 0

        def recheck_addresses(self) -> None:
            self.rechecks += 1

    settings = Settings(interval=1, failures_to_open=3, cooldown=5, critical_after=60)
    m, clock, services, _, old = rig(settings)
    checks = Counting(clock)
    m.checks = checks  # type: ignore[assignment]

    async def scenario() -> None:
        checks.results = {"nginx": REFUSED}
        for _ in range(3):
            await m.round()
            clock.now += 1
        while m._restarting:
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert ("restart", "nginx.service") in services.calls
    assert checks.rechecks == 1


def _root(tmp_path: Path) -> tuple[LiveTargets, Paths]:
    paths = Paths(tmp_path)
    return LiveTargets(config.parse(""), paths), paths


def test_live_targets_are_the_same_until_something_they_follow_moves(tmp_path: Path) -> None:
    live, paths = _root(tmp_path)
    first = live()
    assert first.color is None and not first.pgbouncer_set_up
    assert live() is first  # nothing moved: not built again
    paths.var.mkdir(parents=True)
    state.save(paths.state, state.State(live_color=Color.GREEN))
    green = live()
    assert (green.color, green.backend_host) == ("green", "10.203.0.6")
    assert green.backend_unit == "aipbx-backend@green.service"
    assert live() is green
    paths.pgbouncer_ini.parent.mkdir(parents=True, exist_ok=True)
    paths.pgbouncer_ini.write_text("")
    assert live().pgbouncer_set_up
    assert live().cert == paths.selfsigned_cert  # nothing in the TLS store yet
    # a certificate placed in the store: its link is followed from the next round on
    paths.tls_served.mkdir(parents=True)
    for name in ("a", "b"):
        (paths.tls_served / name).mkdir()
    os.symlink("a", paths.tls_served / tls_store.CURRENT)
    assert live().cert == paths.tls_served / "a" / tls_store.CHAIN
    os.replace(_link(paths, "b"), paths.tls_served / tls_store.CURRENT)
    assert live().cert == paths.tls_served / "b" / tls_store.CHAIN
    os.unlink(paths.state)
    assert live().color is None


def _link(paths: Paths, target: str) -> Path:
    tmp = paths.tls_served / "next"
    os.symlink(target, tmp)
    return tmp


def test_the_spool_is_written_when_its_content_changes_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "watchdog-alerts.json")
    doc = {"incidents": {"nginx": {"count": 1}}, "muted": []}
    spool.save(doc, {})
    st = spool.path.stat()
    spool.save({"incidents": {"nginx": {"count": 1}}, "muted": []}, {})  # equal, not same
    assert spool.path.stat().st_ino == st.st_ino  # not replaced
    spool.save({"incidents": {"nginx": {"count": 2}}, "muted": []}, {})
    assert spool.path.stat().st_ino != st.st_ino
    assert '"count": 2' in spool.path.read_text()
    # read back after a restart: the same content is not written again either
    again = Spool(spool.path)
    loaded = again.load()
    st = spool.path.stat()
    again.save(loaded["monitor"], loaded["queues"])
    assert spool.path.stat().st_ino == st.st_ino


def test_the_status_line_summary_is_the_snapshots() -> None:
    m, _, _, _, checks = rig(Settings(interval=1))
    checks.results = {"nginx": REFUSED}
    asyncio.run(m.round())
    snap, summary = m.snapshot(), m.summary()
    assert summary["live_color"] == snap["live_color"] == "blue"
    assert summary["checks"] == {n: {"state": c["state"]} for n, c in snap["checks"].items()}
    assert summary["checks"]["nginx"] == {"state": "critical"}


MEMINFO = b"""MemTotal:        4000000 kB
MemFree:          500000 kB
MemAvailable:    1000000 kB
Buffers:          100000 kB
Cached:           900000 kB
"""


def test_memory_in_use_from_proc_meminfo() -> None:
    assert meminfo.used_pct(MEMINFO) == 75.0  # (total - available) / total
    old_kernel = b"\n".join(ln for ln in MEMINFO.splitlines() if b"Available" not in ln)
    assert meminfo.used_pct(old_kernel) == 62.5  # free + buffers + cache
    with pytest.raises(ValueError, match="MemTotal"):
        meminfo.used_pct(b"MemFree: 1 kB\n")
    assert 0.0 < meminfo.read_used_pct() < 100.0  # this host's


def test_a_listener_that_stops_listening_is_seen() -> None:
    """A listening socket shut down in place keeps its descriptor and inode: only
    SO_ACCEPTCONN tells it accepts nothing any more (the API must be served again)."""
    import socket

    from appliance.watchdog import api

    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        assert not api.accepting(lst.fileno())
        lst.listen()
        assert api.accepting(lst.fileno())
        lst.shutdown(socket.SHUT_RDWR)
        assert not api.accepting(lst.fileno())
        assert lst.fileno() >= 0  # still open: borrowed, never closed by the check
    assert not api.accepting(10_000)  # no such descriptor


def test_a_server_with_no_socket_left_is_not_serving() -> None:
    """uvloop may close the listener before the daemon looks at the new server: its
    `sockets` is then empty, which must not read as "every socket still listens"."""
    from types import SimpleNamespace

    from appliance.watchdog import api

    assert not api.Server(SimpleNamespace(sockets=[])).listening()  # type: ignore[arg-type]
