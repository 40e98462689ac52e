"""`aipbxctl backup`, `backups` and `restore`, and the --restore-db of `upgrade` and
`rollback`: orchestration only; the work is in appliance.backup and appliance.restore."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from appliance import backup, backup_status, restore, state
from appliance import config as config_mod
from appliance.config import Config
from appliance.errors import AipbxError, UsageError
from appliance.fsutil import locked
from appliance.log import audit
from appliance.paths import Paths
from appliance.services import Services

log = logging.getLogger("aipbx.backup")


def _out(a: Mapping[str, Any]) -> Callable[[str], None]:
    return (lambda _s: None) if a.get("json") else (lambda s: print(s, flush=True))


# --- backup ---------------------------------------------------------------------------------


def run_backup(paths: Paths, a: Mapping[str, Any]) -> dict[str, Any]:
    cfg = config_mod.load(paths.config)
    if a.get("record_unit_result"):
        if os.geteuid() != 0:
            raise UsageError("--record-unit-result is the backup unit's ExecStopPost (root)")
        return backup_status.record_unit_result(paths, cfg, os.environ)
    scheduled = bool(a.get("scheduled"))
    kind = backup.DAILY if scheduled else backup.MANUAL
    directory = backup.backup_dir(cfg, paths)
    started = time.time()
    if scheduled:
        backup.ensure_dir(directory)
        backup_status.write_last_run(directory, {"at": started, "ok": None})
    try:
        # The timer's run waits for a manual backup that holds the lock; a manual one
        # says another is running.
        done = backup.take(paths, cfg, kind=kind, wait=3600 if scheduled else 0)
    except AipbxError as e:
        log.error(
            "the %s backup of %s failed: %s",
            kind,
            cfg.database.name,
            e.message,
            extra={"fields": {"action": "backup", "outcome": "failed"}},
        )
        if scheduled:
            backup_status.write_last_run(
                directory, {"at": started, "ok": False, "error": e.message}
            )
        elif os.geteuid() == 0:
            backup_status.record(
                paths, ok=False, kind=kind, at=started, detail={"error": e.message}
            )
            audit("backup", "failed", error=e.message)
        if a.get("json"):
            print(json.dumps({"ok": False, "error": e.message, "kind": kind}, indent=2))
        raise
    detail = {k: done[k] for k in ("file", "bytes", "dump_s", "verify_s")}
    if scheduled:
        backup_status.write_last_run(directory, {"at": started, "ok": True, **detail})
    elif os.geteuid() == 0:
        backup_status.record(paths, ok=True, kind=kind, at=started, detail=detail)
        audit("backup", "ok", file=done["file"])
    return done


def format_backup(done: Mapping[str, Any]) -> str:
    if "tables" not in done:  # --record-unit-result
        if done.get("ok"):
            return f"recorded: the backup {done.get('file')} is good"
        return f"recorded a failed backup: {done.get('error')}"
    lines = [
        f"backup {done['file']}: {backup.human_bytes(int(done['bytes']))}, "
        f"{done['tables']} tables, dumped in {done['dump_s']:.1f}s, "
        f"verified in {done['verify_s']:.1f}s"
    ]
    for name in done.get("pruned") or []:
        lines.append(f"retention: deleted {name}")
    return "\n".join(lines)


# --- backups ---------------------------------------------------------------------------------


def list_backups(paths: Paths) -> dict[str, Any]:
    cfg = config_mod.load(paths.config)
    directory = backup.backup_dir(cfg, paths)
    now = time.time()
    found = backup.list_backups(directory)
    good = [b for b in found if b.verified]
    return {
        "dir": str(directory),
        "retention_days": cfg.backups.retention_days,
        "schedule": f"daily at {cfg.backups.time} UTC",
        "newest_good": good[-1].name if good else None,
        "status": backup_status.load_status(paths) if os.geteuid() == 0 else None,
        "backups": [b.row(now) for b in reversed(found)],
    }


def format_backups(data: Mapping[str, Any]) -> str:
    rows = data["backups"]
    if not rows:
        return f"no backups in {data['dir']}"
    lines = [f"{'BACKUP':56} {'KIND':11} {'SIZE':>10} {'AGE':>5}  VERIFIED"]
    for r in rows:
        lines.append(
            f"{r['name']:56} {r['kind']:11} {backup.human_bytes(r['bytes']):>10} "
            f"{backup.human_age(r['age_s']):>5}  {'yes' if r['verified'] else 'NO'}"
        )
    lines.append(
        f"{len(rows)} in {data['dir']}; kept {data['retention_days']} days "
        f"(never the newest good one), {data['schedule']}"
    )
    return "\n".join(lines)


# --- restore -----------------------------------------------------------------------------------


def confirm(what: str, yes: bool) -> None:
    """A restore replaces data: without --yes it asks, and refuses when it cannot ask."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{what}: not confirmed", hint="pass --yes to confirm")
    if input(f"{what}? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was changed")


def run_restore(paths: Paths, services: Services, a: Mapping[str, Any]) -> dict[str, Any]:
    cfg = config_mod.load(paths.config)
    steps = restore.Steps(out=_out(a))
    path = restore.resolve(paths, cfg, a["file"])
    failed: dict[str, Any] = {}
    try:
        # The file first: a damaged one is refused before anything is touched.
        verified = restore.check(path)
        steps.step(
            "verify",
            f"{path.name}: {backup.human_bytes(verified.bytes)}, {verified.tables} tables, "
            f"every block readable"
            + (", sha256 matches its sidecar" if verified.checksum else " (no sidecar)"),
        )
        confirm(
            f"replace database {cfg.database.name} with {path.name} (the API answers 503 "
            "meanwhile)",
            bool(a.get("yes")),
        )
        with locked(paths.lock, "change"):
            result = restore.run(paths, cfg, services, path, steps=steps, verified=verified)
    except AipbxError as e:
        audit("restore", "failed", file=str(path), error=e.message)
        failed = {"ok": False, "error": e.message, "file": str(path), "steps": steps.steps}
        if a.get("json"):
            print(json.dumps(failed, indent=2, sort_keys=True))
        raise
    audit("restore", "ok", file=str(path), rows=result.get("rows"))
    return {"ok": True, "steps": steps.steps, **result}


def format_restore(result: Mapping[str, Any]) -> str:
    lines = [f"restored {result['file']} into {result['database']}:"]
    for table, rows in (result.get("tables") or {}).items():
        lines.append(f"  {table:40} {rows:>12} rows")
    if result.get("pre_restore_backup"):
        lines.append(f"the database as it was before: {result['pre_restore_backup']}")
    return "\n".join(lines)


# --- --restore-db of upgrade and rollback -----------------------------------------------------


def pre_upgrade_backup(
    paths: Paths, cfg: Config, release: str | None
) -> tuple[Path, backup.Verified]:
    """The backup taken before the upgrade to `release`, checked; UsageError otherwise."""
    if not release:
        raise UsageError("--restore-db: nothing is live, so there is no upgrade to undo")
    found = backup.find_pre_upgrade(backup.backup_dir(cfg, paths), release)
    if found is None:
        raise UsageError(
            f"--restore-db: there is no pre-upgrade backup for {release} (its upgrade ran "
            "no migration, or the backup was deleted by retention)",
            hint="roll back without --restore-db, or `aipbxctl restore FILE`",
        )
    return found.path, restore.check(found.path)


def rollback_restoring(
    paths: Paths,
    cfg: Config,
    services: Services,
    file: Path,
    verified: backup.Verified,
    out: Callable[[str], None],
    do_rollback: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """rollback --restore-db (the caller holds the lock): maintenance, stop the release
    being left, restore the backup taken before it was installed, then roll back (the
    previous release never sees the newer schema, the newer release never the older)."""
    steps = restore.Steps(out=out)
    result = restore.run(
        paths, cfg, services, file, steps=steps, verified=verified, bring_back=do_rollback
    )
    result["restore_steps"] = steps.steps
    result["restored_db"] = str(file)
    return result


def restore_after_failed_upgrade(
    paths: Paths,
    cfg: Config,
    services: Services,
    figures: dict[str, Any],
    out: Callable[[str], None],
) -> None:
    """upgrade --restore-db, after the upgrade failed once its migration had run: put the
    pre-upgrade backup back under the (old) live color. Fills figures."""
    file = figures.get("pre_upgrade_backup")
    if not file or figures.get("database") != "migrated":
        return  # no migration ran, or its failure already left the database as it was
    steps = restore.Steps(out=out)
    try:
        restore.run(paths, cfg, services, Path(file), steps=steps)
    except AipbxError as e:
        figures["database"] = f"restore failed: {e.message}"
        figures["restore_steps"] = steps.steps
        return
    figures["database"] = "restored"
    figures["restored_db"] = file
    figures["restore_steps"] = steps.steps


def live_release(paths: Paths) -> str | None:
    return state.load(paths.state).live_release()
