"""Issue 6 in a booted Debian 12: PostgreSQL and PgBouncer as `aipbxctl setup` leaves them
(loopback and the colors' veths only, SCRAM, a pool of 20 serving 200 clients), daily
verified backups with retention and a watchdog alert when one fails, a restore that gives
back exactly the rows while the API answers 503 + Retry-After, a truncated backup refused
with nothing changed, failing migrations that leave the database as it was (by their
transaction, or by the pre-upgrade backup), and --restore-db. The tests run in order on
one machine, with the sample backend (v1.0.0) live."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.system.appliance import aipbxctl_json, assert_no_failed_units, install, wait_until
from tests.system.machine import Machine

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
SAMPLE_DIR = Path(os.environ.get("AIPBX_SAMPLE_DIR", HERE.parents[1] / "build" / "sample"))
V1 = "/root/aipbx-sample-1.0.0.tar.gz"
DB = "aipbx_production"
BACKUPS = "/var/backups/aipbx"
CONF = "/etc/aipbx/aipbx.toml"
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
CHECKSUM = "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM writes t"

PSQL = ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]
PSQL_AS_POSTGRES = ["runuser", "-u", "postgres", "--", *PSQL]

FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path) -> None:
    for v in ("1.0.0", "2.0.0"):
        for suffix in ("", ".sha256"):
            src = SAMPLE_DIR / f"aipbx-sample-{v}.tar.gz{suffix}"
            if not src.is_file():
                pytest.fail(f"{src} is missing: run `make sample`", pytrace=False)
            shutil.copy(src, machine.path("/root") / src.name)
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)
    aipbxctl_json(machine, "upgrade", V1, "--probation", "1", "--drain", "1", "--yes")


# --- helpers ----------------------------------------------------------------------------------


def sql(machine: Machine, query: str, db: str = DB) -> str:
    r = machine.run([*PSQL_AS_POSTGRES, "-d", db, "-c", query])
    return r.stdout.strip()


def db_password(machine: Machine) -> str:
    for line in machine.path("/etc/aipbx/secrets.env").read_text().splitlines():
        if line.startswith("DB_PASS="):
            return line.split("=", 1)[1]
    raise AssertionError("no DB_PASS in secrets.env")


def app_sql(machine: Machine, query: str, port: int = 6432, db: str = DB) -> str:
    """As the application's role, over TCP (PgBouncer by default), with its password."""
    r = machine.run(
        [*PSQL, "-h", "127.0.0.1", "-p", str(port), "-U", "aipbx_user", "-d", db, "-c", query],
        env={"PGPASSWORD": db_password(machine)},
    )
    return r.stdout.strip()


def checksum(machine: Machine) -> str:
    return sql(machine, CHECKSUM)


def tables(machine: Machine) -> list[str]:
    return sql(machine, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").split()


def api(machine: Machine, url: str = "https://127.0.0.1/api/") -> tuple[int, dict[str, str], str]:
    r = machine.run(["curl", "-sk", "-i", "--max-time", "3", url], check=False)
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    if not lines:
        return 0, {}, r.stderr
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def api_version(machine: Machine) -> str:
    status, _, body = api(machine, "http://127.0.0.1:5005/api")
    try:
        return str(json.loads(body)["version"]) if status == 200 else f"HTTP {status}"
    except (ValueError, KeyError):
        return f"no version in {body[:100]!r}"


def write_rows(machine: Machine, prefix: str, n: int) -> None:
    machine.sh(
        f"for i in $(seq 1 {n}); do curl -sfk --max-time 5 -H 'Content-Type: application/json' "
        f"-d '{{\"id\": \"{prefix}-'$i'\"}}' https://127.0.0.1/api/writes >/dev/null; done"
    )


def live_color(machine: Machine) -> str | None:
    st = json.loads(machine.path("/var/lib/aipbx/state.json").read_text())
    color = st.get("live_color")
    return str(color) if color else None


def backups(machine: Machine) -> list[dict[str, Any]]:
    _, out = aipbxctl_json(machine, "backups")
    return list(out["backups"])


def health_check(machine: Machine, name: str) -> dict[str, Any] | None:
    r = machine.run(
        ["curl", "-s", "--max-time", "2", "http://127.0.0.1:6030/system-health"], check=False
    )
    try:
        return dict(json.loads(r.stdout)["checks"][name])
    except (ValueError, KeyError):
        return None


def migrating_release(machine: Machine, version: str, script: str, env: str = "") -> str:
    """The v2 release re-packed with a migration (a shell script in the release)."""
    src = f"/root/mig-{version}"
    machine.sh(f"""
        rm -rf {src} && mkdir {src} && tar -xzf /root/aipbx-sample-2.0.0.tar.gz -C {src}
    """)
    machine.path(src).joinpath("migrate.sh").write_text(
        '#!/bin/sh\nset -e\nexport PGPASSWORD="$DB_PASS"\n'
        'P="psql -X -v ON_ERROR_STOP=1 -h $DB_HOST -p $DB_PORT -U $DB_USER -d $DB_NAME"\n'
        + script
        + "\n"
    )
    if env:
        machine.sh(f"printf '\\n[env]\\n{env}\\n' >> {src}/aipbx-release.toml")
    out = machine.run(
        [
            "aipbxctl",
            "release",
            "pack",
            src,
            "--version",
            version,
            "--migrate",
            "sh migrate.sh",
            "-o",
            "/root",
        ]
    )
    return out.stdout.strip()


# --- PostgreSQL and PgBouncer -----------------------------------------------------------------


def test_postgresql_and_pgbouncer_listen_only_on_loopback_and_the_veths(machine: Machine) -> None:
    assert sql(machine, "SHOW listen_addresses") == "localhost"
    listeners = machine.run(["ss", "-Htlnp"]).stdout.splitlines()
    pg = sorted(ln.split()[3] for ln in listeners if '"postgres"' in ln)
    bouncer = sorted(ln.split()[3] for ln in listeners if '"pgbouncer"' in ln)
    assert pg == ["127.0.0.1:5432", "[::1]:5432"], listeners
    assert bouncer == ["10.203.0.1:6432", "10.203.0.5:6432", "127.0.0.1:6432"], listeners
    # SCRAM on both sides, a pool of 20
    verifier = sql(machine, "SELECT rolpassword FROM pg_authid WHERE rolname = 'aipbx_user'")
    assert verifier.startswith("SCRAM-SHA-256$")
    ini = machine.path("/etc/aipbx/pgbouncer.ini").read_text()
    assert "auth_type = scram-sha-256" in ini
    assert "default_pool_size = 20" in ini and "pool_mode = transaction" in ini
    # a wrong password is refused by PgBouncer
    r = machine.run(
        ["psql", "-X", "-h", "127.0.0.1", "-p", "6432", "-U", "aipbx_user", "-d", DB, "-c", "1"],
        env={"PGPASSWORD": "wrong"},
        check=False,
    )
    assert r.returncode != 0 and "authentication failed" in r.stderr


def test_a_pool_of_20_serves_200_concurrent_clients(machine: Machine) -> None:
    machine.path("/root/hold.sql").write_text("BEGIN;\nSELECT pg_sleep(0.05);\nEND;\n")
    admin = "psql -X -A -F '|' -P footer=off -h 127.0.0.1 -p 6432 -U aipbx_user -d pgbouncer"
    r = machine.sh(
        f"""
        export PGPASSWORD="$(sed -n 's/^DB_PASS=//p' /etc/aipbx/secrets.env)"
        rm -f /root/pools.txt
        ( while :; do {admin} -c 'SHOW POOLS' >> /root/pools.txt 2>&1; sleep 0.1; done ) &
        poller=$!
        rc=0
        {PGBENCH} -n -h 127.0.0.1 -p 6432 -U aipbx_user -c 200 -j 4 -t 10 \\
            -f /root/hold.sql {DB} > /root/pgbench.txt 2>&1 || rc=$?
        kill $poller
        wait $poller 2>/dev/null || true
        cat /root/pgbench.txt
        exit $rc
        """,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "number of clients: 200" in out
    assert "number of transactions actually processed: 2000/2000" in out, out
    assert re.search(r"number of failed transactions: 0\b", out), out
    server_max, waiting_max = 0, 0
    columns: list[str] = []
    for line in machine.path("/root/pools.txt").read_text().splitlines():
        fields = line.split("|")
        if fields[0] == "database":
            columns = fields
            continue
        if not columns or len(fields) != len(columns):
            continue
        row = dict(zip(columns, fields, strict=True))
        if row["database"] != DB:
            continue
        servers = sum(int(row[k]) for k in columns if k.startswith("sv_") and row[k].isdigit())
        server_max = max(server_max, servers)
        waiting_max = max(waiting_max, int(row["cl_waiting"]))
    FIGURES["pool"] = {"server_connections_max": server_max, "clients_waiting_max": waiting_max}
    assert 1 < server_max <= 20, FIGURES["pool"]
    assert waiting_max > 0, "PgBouncer never queued a client: 200 clients were not concurrent"
    tps = re.search(r"tps = ([0-9.]+)", out)
    FIGURES["pool"]["tps"] = float(tps.group(1)) if tps else None


# --- backups ----------------------------------------------------------------------------------


def test_backup_is_verified_0600_and_listed(machine: Machine) -> None:
    write_rows(machine, "before-backup", 20)
    sql(
        machine,
        "INSERT INTO writes (id, version, color) SELECT 'bulk-' || g, 'bulk', NULL "
        "FROM generate_series(1, 5000) g",
    )
    _, out = aipbxctl_json(machine, "backup")
    assert out["ok"] and out["tables"] >= 1 and out["bytes"] > 0
    f = out["file"]
    assert f.startswith(f"{BACKUPS}/{DB}-") and f.endswith(".dump")
    st = machine.run(["stat", "-c", "%a %U %G", f]).stdout.split()
    assert st == ["600", "postgres", "postgres"]
    assert machine.run(["stat", "-c", "%a %U", BACKUPS]).stdout.split() == ["700", "postgres"]
    # nothing half-written is left; the sidecar has the checksum
    names = os.listdir(machine.path(BACKUPS))
    assert not [n for n in names if n.endswith(".partial")], names
    meta = json.loads(machine.path(f + ".json").read_text())
    assert meta["verified"] and meta["bytes"] == out["bytes"] and meta["sha256"] == out["sha256"]
    listed = backups(machine)
    assert listed[0]["file"] == f and listed[0]["verified"] is True
    assert listed[0]["kind"] == "manual" and listed[0]["age_s"] < 60
    text = machine.run(["aipbxctl", "backups"]).stdout
    assert os.path.basename(f) in text and "yes" in text
    FIGURES["backup"] = {k: out[k] for k in ("bytes", "dump_s", "verify_s", "total_s")}


def test_restore_gives_back_exactly_the_rows_behind_a_maintenance_page(machine: Machine) -> None:
    good = backups(machine)[0]["file"]
    before = checksum(machine)
    # change data: delete, update, insert, and a table the application creates later
    sql(machine, "DELETE FROM writes WHERE id LIKE 'bulk-1%'")
    sql(machine, "UPDATE writes SET version = 'changed' WHERE id LIKE 'bulk-2%'")
    write_rows(machine, "after-backup", 5)
    app_sql(machine, "CREATE TABLE later (id int)", port=5432)
    assert checksum(machine) != before and "later" in tables(machine)

    seen: list[tuple[int, str, str]] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            status, headers, body = api(machine)
            seen.append((status, headers.get("retry-after", ""), body))

    t = threading.Thread(target=probe)
    t.start()
    try:
        code, out = aipbxctl_json(machine, "restore", good, "--yes", check=False)
    finally:
        done.set()
        t.join(30)
    assert code == 0, out
    assert checksum(machine) == before
    assert "later" not in tables(machine)
    count = int(before.split(":")[0])
    assert out["tables"]["public.writes"] == count and out["rows"] >= count
    assert machine.path(out["pre_restore_backup"]).is_file()
    steps = [s["step"] for s in out["steps"]]
    for step in ("verify", "maintenance", "stop", "pre-restore-backup", "restore", "start"):
        assert step in steps, steps
    # the API answered 503 with Retry-After and said why, then came back
    maint = [s for s in seen if s[0] == 503 and "being restored" in s[2]]
    assert maint, sorted({(s[0], s[1]) for s in seen})
    assert {s[1] for s in maint} == {"30"}
    assert api(machine)[0] < 500
    assert api_version(machine) == "1.0.0"
    write_rows(machine, "after-restore", 1)
    status, _, body = api(machine)
    assert status < 500 and "being restored" not in body
    assert "being restored" not in machine.path("/etc/nginx/conf.d/aipbx.conf").read_text()
    assert machine.run(["systemctl", "is-active", "aipbx-watchdog.service"]).stdout.strip() == (
        "active"
    )
    FIGURES["restore"] = {
        "restore_s": out["restore_s"],
        "maintenance_s": out["maintenance_s"],
        "rows": out["rows"],
        "maintenance_answers_seen": len(maint),
    }
    assert_no_failed_units(machine)


def test_a_truncated_backup_is_refused_and_nothing_changes(machine: Machine) -> None:
    good = backups(machine)[0]["file"]
    before = checksum(machine)
    site = machine.path("/etc/nginx/conf.d/aipbx.conf").read_text()
    size = int(machine.run(["stat", "-c", "%s", good]).stdout)
    # a copy cut short, with its sidecar (the sha256 refuses it) and without (the full read)
    machine.sh(f"head -c {size // 2} {good} > /root/cut.dump && cp {good}.json /root/cut.dump.json")
    machine.sh(f"head -c {size - 64} {good} > /root/cut2.dump")
    for f, why in (("/root/cut.dump", "truncated or changed"), ("/root/cut2.dump", "damaged")):
        code, out = aipbxctl_json(machine, "restore", f, "--yes", check=False)
        assert code == 2 and not out["ok"] and why in out["error"], out
        assert [s["step"] for s in out["steps"]] == []
    # a file cut short in the backup directory is listed as not verified
    machine.sh(
        f"head -c {size // 2} {good} > {BACKUPS}/{DB}-20200101T000000Z.dump && "
        f"cp {good}.json {BACKUPS}/{DB}-20200101T000000Z.dump.json && "
        f"touch -d '1 hour ago' {BACKUPS}/{DB}-20200101T000000Z.dump"
    )
    listed = {b["name"]: b for b in backups(machine)}
    assert listed[f"{DB}-20200101T000000Z.dump"]["verified"] is False
    machine.run(["rm", "-f", f"{BACKUPS}/{DB}-20200101T000000Z.dump"])
    machine.run(["rm", "-f", f"{BACKUPS}/{DB}-20200101T000000Z.dump.json"])
    # nothing was touched
    assert checksum(machine) == before
    assert machine.path("/etc/nginx/conf.d/aipbx.conf").read_text() == site
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    # refused before any question is asked
    r = machine.run(["aipbxctl", "restore", "/root/cut2.dump"], check=False)
    assert r.returncode == 2 and "damaged" in r.stderr
    assert_no_failed_units(machine)


def test_retention_deletes_only_what_is_older_than_the_window(machine: Machine) -> None:
    good = backups(machine)[0]["file"]
    ages = {"45": True, "40": True, "31": False, "29": True, "2": False}
    for days, with_sidecar in ages.items():
        name = f"{BACKUPS}/{DB}-old{days}.dump"
        machine.sh(
            f"cp -p {good} {name} && "
            + (f"cp -p {good}.json {name}.json && " if with_sidecar else "")
            + f"touch -d '{days} days ago' {name}"
        )
    _, out = aipbxctl_json(machine, "backup")
    assert sorted(out["pruned"]) == [f"{DB}-old31.dump", f"{DB}-old40.dump", f"{DB}-old45.dump"]
    left = {b["name"] for b in backups(machine)}
    assert {f"{DB}-old29.dump", f"{DB}-old2.dump", os.path.basename(out["file"])} <= left
    assert not left & {f"{DB}-old31.dump", f"{DB}-old40.dump", f"{DB}-old45.dump"}
    assert not machine.path(f"{BACKUPS}/{DB}-old45.dump.json").exists()


def test_the_daily_timer_runs_a_sandboxed_backup_as_postgres(machine: Machine) -> None:
    assert machine.run(["systemctl", "is-enabled", "aipbx-backup.timer"]).stdout.strip() == (
        "enabled"
    )
    assert machine.run(["systemctl", "is-active", "aipbx-backup.timer"]).stdout.strip() == "active"
    show = machine.run(
        ["systemctl", "show", "aipbx-backup.timer", "-p", "TimersCalendar", "-p", "Persistent"]
    ).stdout
    assert "03:00:00 UTC" in show and "Persistent=yes" in show
    r = machine.run(["systemd-analyze", "security", "--no-pager", "aipbx-backup.service"])
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m and float(m.group(1)) <= 2.0, r.stdout[-800:]
    FIGURES["exposure"] = float(m.group(1))
    n = len(backups(machine))
    machine.run(["systemctl", "start", "aipbx-backup.service"], timeout=300)
    newest = backups(machine)[0]
    assert len(backups(machine)) == n + 1 and newest["kind"] == "daily" and newest["verified"]
    status = json.loads(machine.path("/var/lib/aipbx/backup-status.json").read_text())
    assert status["last_attempt"]["ok"] and status["last_attempt"]["kind"] == "daily"
    assert status["last_success"]["file"] == newest["file"]
    wait_until(
        lambda: (health_check(machine, "backup") or {}).get("state") == "ok",
        30,
        "the watchdog's backup check to be ok",
    )


def test_a_failed_backup_leaves_no_good_looking_file_and_alerts(machine: Machine) -> None:
    conf = machine.path(CONF).read_text()
    before = sorted(os.listdir(machine.path(BACKUPS)))
    assert conf.count("\n[database]\n") == 1
    machine.path(CONF).write_text(
        conf.replace("\n[database]\n", '\n[database]\nname = "no_such_db"\n')
    )
    try:
        r = machine.run(["systemctl", "start", "aipbx-backup.service"], check=False, timeout=300)
    finally:
        machine.path(CONF).write_text(conf)
    assert r.returncode != 0
    # no new file, nothing partial
    assert sorted(os.listdir(machine.path(BACKUPS))) == before
    status = json.loads(machine.path("/var/lib/aipbx/backup-status.json").read_text())
    assert status["last_attempt"]["ok"] is False and "no_such_db" in status["last_attempt"]["error"]
    journal = machine.run(
        ["journalctl", "-p", "err", "--no-pager", "-t", "aipbxctl", "--since", "-5min"]
    ).stdout
    assert "backup" in journal and "failed" in journal, journal
    check = wait_until(
        lambda: (c := health_check(machine, "backup")) and c["state"] == "critical" and c,
        30,
        "the watchdog's backup check to go critical",
    )
    assert "no_such_db" in check["error"]
    # the next good backup clears it
    machine.run(["systemctl", "reset-failed", "aipbx-backup.service"])
    machine.run(["systemctl", "start", "aipbx-backup.service"], timeout=300)
    wait_until(lambda: (health_check(machine, "backup") or {}).get("state") == "ok", 30, "recovery")
    assert_no_failed_units(machine)


# --- migrations -------------------------------------------------------------------------------


def test_a_migration_failing_in_its_transaction_aborts_and_changes_nothing(
    machine: Machine,
) -> None:
    before = checksum(machine)
    artifact = migrating_release(
        machine, "3.0.0", "$P -c 'CREATE TABLE mig_x (id int); SELECT 1/0'"
    )
    code, out = aipbxctl_json(
        machine, "upgrade", artifact, "--probation", "1", "--drain", "1", "--yes", check=False
    )
    assert code == 1 and not out["ok"], out
    steps = [s["step"] for s in out["steps"]]
    assert "backup" in steps and "switch" not in steps and "start" not in steps, steps
    assert out["database"] == "unchanged"
    assert "rolled its transaction back" in out["error"] and "division by zero" in out["error"]
    assert machine.path(out["pre_upgrade_backup"]).is_file()
    assert "mig_x" not in tables(machine) and checksum(machine) == before
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    assert_no_failed_units(machine)


def test_a_migration_that_left_changes_is_undone_from_the_pre_upgrade_backup(
    machine: Machine,
) -> None:
    before = checksum(machine)
    artifact = migrating_release(
        machine,
        "3.1.0",
        "$P -c 'CREATE TABLE mig_y (id int)' -c \"UPDATE writes SET version = 'mig'\" "
        "-c 'SELECT 1/0'",
    )
    code, out = aipbxctl_json(
        machine, "upgrade", artifact, "--probation", "1", "--drain", "1", "--yes", check=False
    )
    assert code == 1 and not out["ok"], out
    assert "switch" not in [s["step"] for s in out["steps"]]
    assert out["database"] == "restored"
    assert "restored from the pre-upgrade backup" in out["error"]
    assert "mig_y" not in tables(machine) and checksum(machine) == before
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    write_rows(machine, "after-failed-migration", 1)
    assert_no_failed_units(machine)


def test_upgrade_restore_db_puts_the_backup_back_when_the_new_color_fails(
    machine: Machine,
) -> None:
    before = checksum(machine)
    artifact = migrating_release(
        machine,
        "3.2.0",
        "$P -c 'CREATE TABLE mig_z (id int)'",
        env='SAMPLE_FAIL = "start"',
    )
    code, out = aipbxctl_json(
        machine,
        "upgrade",
        artifact,
        "--health-timeout",
        "8",
        "--probation",
        "1",
        "--drain",
        "1",
        "--restore-db",
        "--yes",
        check=False,
    )
    assert code == 1 and "never became healthy" in out["error"], out
    assert out["database"] == "restored" and out["restored_db"] == out["pre_upgrade_backup"]
    assert "mig_z" not in tables(machine) and checksum(machine) == before
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    assert_no_failed_units(machine)


def test_rollback_restore_db_undoes_the_migration_explicitly(machine: Machine) -> None:
    # without a pre-upgrade backup of the live release it is refused, nothing changed
    code, _ = aipbxctl_json(machine, "rollback", "--restore-db", "--yes", check=False)
    assert code == 2 and live_color(machine) == "blue"
    before = checksum(machine)
    artifact = migrating_release(
        machine, "4.0.0", "$P -c 'CREATE TABLE mig_ok (id int); INSERT INTO mig_ok VALUES (1)'"
    )
    _, out = aipbxctl_json(
        machine, "upgrade", artifact, "--probation", "2", "--drain", "2", "--yes"
    )
    assert out["ok"] and out["color"] == "green" and out["database"] == "migrated"
    assert "mig_ok" in tables(machine) and api_version(machine) == "4.0.0"
    write_rows(machine, "written-by-4.0.0", 3)  # lost by the restore, on purpose
    # a plain rollback keeps the migration
    code, out = aipbxctl_json(
        machine, "rollback", "--restore-db", "--probation", "1", "--drain", "1", "--yes"
    )
    assert code == 0 and out["ok"], out
    assert out["restored_db"].startswith(f"{BACKUPS}/pre-upgrade-aipbx-sample-4.0.0-")
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    assert "mig_ok" not in tables(machine) and checksum(machine) == before
    assert_no_failed_units(machine)


def test_report_figures(machine: Machine) -> None:
    print("\nFIGURES " + json.dumps(FIGURES, sort_keys=True))
