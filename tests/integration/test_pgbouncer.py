"""Our rendered PgBouncer config in front of a real PostgreSQL (initdb in a temp dir), SCRAM
on both sides, with the role made by the same SQL `aipbxctl setup` uses."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance import pgbouncer
from appliance.config import Database
from tests.integration.procs import (
    create_app_database,
    free_port,
    port_open,
    postgres_cluster,
    stop,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="aipbx-pg-it-"))
    pg = pwd.getpwnam("postgres")
    os.chown(d, pg.pw_uid, pg.pw_gid)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def postgres(workdir: Path) -> Iterator[int]:
    with postgres_cluster(workdir) as port:
        yield port


def test_pgbouncer_scram_in_front_of_postgres(workdir: Path, postgres: int) -> None:
    db = replace(Database(), postgres_port=postgres, pgbouncer_port=free_port(), pool_size=2)
    password = "p@ss'w\"ord"
    create_app_database(workdir, postgres, db.user, db.name, password)
    userlist = workdir / "userlist.txt"
    userlist.write_text(pgbouncer.render_userlist(db.user, password))
    ini = workdir / "pgbouncer.ini"
    ini.write_text(pgbouncer.render_ini(db, listen=["127.0.0.1"], userlist=str(userlist)))
    bouncer = subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbouncer", str(ini)])
    try:
        wait_for(lambda: port_open(db.pgbouncer_port), what="pgbouncer")

        def psql(pw: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "psql",
                    "-X",
                    "-At",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(db.pgbouncer_port),
                    "-U",
                    db.user,
                    "-d",
                    db.name,
                    "-c",
                    "CREATE TABLE IF NOT EXISTS t(x int); INSERT INTO t VALUES (1); "
                    "SELECT count(*) FROM t",
                ],
                env={**os.environ, "PGPASSWORD": pw},
                capture_output=True,
                text=True,
                check=False,
            )

        ok = psql(password)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip().splitlines()[-1] == "1"
        bad = psql("wrong")
        assert bad.returncode != 0
        assert "authentication failed" in bad.stderr
    finally:
        stop(bouncer)
