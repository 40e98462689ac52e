"""The watchdog's PostgreSQL and PgBouncer checks against real servers (initdb in a temp
dir, our rendered PgBouncer config): a startup packet answered with an authentication
request is healthy, and neither server logs anything about the probe hanging up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from appliance import pgbouncer
from appliance.config import Database
from appliance.watchdog.checks import Checks, Targets
from appliance.watchdog.model import Result, Status
from appliance.watchdog.settings import Settings
from tests.integration import test_nginx_site as nginx_site
from tests.integration.procs import PG_BIN, as_postgres, free_port, port_open, stop, wait_for
from tests.integration.test_watchdog_loop import FakeBackend, FakeServices

pytestmark = pytest.mark.integration

SCRAM_NOSYNC = ("--auth-host=scram-sha-256", "--no-sync")


@dataclass
class Servers:
    db: Database
    pg: subprocess.Popen[bytes]
    bouncer: subprocess.Popen[bytes]
    pg_log: Path
    bouncer_log: Path


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    work = Path(tempfile.mkdtemp(prefix="aipbx-wd-pg-"))
    pg_user = pwd.getpwnam("postgres")
    os.chown(work, pg_user.pw_uid, pg_user.pw_gid)
    db = replace(Database(), postgres_port=free_port(), pgbouncer_port=free_port(), pool_size=2)
    data = work / "data"
    as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "--auth-local=peer", *SCRAM_NOSYNC])
    pg_log = work / "pg.log"
    with pg_log.open("wb") as out:
        # As postgres itself (not under runuser): the PID this test stops is the server's.
        pg = subprocess.Popen(
            [
                *(str(PG_BIN / "postgres"), "-D", str(data)),
                *("-p", str(db.postgres_port), "-k", str(work), "-c", "listen_addresses=127.0.0.1"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            user=pg_user.pw_uid,
            group=pg_user.pw_gid,
            extra_groups=[],
            cwd=work,
        )
    bouncer: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: port_open(db.postgres_port), what="postgres")
        sql = (
            "SET password_encryption = 'scram-sha-256';\n"
            f"CREATE ROLE {db.user} LOGIN PASSWORD 'pw';\n"
            f"CREATE DATABASE {db.name} OWNER {db.user};\n"
        )
        as_postgres(
            [
                *("psql", "-X", "-q", "-h", str(work), "-p", str(db.postgres_port)),
                *("-d", "postgres", "-v", "ON_ERROR_STOP=1"),
            ],
            input=sql,
        )
        userlist = work / "userlist.txt"
        userlist.write_text(pgbouncer.render_userlist(db.user, "pw"))
        ini = work / "pgbouncer.ini"
        ini.write_text(pgbouncer.render_ini(db, listen=["127.0.0.1"], userlist=str(userlist)))
        bouncer_log = work / "pgbouncer.log"
        with bouncer_log.open("wb") as out:
            bouncer = subprocess.Popen(
                ["pgbouncer", str(ini)],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=pg_user.pw_uid,
                group=pg_user.pw_gid,
                extra_groups=[],
                cwd=work,
            )
        wait_for(lambda: port_open(db.pgbouncer_port), what="pgbouncer")
        yield Servers(db, pg, bouncer, pg_log, bouncer_log)
    finally:
        if bouncer is not None:
            stop(bouncer)
        stop(pg)
        shutil.rmtree(work)


def targets(db: Database, **changes: object) -> Targets:
    t = Targets(
        color=None,
        backend_host="",
        backend_unit="",
        http_port=1,
        ws_port=1,
        nginx_port=free_port(),
        postgres_port=db.postgres_port,
        pgbouncer_port=db.pgbouncer_port,
        pgbouncer_set_up=True,
        db_user=db.user,
        db_name=db.name,
        disk_paths=(),
        cert=None,
    )
    return replace(t, **changes)  # type: ignore[arg-type]


def check(name: str, t: Targets, settings: Settings | None = None) -> Result:
    settings = settings or Settings(timeout=2, slow=1)
    services = FakeServices(FakeBackend(0, 0))

    async def once() -> Result:
        return await Checks(settings, services, time.monotonic).run(name, t)

    return asyncio.run(once())


def test_postgresql_and_pgbouncer_answer_and_log_nothing(servers: Servers) -> None:
    pg_before = servers.pg_log.read_text()
    bouncer_before = servers.bouncer_log.read_text()
    for _ in range(5):
        r = check("postgresql", targets(servers.db))
        assert r.status is Status.OK, r
        assert r.detail == f"port {servers.db.postgres_port}: authentication requested"
        assert r.latency is not None and r.latency < 1
        r = check("pgbouncer", targets(servers.db))
        assert r.status is Status.OK, r
    time.sleep(0.5)
    assert servers.pg_log.read_text() == pg_before
    assert servers.bouncer_log.read_text() == bouncer_before


def test_an_error_answer_is_critical_with_its_message() -> None:
    """What PostgreSQL says while it recovers: an ErrorResponse instead of an auth request."""
    import socket
    import struct
    import threading

    body = b"SFATAL\0C57P03\0Mthe database system is starting up\0\0"
    answer = b"E" + struct.pack("!I", len(body) + 4) + body
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)

        def serve() -> None:
            conn, _ = s.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(answer)

        server = threading.Thread(target=serve)
        server.start()
        r = check("postgresql", targets(replace(Database(), postgres_port=s.getsockname()[1])))
        server.join(5)
    assert (r.status, r.error) == (Status.CRITICAL, "the database system is starting up")


def test_not_set_up_pgbouncer_is_idle_and_closed_ports_are_critical(servers: Servers) -> None:
    assert check("pgbouncer", targets(servers.db, pgbouncer_set_up=False)).status is Status.IDLE
    closed = free_port()
    r = check("postgresql", targets(servers.db, postgres_port=closed))
    assert (r.status, r.error) == (Status.CRITICAL, "connection refused")
    r = check("nginx", targets(servers.db, nginx_port=closed))
    assert (r.status, r.error) == (Status.CRITICAL, "connection refused")


def test_a_listener_that_never_answers_times_out() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel completes the handshake; nobody ever reads
        port = s.getsockname()[1]
        db = replace(Database(), postgres_port=port)
        started = time.monotonic()
        r = check("postgresql", targets(db), Settings(timeout=0.3, slow=0.2))
        took = time.monotonic() - started
    assert (r.status, r.error) == (Status.CRITICAL, "no answer within 0.3 s")
    assert took < 1.0


def make_cert(path: Path, days: int) -> None:
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", str(days), "-subj", "/CN=pbx.example.test"),
            *("-keyout", str(path.with_suffix(".key")), "-out", str(path)),
        ],
        check=True,
        capture_output=True,
    )


def test_certificate_expiry_levels_and_renewal_is_noticed(tmp_path: Path) -> None:
    crt = tmp_path / "tls.crt"
    services = FakeServices(FakeBackend(0, 0))
    checks = Checks(Settings(), services, time.monotonic)
    t = targets(Database(), cert=crt)

    async def run() -> Result:
        return await checks.run("cert", t)

    async def scenario() -> list[Result]:
        out = []
        for days in (90, 10, 2):
            make_cert(crt, days)
            out.append(await run())
        return out

    ok, warning, critical = asyncio.run(scenario())
    assert ok.status is Status.OK and "expires in 89 days" in ok.detail
    assert warning.status is Status.WARNING and "expires in 9 days" in warning.error
    assert critical.status is Status.CRITICAL and "expires in 1 days" in critical.error
    crt.unlink()
    missing = asyncio.run(run())
    assert missing.status is Status.CRITICAL and "no TLS certificate" in missing.error


# --- a stopped process (SIGSTOP): the kernel still completes its TCP handshakes ----------


def _tree(pid: int) -> list[int]:
    import psutil

    p = psutil.Process(pid)
    return [p.pid, *(c.pid for c in p.children(recursive=True))]


@contextlib.contextmanager
def sigstopped(pid: int) -> Iterator[None]:
    """SIGSTOP a process we started and all its children (master and workers, postmaster
    and backends); SIGCONT them after, whatever happens."""
    pids = _tree(pid)
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)


QUICK = Settings(timeout=0.5, slow=0.4)


def _hangs(name: str, t: Targets) -> None:
    r = check(name, t, QUICK)
    assert (r.status, r.timed_out, r.error) == (Status.CRITICAL, True, "no answer within 0.5 s")


def test_a_stopped_postgresql_or_pgbouncer_fails_within_the_timeout(servers: Servers) -> None:
    t = targets(servers.db)
    for name, proc in (("postgresql", servers.pg), ("pgbouncer", servers.bouncer)):
        assert check(name, t).status is Status.OK
        with sigstopped(proc.pid):
            _hangs(name, t)
        wait_for(lambda n=name: check(n, t).status is Status.OK, what=f"{name} back")  # type: ignore[misc]


def test_a_stopped_backend_fails_both_its_checks_within_the_timeout() -> None:
    backend = FakeBackend(free_port(), free_port())
    backend.start()
    try:
        t = replace(
            targets(Database()),
            color="blue",
            backend_host="127.0.0.1",
            http_port=backend.http_port,
            ws_port=backend.ws_port,
        )
        assert check("backend_http", t).status is Status.OK
        assert check("backend_ws", t).status is Status.OK
        assert backend.proc is not None
        with sigstopped(backend.proc.pid):
            _hangs("backend_http", t)
            _hangs("backend_ws", t)
    finally:
        backend.kill()


def test_a_stopped_nginx_fails_within_the_timeout() -> None:
    """Item 8: the check asks nginx's loopback service listener for /aipbx-health, which
    nginx answers itself (204), so a stopped nginx (master and workers) is found out."""
    www_root = Path(tempfile.mkdtemp(prefix="aipbx-wd-nginx-"))
    www_root.chmod(0o755)  # nginx's unprivileged workers traverse it
    proc, ports = nginx_site._start(www_root, None)
    try:
        t = targets(Database(), nginx_port=ports["svc_http"])
        r = check("nginx", t)
        assert (r.status, r.detail) == (Status.OK, "GET /aipbx-health: HTTP 204"), r
        with sigstopped(proc.pid):
            _hangs("nginx", t)
        assert check("nginx", t).status is Status.OK
    finally:
        stop(proc)
        shutil.rmtree(www_root)


# --- PgBouncer must listen on every address it should (item 10) ---------------------------


def test_pgbouncer_not_listening_on_an_address_of_the_host_is_critical(
    servers: Servers,
) -> None:
    """The real PgBouncer listens on 127.0.0.1 only. An address that is on the host but
    that it does not listen on (as a color's veth that came up after it started) is
    critical, to be repaired by restarting PgBouncer; an address missing from the host is
    its namespace unit's to repair."""
    listen = (("127.0.0.3", "aipbx-netns@blue.service"),)
    r = check("pgbouncer", targets(servers.db, pgbouncer_listen=listen))
    assert r.status is Status.CRITICAL and r.unit is None, r
    assert r.error.startswith(f"PgBouncer does not listen on 127.0.0.3:{servers.db.pgbouncer_port}")
    gone = (("192.0.2.77", "aipbx-netns@green.service"),)  # TEST-NET-1: on no host
    r = check("pgbouncer", targets(servers.db, pgbouncer_listen=gone))
    assert (r.status, r.unit) == (Status.CRITICAL, "aipbx-netns@green.service"), r
    assert r.error.startswith("192.0.2.77 is not on this host")
