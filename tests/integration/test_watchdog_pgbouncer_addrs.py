"""Issue 11, item 10, replayed with the real PgBouncer in a network namespace of its own
(`unshare -n`, so this host's addresses are left alone): PgBouncer started before a
color's address was up runs without it, a reload does not bind it, a restart does; the
watchdog's pgbouncer check says critical until then, and ok after."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.procs import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADDR = "10.203.77.1"  # the host end of a color's veth, inside the private namespace

SCRIPT = r"""
import asyncio, json, os, signal, subprocess, sys, time
from dataclasses import replace
from appliance.watchdog.checks import Checks, Targets
from appliance.watchdog.settings import Settings
from tests.integration.test_watchdog_loop import FakeBackend, FakeServices

work, port, addr = sys.argv[1], int(sys.argv[2]), sys.argv[3]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
t = Targets(
    color=None, backend_host="", backend_unit="", http_port=1, ws_port=1, nginx_port=1,
    postgres_port=1, pgbouncer_port=port, pgbouncer_set_up=True, db_user="aipbx_user",
    db_name="aipbx_production", disk_paths=(), cert=None,
    pgbouncer_listen=((addr, "aipbx-netns@green.service"),),
)
checks = Checks(Settings(timeout=2, slow=1), FakeServices(FakeBackend(0, 0)), time.monotonic)

def check():
    r = asyncio.run(checks.run("pgbouncer", t))
    return {"status": str(r.status), "error": r.error, "unit": r.unit}

def start():
    p = subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbouncer", f"{work}/pgbouncer.ini"])
    for _ in range(100):
        if subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                          text=True).stdout.strip():
            return p
        time.sleep(0.05)
    raise SystemExit("pgbouncer did not start")

def pgbouncer_pid(p):
    out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out.split() else p.pid

seen = {}
bouncer = start()  # the address is not up yet: as at a boot where the veth came late
seen["address_missing"] = check()
subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
seen["started_before"] = check()
os.kill(pgbouncer_pid(bouncer), signal.SIGHUP)
time.sleep(0.5)
seen["after_reload"] = check()
bouncer.terminate(); bouncer.wait(10)
bouncer = start()
seen["after_restart"] = check()
bouncer.terminate(); bouncer.wait(10)
print(json.dumps(seen))
"""


def test_pgbouncer_started_before_the_veth_is_found_and_a_restart_repairs_it() -> None:
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    from appliance import pgbouncer
    from appliance.config import Database

    work = Path(tempfile.mkdtemp(prefix="aipbx-wd-bouncer-"))
    try:
        pg = pwd.getpwnam("postgres")
        os.chown(work, pg.pw_uid, pg.pw_gid)
        db = replace(Database(), pgbouncer_port=free_port(), postgres_port=free_port())
        (work / "userlist.txt").write_text(pgbouncer.render_userlist(db.user, "pw"))
        ini = pgbouncer.render_ini(
            db, listen=["127.0.0.1", ADDR], userlist=str(work / "userlist.txt")
        )
        (work / "pgbouncer.ini").write_text(ini)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [
                "unshare",
                "-n",
                sys.executable,
                "-c",
                SCRIPT,
                str(work),
                str(db.pgbouncer_port),
                ADDR,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(work)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    missing = seen["address_missing"]
    assert missing["status"] == "critical" and missing["unit"] == "aipbx-netns@green.service"
    assert missing["error"].startswith(f"{ADDR} is not on this host")
    for phase in ("started_before", "after_reload"):
        r = seen[phase]
        assert r["status"] == "critical" and r["unit"] is None, (phase, r)
        assert r["error"].startswith(f"PgBouncer does not listen on {ADDR}:"), (phase, r)
    assert seen["after_restart"]["status"] == "ok", seen
