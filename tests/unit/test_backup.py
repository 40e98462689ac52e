"""Backups, restore and migrations: the pure parts (names, retention, status and its
judgement, the unit's recorded result, the maintenance site, the migration's environment,
the CLI), with a temporary root instead of the host's /."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import backup, backup_status, backup_units, config, migrate, nginx, restore
from appliance.cli import parser
from appliance.errors import ConfigError, UsageError
from appliance.paths import Paths
from appliance.release.manifest import Kind, Manifest
from appliance.releases import Installed
from appliance.watchdog.checks import BACKUP, Checks, Targets
from appliance.watchdog.model import Status
from appliance.watchdog.settings import Settings

DAY = 86400.0
NOW = 1_800_000_000.0


def make(directory: Path, name: str, age_days: float, *, good: bool = True, size: int = 10) -> Path:
    p = directory / name
    p.write_bytes(b"x" * size)
    t = NOW - age_days * DAY
    os.utime(p, (t, t))
    if good:
        meta = {"verified": True, "bytes": size, "sha256": "0" * 64, "kind": "daily"}
        backup.meta_path(p).write_text(json.dumps(meta))
    return p


def names(bs: list[backup.Backup]) -> list[str]:
    return [b.name for b in bs]


# --- names ---------------------------------------------------------------------------------


def test_file_names_carry_kind_and_utc_stamp() -> None:
    at = 1_795_400_000.0  # 2026-11-23T02:13:20Z
    assert (
        backup.file_name("daily", "aipbx_production", at)
        == "aipbx_production-20261123T021320Z.dump"
    )
    assert backup.file_name("manual", "db", at) == "db-20261123T021320Z.dump"
    assert (
        backup.file_name("pre-upgrade", "db", at, "aipbx-sample-2.0.0")
        == "pre-upgrade-aipbx-sample-2.0.0-20261123T021320Z.dump"
    )
    assert backup.file_name("pre-restore", "db", at) == "pre-restore-db-20261123T021320Z.dump"
    assert backup.kind_of_name("pre-upgrade-x-1-20261123T021320Z.dump") == "pre-upgrade"
    with pytest.raises(ValueError):
        backup.file_name("pre-upgrade", "db", at, "../evil")
    with pytest.raises(ValueError):
        backup.file_name("weekly", "db", at)


# --- listing and retention ----------------------------------------------------------------


def test_listing_skips_partials_and_knows_what_is_verified(tmp_path: Path) -> None:
    make(tmp_path, "db-20260101T030000Z.dump", 3)
    make(tmp_path, "db-20260102T030000Z.dump", 2, good=False)
    cut = make(tmp_path, "db-20260103T030000Z.dump", 1)
    cut.write_bytes(b"x" * 5)  # shorter than its sidecar says: a copy cut short
    os.utime(cut, (NOW - DAY, NOW - DAY))
    (tmp_path / ".db-20260104T030000Z.dump.partial").write_bytes(b"half")
    (tmp_path / ".lock").write_bytes(b"")
    found = backup.list_backups(tmp_path)
    assert names(found) == [
        "db-20260101T030000Z.dump",
        "db-20260102T030000Z.dump",
        "db-20260103T030000Z.dump",
    ]
    assert [b.verified for b in found] == [True, False, False]
    assert backup.list_backups(tmp_path / "missing") == []


def test_retention_deletes_only_what_is_older_than_the_window(tmp_path: Path) -> None:
    for age in (45, 31, 29, 1):
        make(tmp_path, f"db-{age:02d}.dump", age)
    gone = backup.expired(backup.list_backups(tmp_path), NOW, 30)
    assert names(gone) == ["db-45.dump", "db-31.dump"]


def test_retention_never_deletes_the_newest_good_backup(tmp_path: Path) -> None:
    # Backups have failed for weeks: every file is old, the newest good one stays.
    make(tmp_path, "db-50.dump", 50)
    make(tmp_path, "db-40.dump", 40)
    make(tmp_path, "db-35-bad.dump", 35, good=False)
    gone = backup.expired(backup.list_backups(tmp_path), NOW, 30)
    assert names(gone) == ["db-50.dump", "db-35-bad.dump"]
    # nothing known to be good: the newest file stays
    bad = tmp_path / "bad"
    bad.mkdir()
    make(bad, "a.dump", 40, good=False)
    make(bad, "b.dump", 39, good=False)
    assert names(backup.expired(backup.list_backups(bad), NOW, 30)) == ["a.dump"]
    assert backup.expired([], NOW, 30) == []


def test_prune_removes_dumps_and_sidecars(tmp_path: Path) -> None:
    old = make(tmp_path, "db-old.dump", 40)
    make(tmp_path, "db-new.dump", 1)
    assert backup.prune(tmp_path, 30, NOW) == ["db-old.dump"]
    assert not old.exists() and not backup.meta_path(old).exists()
    assert names(backup.list_backups(tmp_path)) == ["db-new.dump"]


def test_stale_partials_and_orphan_sidecars_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".db-1.dump.partial").write_bytes(b"x")
    (tmp_path / "db-2.dump.json").write_text("{}")
    make(tmp_path, "db-3.dump", 1)
    assert sorted(backup._remove_stale(tmp_path)) == [".db-1.dump.partial", "db-2.dump.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db-3.dump", "db-3.dump.json"]


def test_the_pre_upgrade_backup_of_a_release(tmp_path: Path) -> None:
    make(tmp_path, "pre-upgrade-app-2.0.0-20260101T030000Z.dump", 3)
    make(tmp_path, "pre-upgrade-app-2.0.0-20260102T030000Z.dump", 2)
    make(tmp_path, "pre-upgrade-app-2.0.0-rc1-20260103T030000Z.dump", 1)
    found = backup.find_pre_upgrade(tmp_path, "app-2.0.0")
    assert found is not None and found.name == "pre-upgrade-app-2.0.0-20260102T030000Z.dump"
    assert backup.find_pre_upgrade(tmp_path, "app-3.0.0") is None


def test_a_file_that_differs_from_its_sidecar_is_refused_before_pg_restore(
    tmp_path: Path,
) -> None:
    f = tmp_path / "db.dump"
    f.write_bytes(b"PGDMP" + b"y" * 100)
    meta = {"bytes": 200, "sha256": "a" * 64, "verified": True}
    with pytest.raises(UsageError, match="truncated or changed"):
        backup.verify_file(f, meta=meta)
    with pytest.raises(UsageError, match="no such file"):
        restore.check(tmp_path / "missing.dump")


# --- status and the watchdog ----------------------------------------------------------------


def test_status_records_successes_and_counts_failures(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    backup_status.record(paths, ok=True, kind="daily", at=NOW, detail={"file": "/b/db-1.dump"})
    backup_status.record(paths, ok=False, kind="daily", at=NOW + DAY, detail={"error": "disk full"})
    backup_status.record(paths, ok=False, kind="manual", at=NOW + DAY + 5, detail={"error": "boom"})
    doc = backup_status.load_status(paths)
    assert doc["consecutive_failures"] == 2
    assert doc["last_success"]["file"] == "/b/db-1.dump"
    assert doc["last_attempt"]["error"] == "boom"
    level, error, detail = backup_status.judge(doc, NOW + DAY + 10)
    assert level == "critical"
    assert "failed: boom" in error and "2 failures in a row" in error
    assert "db-1.dump" in detail
    backup_status.record(
        paths, ok=True, kind="daily", at=NOW + 2 * DAY, detail={"file": "/b/db-2.dump"}
    )
    assert backup_status.judge(backup_status.load_status(paths), NOW + 2 * DAY)[0] == "ok"


def test_judge_idle_ok_and_stale() -> None:
    assert backup_status.judge({}, NOW)[0] == "idle"
    good = {"at": NOW, "ok": True, "file": "/b/db.dump"}
    doc = {"last_attempt": good, "last_success": good}
    assert backup_status.judge(doc, NOW + 3600)[0] == "ok"
    level, error, _ = backup_status.judge(doc, NOW + 3 * DAY)
    assert level == "warning" and error == "no backup for 3d"


def test_unit_result_is_recorded_even_for_a_killed_run(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    cfg = config.parse("")
    d = backup.backup_dir(cfg, paths)
    d.mkdir(parents=True)
    done = {"at": NOW, "ok": True, "file": "/x/db.dump", "bytes": 5, "invocation": "run-1"}
    (d / backup.LAST_RUN).write_text(json.dumps(done))
    out = backup_status.record_unit_result(
        paths, cfg, {"SERVICE_RESULT": "success", "INVOCATION_ID": "run-1"}
    )
    assert out["ok"] and backup_status.load_status(paths)["last_success"]["file"] == "/x/db.dump"
    # killed: the run never wrote its end; the file left is an older run's
    env = {
        "SERVICE_RESULT": "signal",
        "EXIT_CODE": "killed",
        "EXIT_STATUS": "KILL",
        "INVOCATION_ID": "run-2",
    }
    out = backup_status.record_unit_result(paths, cfg, env)
    assert not out["ok"] and "signal" in out["error"] and "KILL" in out["error"]
    # the run said why it failed
    failed = {"at": NOW, "ok": False, "error": "pg_dump failed: x", "invocation": "run-3"}
    (d / backup.LAST_RUN).write_text(json.dumps(failed))
    env = {"SERVICE_RESULT": "exit-code", "INVOCATION_ID": "run-3"}
    assert backup_status.record_unit_result(paths, cfg, env)["error"] == "pg_dump failed: x"
    assert backup_status.load_status(paths)["consecutive_failures"] == 2


def test_watchdog_backup_check_reads_the_status_file(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    checks = Checks(Settings(), services=None, clock=time.monotonic)  # type: ignore[arg-type]
    t = Targets(
        color=None,
        backend_host="",
        backend_unit="",
        http_port=5005,
        ws_port=3033,
        nginx_port=443,
        postgres_port=5432,
        pgbouncer_port=6432,
        pgbouncer_set_up=True,
        db_user="u",
        db_name="d",
        disk_paths=(),
        cert=None,
        backup_status=backup.status_path(paths),
    )

    def run() -> Any:
        return asyncio.run(checks.run(BACKUP, t))

    assert run().status is Status.IDLE
    backup_status.record(
        paths, ok=False, kind="daily", at=time.time(), detail={"error": "disk full"}
    )
    r = run()
    assert r.status is Status.CRITICAL and "disk full" in r.error
    backup_status.record(
        paths, ok=True, kind="manual", at=time.time(), detail={"file": "/b/x.dump"}
    )
    assert run().status is Status.OK


# --- configuration, the timer, the maintenance site ------------------------------------------


def test_backups_config_defaults_and_checks() -> None:
    b = config.parse("").backups
    assert (b.dir, b.retention_days, b.time) == ("/var/backups/aipbx", 30, "03:00")
    cfg = config.parse('[backups]\ndir = "/srv/b/"\nretention_days = 7\ntime = "23:45"\n')
    assert cfg.backups.retention_days == 7
    for bad in ('time = "3:00"', 'time = "24:00"', 'dir = "rel/dir"', "retention_days = 0"):
        with pytest.raises(ConfigError):
            config.parse(f"[backups]\n{bad}\n")


def test_timer_and_directory_drop_ins() -> None:
    cfg = config.parse('[backups]\ndir = "/srv/backups"\ntime = "01:30"\n')
    assert "OnCalendar=\nOnCalendar=*-*-* 01:30:00 UTC\n" in backup_units.render_timer_dropin(cfg)
    assert "ReadWritePaths=/srv/backups\n" in backup_units.render_service_dropin(cfg)


def test_maintenance_site_answers_the_api_with_503_and_retry_after(tmp_path: Path) -> None:
    cfg = config.parse("")
    normal = nginx.render_site(cfg, Paths(tmp_path), ipv6=False)
    maint = nginx.render_site(cfg, Paths(tmp_path), ipv6=False, maintenance=True)
    assert "return 503;  # maintenance" not in normal and "being restored" not in normal
    assert "add_header Retry-After 30 always;" in maint
    assert '"error":"maintenance: the database is being restored"' in maint
    for location in ("location ^~ /api/ {", "location = /api/auth/login {", "location ^~ /ws/ {"):
        block = maint.split(location, 1)[1].split("\n    }", 1)[0]
        assert "return 503;  # maintenance" in block, location
    # the frontend and ACME keep being served
    for location in (
        "location / {\n        add_header Cache-Control",
        "location /.well-known/acme-challenge/ {",
    ):
        block = maint.split(location, 1)[1].split("\n    }", 1)[0]
        assert "return 503" not in block


# --- the migration's environment ----------------------------------------------------------------


def test_migration_env_is_clean_and_goes_to_postgresql_directly(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.etc.mkdir(parents=True)
    paths.secrets.write_text("DB_PASS=s3cret\nPRIVATE_KEY=k\n")
    m = Manifest(name="app", version="2.0.0", kind=Kind.BACKEND, migrate=("npm", "run", "m"))
    rel = Installed("app-2.0.0", m, tmp_path / "opt/aipbx/releases/app-2.0.0", 0.0)
    os.environ["SUDO_USER"] = "someone"
    try:
        env, hidden = migrate.migration_env(paths, config.parse(""), rel, tmp_path / "home")
    finally:
        del os.environ["SUDO_USER"]
    assert env["DB_HOST"] == "127.0.0.1" and env["DB_PORT"] == "5432"
    assert env["DB_USER"] == "aipbx_user" and env["DB_NAME"] == "aipbx_production"
    assert env["DB_PASS"] == "s3cret" and "s3cret" in hidden
    assert env["HOME"] == env["TMPDIR"] == str(tmp_path / "home")
    assert "AIPBX_COLOR" not in env and "SUDO_USER" not in env
    assert env["USER"] == "_aipbx"


# --- the command line -----------------------------------------------------------------------------


def test_cli_verbs_and_restore_db_flags() -> None:
    p = parser()
    a = p.parse_args(["backup", "--json"])
    assert a.command == "backup" and a.json and not a.scheduled
    assert p.parse_args(["backups"]).command == "backups"
    a = p.parse_args(["restore", "/var/backups/aipbx/x.dump", "--yes", "--json"])
    assert a.file == "/var/backups/aipbx/x.dump" and a.yes
    assert p.parse_args(["upgrade", "x.tar.gz", "--restore-db"]).restore_db
    assert p.parse_args(["rollback", "--restore-db"]).restore_db
    assert not p.parse_args(["rollback"]).restore_db
