"""The sample backend, built by sample_backend/build.sh, packed, verified and unpacked like a
real release, started with its manifest's command under gunicorn, against a real PostgreSQL
behind our PgBouncer in transaction pooling mode."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance import pgbouncer
from appliance.config import Database
from appliance.release.checksum import verify
from appliance.release.manifest import MANIFEST_NAME, load_manifest
from appliance.release.unpack import unpack
from tests.integration.procs import PG_BIN, as_postgres, free_port, port_open, stop, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VERSION = "9.8.7"
PASSWORD = "sample-pw"
# never through a proxy from the environment: everything here is on loopback
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def release() -> Iterator[Path]:
    out = Path(tempfile.mkdtemp(prefix="aipbx-sample-build-"))
    build = REPO / "sample_backend/build.sh"
    subprocess.run(["bash", str(build), str(out), VERSION], check=True, capture_output=True)
    artifact = out / f"aipbx-sample-{VERSION}.tar.gz"
    verify(artifact)
    yield unpack(artifact, out / "releases", max_bytes=10 * 1024 * 1024)
    shutil.rmtree(out)


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    """PostgreSQL (initdb in a temp dir) with PgBouncer in front in transaction pooling."""
    workdir = Path(tempfile.mkdtemp(prefix="aipbx-sample-pg-"))
    pg = pwd.getpwnam("postgres")
    os.chown(workdir, pg.pw_uid, pg.pw_gid)
    db = replace(Database(), postgres_port=free_port(), pgbouncer_port=free_port(), pool_size=2)
    assert db.pool_mode == "transaction"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        data = str(workdir / "data")
        auth = ["--auth-local=peer", "--auth-host=scram-sha-256"]
        as_postgres([str(PG_BIN / "initdb"), "-D", data, *auth, "--no-sync"])
        postgres = [str(PG_BIN / "postgres"), "-D", data]
        postgres += ["-p", str(db.postgres_port), "-k", str(workdir)]
        postgres += ["-c", "listen_addresses=127.0.0.1"]
        procs.append(subprocess.Popen(["runuser", "-u", "postgres", "--", *postgres]))
        wait_for(lambda: port_open(db.postgres_port), what="postgres")
        sql = (
            "SET password_encryption = 'scram-sha-256';\n"
            f"CREATE ROLE {db.user} LOGIN PASSWORD '{PASSWORD}';\n"
            f"CREATE DATABASE {db.name} OWNER {db.user};\n"
        )
        psql = ["psql", "-X", "-q", "-h", str(workdir), "-p", str(db.postgres_port)]
        as_postgres([*psql, "-d", "postgres", "-v", "ON_ERROR_STOP=1"], input=sql)
        userlist = workdir / "userlist.txt"
        userlist.write_text(pgbouncer.render_userlist(db.user, PASSWORD))
        ini = workdir / "pgbouncer.ini"
        ini.write_text(pgbouncer.render_ini(db, listen=["127.0.0.1"], userlist=str(userlist)))
        procs.append(subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbouncer", str(ini)]))
        wait_for(lambda: port_open(db.pgbouncer_port), what="pgbouncer")
        yield db
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(workdir)


def _query(db: Database, sql: str) -> list[list[str]]:
    where = ["-h", "127.0.0.1", "-p", str(db.pgbouncer_port), "-U", db.user, "-d", db.name]
    proc = subprocess.run(
        ["psql", "-X", "-At", "-F", "|", *where, "-c", sql],
        env={**os.environ, "PGPASSWORD": PASSWORD},
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.split("|") for line in proc.stdout.splitlines()]


@dataclass
class Sample:
    proc: subprocess.Popen[bytes]
    port: int
    ws_port: int
    udp_port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_sample(
    release: Path, db: Database | None, extra: dict[str, str], *, wait: bool = True
) -> Sample:
    """Start the release with its manifest's command from its directory, as the appliance
    does; SAMPLE_WS_PORT moves the hard-coded 3033 so tests may run side by side."""
    command = load_manifest(release / MANIFEST_NAME).command
    port, ws_port, udp_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "SAMPLE_WS_PORT": str(ws_port),
        "UDP_SERVER_PORT": str(udp_port),
        "AIPBX_COLOR": "green",
    }
    if db is not None:
        env |= {
            "DB_HOST": "127.0.0.1",
            "DB_PORT": str(db.pgbouncer_port),
            "DB_USER": db.user,
            "DB_PASS": PASSWORD,
            "DB_NAME": db.name,
        }
    env |= extra
    log = release.parent / f"sample-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(list(command), cwd=release, env=env, stdout=out, stderr=out)
    sample = Sample(proc, port, ws_port, udp_port, log)
    if wait:
        # the WebSocket port opens once the worker is up (after the database)
        wait_for(lambda: port_open(ws_port) or proc.poll() is not None, what="sample backend")
        assert proc.poll() is None, log.read_text()
    return sample


@pytest.fixture
def sample(release: Path, database: Database) -> Iterator[Sample]:
    s = start_sample(release, database, {})
    yield s
    stop(s.proc)


def http(
    method: str, url: str, body: Any = None, timeout: float = 5
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_health_and_writes(sample: Sample, database: Database) -> None:
    status, headers, body = http("GET", sample.url("/api"))
    assert status == 200
    assert json.loads(body) == {"ok": True, "version": VERSION, "color": "green"}
    assert headers["X-Aipbx-Version"] == VERSION

    row_id = str(uuid.uuid4())
    status, headers, body = http("POST", sample.url("/api/writes"), {"id": row_id})
    assert status == 200, body
    assert json.loads(body) == {"id": row_id, "version": VERSION, "stored_version": VERSION}
    assert headers["X-Aipbx-Version"] == VERSION
    assert _query(database, f"SELECT version, color FROM writes WHERE id = '{row_id}'") == [
        [VERSION, "green"]
    ]
    # a client retrying an acknowledged id gets it back, not a second row
    status, _, body = http("POST", sample.url("/api/writes"), {"id": row_id})
    assert status == 200 and json.loads(body)["stored_version"] == VERSION
    assert _query(database, f"SELECT count(*) FROM writes WHERE id = '{row_id}'") == [["1"]]

    many = [str(uuid.uuid4()) for _ in range(20)]
    for i in many:  # more writes than PgBouncer has server connections
        assert http("POST", sample.url("/api/writes"), {"id": i})[0] == 200
    listed = ",".join(f"'{i}'" for i in many)
    assert _query(database, f"SELECT count(*) FROM writes WHERE id IN ({listed})") == [["20"]]

    status, headers, body = http("POST", sample.url("/api/writes"), {"nope": 1})
    assert status == 400 and json.loads(body)["version"] == VERSION
    status, headers, _ = http("GET", sample.url("/api/nothing"))
    assert status == 404 and headers["X-Aipbx-Version"] == VERSION


async def _ws_pings(port: int, paths: list[str]) -> list[str]:
    answers = []
    async with aiohttp.ClientSession() as session:
        for path in paths:
            async with session.ws_connect(f"http://127.0.0.1:{port}{path}") as ws:
                await ws.send_str("ping")
                answers.append(await ws.receive_str(timeout=5))
    return answers


def test_websocket_ping_on_any_path(sample: Sample) -> None:
    paths = ["/socket.io/?EIO=4&transport=websocket", "/ws/", "/"]
    assert asyncio.run(_ws_pings(sample.ws_port, paths)) == [f"pong {VERSION}"] * 3
    status, headers, _ = http("GET", f"http://127.0.0.1:{sample.ws_port}/socket.io/")
    assert status == 400 and headers["X-Aipbx-Version"] == VERSION


def test_udp_echo_answers_each_source(sample: Sample) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
    ):
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
        a.sendto(b"call-a", ("127.0.0.1", sample.udp_port))
        b.sendto(b"call-b", ("127.0.0.1", sample.udp_port))
        assert a.recvfrom(100) == (f"{VERSION} call-a".encode(), ("127.0.0.1", sample.udp_port))
        assert b.recvfrom(100) == (f"{VERSION} call-b".encode(), ("127.0.0.1", sample.udp_port))


IN_FLIGHT = "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"


def test_sigterm_finishes_the_in_flight_write(release: Path, database: Database) -> None:
    s = start_sample(release, database, {"SAMPLE_WRITE_DELAY_S": "1.5"})
    row_id = str(uuid.uuid4())
    result: list[tuple[int, dict[str, str], bytes]] = []
    writer = threading.Thread(
        target=lambda: result.append(http("POST", s.url("/api/writes"), {"id": row_id}, 15))
    )
    try:
        writer.start()
        # the row is inserted, its transaction still open: the request is in flight
        wait_for(lambda: _query(database, IN_FLIGHT) != [["0"]], what="the write in flight")
        s.proc.send_signal(signal.SIGTERM)
        writer.join(15)
        assert result and result[0][0] == 200, result
        assert s.proc.wait(15) == 0
        assert not port_open(s.port)
        assert _query(database, f"SELECT version FROM writes WHERE id = '{row_id}'") == [[VERSION]]
    finally:
        stop(s.proc)


def test_fail_knobs(release: Path) -> None:
    """Bad releases for upgrade tests: failing health, failing later, failing at start."""
    failing = start_sample(release, None, {"SAMPLE_FAIL": "health"})
    later = start_sample(release, None, {"SAMPLE_FAIL": "after:1"})
    hung = start_sample(release, None, {"SAMPLE_FAIL": "hang-after:0"})
    dead = start_sample(release, None, {"SAMPLE_FAIL": "start"}, wait=False)
    try:
        status, headers, body = http("GET", failing.url("/api"))
        assert status == 500 and headers["X-Aipbx-Version"] == VERSION
        assert json.loads(body)["version"] == VERSION
        assert http("GET", later.url("/api"))[0] == 200
        wait_for(lambda: http("GET", later.url("/api"))[0] == 500, what="health to fail")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            http("GET", hung.url("/api"), timeout=1)
        assert time.monotonic() - started >= 1
        assert asyncio.run(_ws_pings(hung.ws_port, ["/"])) == [f"pong {VERSION}"]
        assert dead.proc.wait(15) == 1
        assert "SAMPLE_FAIL=start" in dead.log.read_text()
        # no database configured: writes are refused, not lost silently
        status, _, body = http("POST", failing.url("/api/writes"), {"id": "x"})
        assert status == 503 and json.loads(body)["error"] == "no database configured"
    finally:
        for s in (failing, later, hung, dead):
            stop(s.proc)
