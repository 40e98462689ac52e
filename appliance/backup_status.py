"""The outcome of backups, for the watchdog's `backup` check and `aipbxctl backups`:
/var/lib/aipbx/backup-status.json, written after every run (also by the unit's
ExecStopPost=+, so a killed run is recorded)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance import safefs
from appliance.backup import (
    DAILY,
    LAST_RUN,
    META_LIMIT,
    SCHEMA,
    STALE_AFTER_S,
    UNIT,
    backup_dir,
    human_age,
    status_path,
)
from appliance.config import Config
from appliance.errors import AipbxError
from appliance.fsutil import atomic_write
from appliance.paths import Paths

log = logging.getLogger("aipbx.backup")


# --- the status the watchdog reads ----------------------------------------------------


def load_status_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_status(paths: Paths) -> dict[str, Any]:
    return load_status_file(status_path(paths))


def record(paths: Paths, *, ok: bool, kind: str, at: float, detail: Mapping[str, Any]) -> None:
    """Keep the outcome of a daily or manual backup (root only: /var/lib/aipbx)."""
    doc = load_status(paths)
    attempt = {"at": round(at, 3), "ok": ok, "kind": kind, **detail}
    doc["schema"] = SCHEMA
    doc["last_attempt"] = attempt
    if ok:
        doc["last_success"] = attempt
        doc["consecutive_failures"] = 0
    else:
        doc["consecutive_failures"] = int(doc.get("consecutive_failures") or 0) + 1
    atomic_write(status_path(paths), json.dumps(doc, indent=2, sort_keys=True) + "\n", mode=0o644)


def judge(doc: Mapping[str, Any], now: float) -> tuple[str, str, str]:
    """(level, error, detail) of the backups for the watchdog: level is ok, warning,
    critical or idle (no backup has run yet)."""
    last = doc.get("last_attempt")
    good = doc.get("last_success")
    if not isinstance(last, dict):
        return "idle", "", "no backup has run yet"
    good_text = "no good backup yet"
    if isinstance(good, dict):
        age = now - float(good.get("at") or 0)
        good_text = f"newest good backup {Path(str(good.get('file'))).name}, {human_age(age)} old"
    if not last.get("ok"):
        failures = int(doc.get("consecutive_failures") or 1)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(last.get("at") or 0)))
        error = f"the {last.get('kind', '')} backup at {when} failed: {last.get('error', '?')}"
        if failures > 1:
            error += f" ({failures} failures in a row)"
        return "critical", error, good_text
    if isinstance(good, dict) and now - float(good.get("at") or 0) > STALE_AFTER_S:
        return "warning", f"no backup for {human_age(now - float(good['at']))}", good_text
    return "ok", "", good_text


def write_last_run(directory: Path, doc: Mapping[str, Any]) -> None:
    """What the unit (postgres) hands to its privileged ExecStopPost, keyed by the run."""
    data = {**doc, "invocation": os.environ.get("INVOCATION_ID", "")}
    atomic_write(directory / LAST_RUN, json.dumps(data, sort_keys=True) + "\n", mode=0o600)


def record_unit_result(paths: Paths, cfg: Config, env: Mapping[str, str]) -> dict[str, Any]:
    """ExecStopPost=+ of aipbx-backup.service (root): record how the run ended, from
    systemd's $SERVICE_RESULT and what the run wrote itself; a run that was killed, timed
    out or never started its work is a failure too."""
    directory = backup_dir(cfg, paths)
    invocation = env.get("INVOCATION_ID", "")
    try:
        # postgres wrote it, in postgres's directory: a regular file, never a link, bounded.
        run_doc = json.loads(safefs.read_input(directory / LAST_RUN, META_LIMIT))
    except (OSError, ValueError, AipbxError, RecursionError):
        run_doc = {}
    if not isinstance(run_doc, dict) or run_doc.get("invocation") != invocation:
        run_doc = {}
    result = env.get("SERVICE_RESULT", "")
    ok = result == "success" and bool(run_doc.get("ok"))
    at = float(run_doc.get("at") or time.time())
    if ok:
        detail = {k: run_doc[k] for k in ("file", "bytes", "dump_s", "verify_s") if k in run_doc}
    else:
        error = str(run_doc.get("error") or "")
        if not error:
            error = (
                f"{UNIT} ended with {result or 'an unknown result'} "
                f"({env.get('EXIT_CODE', '?')} {env.get('EXIT_STATUS', '')})".strip()
            )
        detail = {"error": error}
        log.error(
            "the daily backup failed: %s",
            error,
            extra={"fields": {"action": "backup", "outcome": "failed", "unit": UNIT}},
        )
    record(paths, ok=ok, kind=DAILY, at=at, detail=detail)
    return {"ok": ok, **detail}
