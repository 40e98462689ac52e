"""The checks: what each one probes, how an answer is judged, and which unit it restarts.

Every check runs under the configured timeout and proves that the service answers (an HTTP
request, a WebSocket handshake, a PostgreSQL startup packet: a TCP connect alone is
completed by the kernel for a stopped process); an answer slower than `slow` is a WARNING.
Checks of things that are not there yet (no live color, PgBouncer not set up) are IDLE.
A check the watchdog could not run (its own fault, appliance.watchdog.faults) is UNKNOWN."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from appliance import acme, nft
from appliance.colors import LIVE_ADDR
from appliance.errors import AipbxError
from appliance.services import Services
from appliance.watchdog import meminfo, probes
from appliance.watchdog.backoff import Clock
from appliance.watchdog.faults import own_fault
from appliance.watchdog.model import Result, Status
from appliance.watchdog.settings import Settings
from appliance.watchdog.watches import CertWatch, FileWatch, RenewalWatch, UnitWatch

log = logging.getLogger("aipbx.watchdog")

BACKEND_HTTP = "backend_http"
BACKEND_WS = "backend_ws"
NGINX = "nginx"
POSTGRESQL = "postgresql"
PGBOUNCER = "pgbouncer"
DISK = "disk"
MEMORY = "memory"
CERT = "cert"
BACKUP = "backup"
CERT_RENEWAL = "cert_renewal"
SWITCH = "switch"
ALL_CHECKS = (
    BACKEND_HTTP,
    BACKEND_WS,
    NGINX,
    POSTGRESQL,
    PGBOUNCER,
    DISK,
    MEMORY,
    CERT,
    BACKUP,
    CERT_RENEWAL,
    SWITCH,
)

NGINX_UNIT = "nginx.service"
# Debian's wrapper: restarting it restarts its clusters, but it runs no process itself; a
# hung cluster is killed through its own unit (Targets.postgres_cluster).
POSTGRESQL_UNIT = "postgresql.service"
PGBOUNCER_UNIT = "aipbx-pgbouncer.service"
# What nginx answers itself (204) on its loopback service listener (nginx/site.conf.j2).
NGINX_HEALTH_PATH = "/aipbx-health"
# Not a unit: the nft table that is the blue/green switch, "restarted" by applying it again
# from state.json (appliance.reconcile.network).
SWITCH_UNIT = "nft table inet aipbx"
HTTP_PATH = "/api"
# How often PgBouncer is asked whether it still listens on every color's address (it binds
# them only when it starts); also after each restart and from any failure on.
ADDRESSES_EVERY_S = 10.0
T = TypeVar("T")
WS_PATH = "/socket.io/?EIO=4&transport=websocket"


@dataclass(frozen=True)
class Targets:
    """Where each check looks, as of now (the live color changes with upgrades)."""

    color: str | None  # the live color; None: the backend checks are idle
    backend_host: str
    backend_unit: str
    http_port: int
    ws_port: int
    nginx_port: int
    postgres_port: int
    pgbouncer_port: int
    pgbouncer_set_up: bool
    db_user: str
    db_name: str
    disk_paths: tuple[Path, ...]
    cert: Path | None
    host: str = "127.0.0.1"  # where PostgreSQL and PgBouncer answer
    backup_status: Path | None = None  # backup-status.json; None: not watched
    renewal_status: Path | None = None  # cert-renewal.json; None: not watched
    nginx_host: str = "127.0.0.1"  # nginx's service listener (nginx_port) answers here
    # The unit that runs the cluster on postgres_port (postgresql@15-main.service).
    postgres_cluster: str | None = None
    # Every address PgBouncer must listen on besides `host`, each with the unit that puts
    # it on the host (the colors' veths: aipbx-netns@COLOR.service).
    pgbouncer_listen: tuple[tuple[str, str], ...] = ()


def unit_of(check: str, t: Targets) -> str | None:
    """The unit a check's breaker restarts (None: nothing to restart)."""
    if check in (BACKEND_HTTP, BACKEND_WS):
        return t.backend_unit if t.color else None
    if check == SWITCH:
        return SWITCH_UNIT if t.color else None
    return {NGINX: NGINX_UNIT, POSTGRESQL: POSTGRESQL_UNIT, PGBOUNCER: PGBOUNCER_UNIT}.get(check)


def target_of(check: str, t: Targets) -> str:
    """What a check looks at; when it changes, the check starts afresh (a new breaker)."""
    if check in (BACKEND_HTTP, BACKEND_WS):
        return f"{t.color}@{t.backend_host}" if t.color else ""
    return ""


def judge_answer(latency: float, slow: float, detail: str) -> Result:
    if latency > slow:
        error = f"slow: answered in {latency:.2f} s (over {slow:g} s)"
        return Result(Status.WARNING, latency, error, detail)
    return Result(Status.OK, latency, "", detail)


def disk_level(free_pct: float, warn_pct: int, crit_pct: int) -> Status:
    if free_pct < crit_pct:
        return Status.CRITICAL
    if free_pct < warn_pct:
        return Status.WARNING
    return Status.OK


def cert_level(days_left: int, warn_days: int, crit_days: int) -> Status:
    if days_left <= crit_days:
        return Status.CRITICAL
    if days_left <= warn_days:
        return Status.WARNING
    return Status.OK


def _listens_too(answered: Result, addrs: list[str]) -> Result:
    if addrs and answered.status is Status.OK:
        return replace(answered, detail=f"{answered.detail}; listens on {', '.join(addrs)} too")
    return answered


def describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, asyncio.IncompleteReadError):
        return "closed the connection without answering"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


def _load_backup_status(path: Path) -> dict[str, object]:
    from appliance.backup_status import load_status_file  # only once a status file exists

    return load_status_file(path)


class Checks:
    def __init__(self, settings: Settings, services: Services, clock: Clock) -> None:
        self.s = settings
        self.clock = clock
        # Spawning systemctl costs more CPU than a whole round of checks; the port is probed
        # every round, the unit's state asked once a minute.
        self.units = UnitWatch(services, ttl=max(60.0, settings.interval), clock=clock)
        self.certs = CertWatch()
        self._fns: dict[str, Callable[[Targets], Awaitable[Result]]] = {
            BACKEND_HTTP: self.backend_http,
            BACKEND_WS: self.backend_ws,
            NGINX: self.nginx,
            POSTGRESQL: self.postgresql,
            PGBOUNCER: self.pgbouncer,
            DISK: self.disk,
            MEMORY: self.memory,
            CERT: self.cert,
            BACKUP: self.backup,
            CERT_RENEWAL: self.cert_renewal,
            SWITCH: self.switch,
        }
        self.backups = FileWatch(_load_backup_status)
        self.renewals = RenewalWatch(ttl=max(60.0, settings.interval), clock=clock)
        # When PgBouncer's addresses were last all found listening (None: look next time).
        self._addrs_seen: float | None = None

    def recheck_addresses(self) -> None:
        """A unit was restarted: the next pgbouncer check looks at every address again."""
        self._addrs_seen = None

    async def run(self, check: str, t: Targets) -> Result:
        """One check, never raising, never longer than the timeout."""
        start = self.clock()
        try:
            # Not wait_for: that runs the check in a task of its own, every round.
            async with asyncio.timeout(self.s.timeout):
                return await self._fns[check](t)
        except TimeoutError:
            error = f"no answer within {self.s.timeout:g} s"
            return Result(Status.CRITICAL, self.clock() - start, error, timed_out=True)
        except Exception as e:
            fault = own_fault(e)
            if fault is not None:  # the watchdog's, not the service's
                return Result(Status.UNKNOWN, error=fault)
            if isinstance(e, probes.ProbeBusy):  # alive and serving, but full
                error = f"turns new clients away: {e}"
                return Result(Status.WARNING, self.clock() - start, error)
            if isinstance(e, OSError | EOFError | probes.ProbeError | AipbxError):
                return Result(Status.CRITICAL, self.clock() - start, describe(e))
            # a bug in a check must not stop the others
            log.exception("check %s failed unexpectedly", check)
            return Result(Status.CRITICAL, None, f"check failed: {type(e).__name__}: {e}")

    async def _timed(self, probe: Awaitable[T]) -> tuple[T, float]:
        start = self.clock()
        seen = await probe
        return seen, self.clock() - start

    async def switch(self, t: Targets) -> Result:
        """The blue/green switch: nginx reaches the live color at 127.203.0.1, which the nft
        table DNATs (UDP calls go through the same table). A flushed ruleset (`systemctl
        restart nftables`, `nft flush ruleset`) takes it away: nginx gets connection refused
        and new calls go nowhere, while the backend checks, which go to the color directly,
        see nothing wrong. A connect through the address each round; the table itself is
        read only when that fails (the backend may simply be down)."""
        if not t.color:
            return Result(Status.IDLE, detail="no live color")
        try:
            await probes.tcp_connect(LIVE_ADDR, t.http_port)
            return Result(Status.OK, detail=f"{LIVE_ADDR}:{t.http_port} reaches {t.color}")
        except OSError as e:
            if own_fault(e) is not None:
                raise  # not a missing table: the watchdog could not try
        table = await asyncio.to_thread(nft.listed)
        if not table:
            return Result(Status.CRITICAL, error="the nft switch table inet aipbx is missing")
        if t.backend_host not in table:
            error = f"the nft switch table does not send to {t.color} ({t.backend_host})"
            return Result(Status.CRITICAL, error=error)
        return Result(Status.OK, detail=f"the table sends to {t.color}; its backend is down")

    async def backend_http(self, t: Targets) -> Result:
        if not t.color:
            return Result(Status.IDLE, detail="no live color")
        req = probes.get_request(t.backend_host, t.http_port, HTTP_PATH)
        code, latency = await self._timed(probes.http_status(t.backend_host, t.http_port, req))
        if code >= 500:
            return Result(Status.CRITICAL, latency, f"GET {HTTP_PATH}: HTTP {code}")
        return judge_answer(latency, self.s.slow, f"{t.color}: GET {HTTP_PATH}: HTTP {code}")

    async def backend_ws(self, t: Targets) -> Result:
        if not t.color:
            return Result(Status.IDLE, detail="no live color")
        req = probes.websocket_request(t.backend_host, t.ws_port, WS_PATH)
        code, latency = await self._timed(probes.http_status(t.backend_host, t.ws_port, req))
        if code != 101:
            return Result(Status.CRITICAL, latency, f"WebSocket handshake: HTTP {code}, not 101")
        return judge_answer(latency, self.s.slow, f"{t.color}: WebSocket handshake: 101")

    async def nginx(self, t: Targets) -> Result:
        """A request nginx answers itself (204), on its loopback service listener: a stopped
        nginx (SIGSTOP) still has its connections completed by the kernel, never answered.
        Any HTTP answer proves nginx runs; the 204 says the site is the current one."""
        active = self.units.active(NGINX_UNIT)
        req = probes.get_request(t.nginx_host, t.nginx_port, NGINX_HEALTH_PATH)
        code, latency = await self._timed(probes.http_status(t.nginx_host, t.nginx_port, req))
        if active is False:
            return Result(Status.CRITICAL, latency, f"{NGINX_UNIT} is not active")
        detail = f"GET {NGINX_HEALTH_PATH}: HTTP {code}"
        if code != 204:
            detail += " (not 204: the site predates it; `aipbxctl setup` renders it again)"
        return judge_answer(latency, self.s.slow, detail)

    async def _pg(self, host: str, port: int, t: Targets) -> Result:
        probe = probes.pg_startup(host, port, t.db_user, t.db_name)
        seen, latency = await self._timed(probe)
        return judge_answer(latency, self.s.slow, f"port {port}: {seen}")

    async def postgresql(self, t: Targets) -> Result:
        return await self._pg(t.host, t.postgres_port, t)

    async def pgbouncer(self, t: Targets) -> Result:
        """PgBouncer answers on `host`, and listens on every color's veth address too: one
        that started before a veth was up runs without that address (it binds each one
        once, at start; a reload does not bind again) and the color cannot reach its
        database. An address missing from the host is its netns unit's to repair.

        PgBouncer binds its addresses only when it starts, so they are looked at every
        ADDRESSES_EVERY_S, after each restart the watchdog makes, and every round from any
        failure until they all listen again; the answer on `host` is asked every round."""
        if not t.pgbouncer_set_up:
            return Result(Status.IDLE, detail="not set up yet (aipbxctl setup)")
        addrs = [addr for addr, _ in t.pgbouncer_listen]
        now = self.clock()
        seen, self._addrs_seen = self._addrs_seen, None  # kept only if PgBouncer answers
        if seen is not None and now - seen < ADDRESSES_EVERY_S:
            answered = await self._pg(t.host, t.pgbouncer_port, t)
            self._addrs_seen = seen
            return _listens_too(answered, addrs)
        for addr, unit in t.pgbouncer_listen:
            if not probes.address_on_host(addr):
                error = f"{addr} is not on this host ({unit} is down or lost its veth)"
                return Result(Status.CRITICAL, error=error, unit=unit)
        answered, listening = await asyncio.gather(
            self._pg(t.host, t.pgbouncer_port, t), self._listening(addrs, t.pgbouncer_port)
        )
        missing = [a for a, ok in zip(addrs, listening, strict=True) if not ok]
        if missing:
            where = ", ".join(f"{a}:{t.pgbouncer_port}" for a in missing)
            error = f"PgBouncer does not listen on {where} (it started before the address was up)"
            return Result(Status.CRITICAL, answered.latency, error)
        self._addrs_seen = now
        return _listens_too(answered, addrs)

    async def _listening(self, addrs: list[str], port: int) -> list[bool]:
        """Whether something listens on each addr:port (addresses of this host: the kernel
        answers at once, accepted or refused)."""

        async def listens(addr: str) -> bool:
            try:
                await probes.tcp_connect(addr, port)
            except ConnectionRefusedError:
                return False
            return True

        return list(await asyncio.gather(*(listens(a) for a in addrs)))

    async def disk(self, t: Targets) -> Result:
        seen: list[tuple[float, str]] = []
        for path in t.disk_paths:
            try:
                st = os.statvfs(path)
            except FileNotFoundError:
                continue
            free = 100.0 * st.f_bavail / st.f_blocks if st.f_blocks else 100.0
            seen.append((free, f"{path} {free:.0f}% free"))
        if not seen:
            return Result(Status.IDLE, detail="none of the watched directories exists")
        status = max(
            (disk_level(free, self.s.disk_warn_pct, self.s.disk_crit_pct) for free, _ in seen),
            key=[Status.OK, Status.WARNING, Status.CRITICAL].index,
        )
        text = ", ".join(d for _, d in seen)
        if status is Status.OK:
            return Result(status, detail=text)
        low = ", ".join(d for free, d in seen if free < self.s.disk_warn_pct)
        return Result(status, error=f"low disk space: {low}", detail=text)

    async def memory(self, t: Targets) -> Result:
        used = meminfo.read_used_pct()
        text = f"{used:.0f}% of memory used"
        if used > self.s.memory_warn_pct:
            return Result(Status.WARNING, error=f"memory: {text}", detail=text)
        return Result(Status.OK, detail=text)

    async def cert(self, t: Targets) -> Result:
        if t.cert is None or not t.cert.exists():
            return Result(Status.CRITICAL, error=f"no TLS certificate at {t.cert}")
        info, expires = await self.certs.info(t.cert)
        days = (expires - datetime.now(UTC)).days  # as CertInfo.days_left, without strptime
        status = cert_level(days, self.s.cert_warn_days, self.s.cert_crit_days)
        text = f"{t.cert} expires in {days} days ({info.not_after})"
        error = "" if status is Status.OK else f"certificate {text}"
        return Result(status, error=error, detail=text)

    async def backup(self, t: Targets) -> Result:
        """The last daily or manual backup: CRITICAL when it failed (no restart: an alert),
        WARNING when the newest good one is old."""
        from appliance.backup_status import judge

        if t.backup_status is None:
            return Result(Status.IDLE, detail="not watched")
        level, error, detail = judge(self.backups.doc(t.backup_status), time.time())
        return Result(Status(level), error=error, detail=detail)

    async def cert_renewal(self, t: Targets) -> Result:
        """certbot's last renewal: a WARNING when it failed (the old certificate still
        serves; the `cert` check escalates as its end nears). No unit to restart."""
        if t.renewal_status is None:
            return Result(Status.IDLE, detail="not watched")
        doc = self.renewals.doc(t.renewal_status)
        level, error, detail = acme.judge_renewal(doc, self.renewals.unit())
        return Result(Status(level), error=error, detail=detail)
