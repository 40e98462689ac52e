"""Database backups (DESIGN decision 11): `pg_dump -Fc` of the appliance's database into
[backups] dir (0700 postgres), each file 0600.

A backup is written under a hidden temporary name (`.NAME.partial`), verified (pg_restore
--list, then a full read of every data block, which --list alone does not do: a file cut
short after its table of contents still lists fine) and only then renamed to its final
name, with a sidecar `NAME.json` holding its size and sha256. A failed or interrupted
backup therefore never leaves a file that looks good; a stale partial is removed by the
next backup. After a good backup, files older than retention_days are deleted, but never
the newest good one.

Who runs it: aipbx-backup.service (User=postgres, from aipbx-backup.timer) runs the pg
tools itself; `aipbxctl backup` as root runs them through `runuser -u postgres`. Both go
through PostgreSQL's local socket with peer authentication, never through PgBouncer
(appliance.pgtools).

The backup directory is postgres's: root (aipbxctl) never follows a link in it. The lock,
a new backup and a sidecar are opened O_NOFOLLOW (appliance.safefs) and changed through their
fd, and what root reads there is bounded and must be a regular file.

The outcome of scheduled and manual backups is kept in /var/lib/aipbx/backup-status.json
(written by root: by `aipbxctl backup`, or by the unit's privileged ExecStopPost=), which
the watchdog's `backup` check reads; a failure is also logged at error priority."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import safefs
from appliance.config import Config
from appliance.errors import AipbxError, CommandError, UsageError
from appliance.fsutil import atomic_write, fsync_dir, locked
from appliance.paths import Paths
from appliance.pgtools import db_args, pg_ids, pg_run

log = logging.getLogger("aipbx.backup")

SUFFIX = ".dump"
META_SUFFIX = ".json"  # NAME.dump.json beside NAME.dump
PARTIAL = ".partial"
LOCK_NAME = ".lock"
LAST_RUN = ".last-run.json"  # what the unprivileged unit tells its ExecStopPost
STATUS_NAME = "backup-status.json"
META_LIMIT = 64 << 10  # a sidecar is a few hundred bytes
UNIT = "aipbx-backup.service"
TIMER = "aipbx-backup.timer"
# The timer runs daily: a newest good backup older than this is a WARNING.
STALE_AFTER_S = 48 * 3600
SCHEMA = 1

# Kinds of backups. daily: the timer; manual: `aipbxctl backup`; pre-upgrade: before a
# release's migration; pre-restore: the database as it was before `aipbxctl restore`.
DAILY, MANUAL, PRE_UPGRADE, PRE_RESTORE = "daily", "manual", "pre-upgrade", "pre-restore"
KINDS = (DAILY, MANUAL, PRE_UPGRADE, PRE_RESTORE)
_STAMP = re.compile(r"(\d{8}T\d{6}Z)")


class BackupError(AipbxError):
    """A backup failed; no file with a final name was left for it."""


# --- names and places (pure) --------------------------------------------------------


def backup_dir(cfg: Config, paths: Paths) -> Path:
    return paths.root / cfg.backups.dir.lstrip("/")


def status_path(paths: Paths) -> Path:
    return paths.var / STATUS_NAME


def stamp(at: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))


def file_name(kind: str, db: str, at: float, label: str = "") -> str:
    """daily/manual: DB-STAMP.dump; pre-upgrade: pre-upgrade-RELEASE-STAMP.dump;
    pre-restore: pre-restore-DB-STAMP.dump."""
    if kind not in KINDS:
        raise ValueError(f"unknown backup kind {kind!r}")
    if kind == PRE_UPGRADE:
        if not label or "/" in label or label.startswith("."):
            raise ValueError(f"a pre-upgrade backup needs a release name, not {label!r}")
        return f"pre-upgrade-{label}-{stamp(at)}{SUFFIX}"
    if kind == PRE_RESTORE:
        return f"pre-restore-{db}-{stamp(at)}{SUFFIX}"
    return f"{db}-{stamp(at)}{SUFFIX}"


def kind_of_name(name: str) -> str:
    if name.startswith("pre-upgrade-"):
        return PRE_UPGRADE
    if name.startswith("pre-restore-"):
        return PRE_RESTORE
    return DAILY


def meta_path(dump: Path) -> Path:
    return dump.with_name(dump.name + META_SUFFIX)


@dataclass(frozen=True)
class Backup:
    path: Path
    bytes: int
    mtime: float
    meta: Mapping[str, Any] | None  # the sidecar, None when there is none (or unreadable)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        kind = (self.meta or {}).get("kind")
        return str(kind) if kind in KINDS else kind_of_name(self.name)

    @property
    def verified(self) -> bool:
        """Verified when it was written, and still the size it had then (a copy cut short
        fails this; `aipbxctl restore` checks the sha256 and every block again)."""
        m = self.meta or {}
        return bool(m.get("verified")) and m.get("bytes") == self.bytes

    def row(self, now: float) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "name": self.name,
            "kind": self.kind,
            "bytes": self.bytes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.mtime)),
            "age_s": round(max(0.0, now - self.mtime)),
            "verified": self.verified,
            "sha256": (self.meta or {}).get("sha256"),
            "release": (self.meta or {}).get("label") or None,
        }


def expired(backups: Sequence[Backup], now: float, retention_days: int) -> list[Backup]:
    """What retention deletes: older than the window, never the newest good backup (nor,
    when none is known to be good, the newest backup at all)."""
    if not backups:
        return []
    cutoff = now - retention_days * 86400
    good = [b for b in backups if b.verified]
    keep = max(good or list(backups), key=lambda b: (b.mtime, b.name))
    return sorted(
        (b for b in backups if b.mtime < cutoff and b.path != keep.path),
        key=lambda b: b.mtime,
    )


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


# --- listing ---------------------------------------------------------------------------


def read_meta(dump: Path) -> Mapping[str, Any] | None:
    """The sidecar of dump; None when there is none, or it is not a small regular JSON file
    (a link, a fifo, a device: not read)."""
    try:
        data = json.loads(safefs.read_input(meta_path(dump), META_LIMIT))
    except (OSError, ValueError, AipbxError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def list_backups(directory: Path) -> list[Backup]:
    """The backups in `directory`, oldest first. Hidden files (partials) are not backups."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    except PermissionError:
        raise UsageError(
            f"{directory}: permission denied (it is 0700 postgres)", hint="sudo aipbxctl backups"
        ) from None
    out = []
    for p in entries:
        if p.name.startswith(".") or not p.name.endswith(SUFFIX):
            continue
        try:
            st = p.lstat()  # a link (postgres may plant one) is not a backup
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        out.append(Backup(p, st.st_size, st.st_mtime, read_meta(p)))
    return sorted(out, key=lambda b: (b.mtime, b.name))


def find_pre_upgrade(directory: Path, release: str) -> Backup | None:
    """The newest backup taken before the upgrade to `release`."""
    prefix = f"pre-upgrade-{release}-"
    found = [
        b
        for b in list_backups(directory)
        if b.name.startswith(prefix) and _STAMP.fullmatch(b.name[len(prefix) : -len(SUFFIX)])
    ]
    return found[-1] if found else None


# --- verification ----------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    fd = safefs.open_input(path)
    try:
        return safefs.sha256_fd(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Verified:
    bytes: int
    sha256: str
    entries: int  # table-of-contents entries
    tables: int  # TABLE DATA entries
    checksum: bool | None  # True: matches its sidecar; None: no sidecar to compare with


def verify_file(path: Path, *, meta: Mapping[str, Any] | None = None) -> Verified:
    """Refuse a file that is not a whole pg_dump -Fc archive: its size and sha256 against
    the sidecar (when there is one), `pg_restore --list`, then a full read of every data
    block into /dev/null (a truncated or corrupt block fails only here). The file is opened
    once (a regular file, through no link another user owns: safefs.open_input) and every
    check reads that open file."""
    try:
        fd = safefs.open_input(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file", hint="`aipbxctl backups` lists them") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    try:
        return verify_fd(fd, path, meta=meta)
    finally:
        os.close(fd)


def verify_fd(fd: int, path: Path, *, meta: Mapping[str, Any] | None = None) -> Verified:
    """verify_file of an open regular file (read from its start; `path` names it)."""
    size = os.fstat(fd).st_size
    os.lseek(fd, 0, os.SEEK_SET)
    digest = safefs.sha256_fd(fd)
    checksum: bool | None = None
    if meta is not None and meta.get("sha256"):
        if meta.get("bytes") != size or meta.get("sha256") != digest:
            raise UsageError(
                f"{path} is not the file that was backed up: {size} bytes, sha256 "
                f"{digest[:16]}…, but its sidecar records {meta.get('bytes')} bytes, "
                f"sha256 {str(meta.get('sha256'))[:16]}… (truncated or changed)",
                hint="choose another backup (`aipbxctl backups`)",
            )
        checksum = True
    hint = "the file is not a complete pg_dump -Fc archive; choose another backup"
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        listing = pg_run(["pg_restore", "--list"], stdin=fd, hint=hint).stdout.decode()
        os.lseek(fd, 0, os.SEEK_SET)
        pg_run(["pg_restore", "-f", "/dev/null"], stdin=fd, hint=hint)
    except CommandError as e:
        raise UsageError(f"{path} is damaged: {e.message}", hint=hint) from e
    lines = [ln for ln in listing.splitlines() if ln.strip() and not ln.startswith(";")]
    tables = sum(1 for ln in lines if " TABLE DATA " in ln)
    return Verified(size, digest, len(lines), tables, checksum)


# --- the lock of the backup directory ---------------------------------------------------


def dir_lock(directory: Path, *, wait: float = 0) -> contextlib.AbstractContextManager[None]:
    """One backup (or restore) at a time per directory. The lock file belongs to postgres
    so that the unit (postgres) and aipbxctl (root) share it."""
    return locked(
        directory / LOCK_NAME,
        "backup or restore",
        wait=wait,
        owner=pg_ids() if os.geteuid() == 0 else None,
        hint="wait for it to finish (`systemctl status aipbx-backup.service`)",
    )


def ensure_dir(directory: Path) -> None:
    """The backup directory, 0700 postgres:postgres when it is made here (tmpfiles makes the
    default one). Through no link another user owns: one is refused, never followed."""
    try:
        os.close(safefs.open_input_dir(directory))
        return
    except FileNotFoundError:
        pass
    except (safefs.Unsafe, OSError) as e:
        raise BackupError(
            f"{directory}: {getattr(e, 'message', None) or e}",
            hint="[backups] dir must be a directory (postgres's), reached through no link "
            "another user owns",
        ) from None
    if os.geteuid() != 0:
        raise BackupError(f"{directory} does not exist", hint="run `aipbxctl setup` as root")
    try:
        os.close(safefs.make_dirs(directory, mode=0o700, owner=pg_ids()))
    except safefs.Unsafe as e:
        raise BackupError(f"cannot make the backup directory: {e.message}") from None


def _remove_stale(directory: Path) -> list[str]:
    """Under the lock nothing else writes here: a partial is what a killed backup left, a
    sidecar without its dump what a crash between the two left."""
    removed = []
    for p in directory.iterdir():
        stale = p.name.startswith(".") and p.name.endswith(PARTIAL)
        orphan = (
            p.name.endswith(SUFFIX + META_SUFFIX)
            and not p.with_name(p.name[: -len(META_SUFFIX)]).exists()
        )
        if stale or orphan:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p.name)
    return removed


def prune(directory: Path, retention_days: int, now: float) -> list[str]:
    gone = []
    for b in expired(list_backups(directory), now, retention_days):
        with contextlib.suppress(FileNotFoundError):
            b.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            meta_path(b.path).unlink()
        gone.append(b.name)
        log.info(
            "retention: deleted %s (%s old)",
            b.name,
            human_age(now - b.mtime),
            extra={"fields": {"action": "backup-retention", "file": str(b.path)}},
        )
    return gone


# --- taking a backup ---------------------------------------------------------------------


def take(
    paths: Paths,
    cfg: Config,
    *,
    kind: str,
    label: str = "",
    prune_old: bool = True,
    wait: float = 0,
) -> dict[str, Any]:
    directory = backup_dir(cfg, paths)
    ensure_dir(directory)
    with dir_lock(directory, wait=wait):
        return take_locked(paths, cfg, kind=kind, label=label, prune_old=prune_old)


def take_locked(
    paths: Paths, cfg: Config, *, kind: str, label: str = "", prune_old: bool = True
) -> dict[str, Any]:
    """A backup, for a caller that holds dir_lock. Returns what was done; raises
    BackupError (after removing the partial file) when anything fails."""
    directory = backup_dir(cfg, paths)
    root = os.geteuid() == 0
    _remove_stale(directory)
    started = time.time()
    dest = directory / file_name(kind, cfg.database.name, started, label)
    n = 1
    while dest.exists() or meta_path(dest).exists():  # two backups within one second
        n += 1
        dest = dest.with_name(dest.name[: -len(SUFFIX)] + f"-{n}{SUFFIX}")
    tmp = directory / f".{dest.name}{PARTIAL}"
    t0 = time.monotonic()
    try:
        try:
            pg_run(
                ["pg_dump", "-Fc", *db_args(cfg), "-f", str(tmp), cfg.database.name],
                hint="is PostgreSQL running? `systemctl status postgresql`",
            )
        except CommandError as e:
            raise BackupError(f"pg_dump of {cfg.database.name} failed: {e.message}") from e
        dump_s = time.monotonic() - t0
        t1 = time.monotonic()
        try:
            # pg_dump (postgres) made it in postgres's directory: opened, never followed.
            fd = safefs.open_input(tmp)
            try:
                st = os.fstat(fd)
                if st.st_nlink != 1 or (root and st.st_uid != pg_ids()[0]):
                    raise UsageError(f"{tmp} is not the file pg_dump wrote (owner, links)")
                os.fchmod(fd, 0o600)
                v = verify_fd(fd, tmp)
            finally:
                os.close(fd)
        except UsageError as e:
            raise BackupError(f"the new backup failed its verification: {e.message}") from e
        meta = {
            "schema": SCHEMA,
            "kind": kind,
            "label": label,
            "database": cfg.database.name,
            "created": round(started, 3),
            "bytes": v.bytes,
            "sha256": v.sha256,
            "entries": v.entries,
            "tables": v.tables,
            "verified": True,
            "dump_s": round(dump_s, 3),
        }
        verify_s = time.monotonic() - t1
        meta["verify_s"] = round(verify_s, 3)
        uid, gid = pg_ids() if root else (-1, -1)  # given through the new file's fd
        atomic_write(
            meta_path(dest),
            json.dumps(meta, indent=2, sort_keys=True) + "\n",
            mode=0o600,
            uid=uid,
            gid=gid,
        )
        t2 = time.monotonic()
        os.replace(tmp, dest)
        fsync_dir(directory)
        rename_s = time.monotonic() - t2
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if not dest.exists():
            with contextlib.suppress(FileNotFoundError):
                meta_path(dest).unlink()
        raise
    pruned = prune(directory, cfg.backups.retention_days, time.time()) if prune_old else []
    log.info(
        "backup %s: %s in %.1fs, verified in %.1fs",
        dest.name,
        human_bytes(v.bytes),
        dump_s,
        verify_s,
        extra={"fields": {"action": "backup", "outcome": "ok", "file": str(dest)}},
    )
    return {
        "ok": True,
        "file": str(dest),
        "kind": kind,
        "bytes": v.bytes,
        "sha256": v.sha256,
        "tables": v.tables,
        "entries": v.entries,
        "dump_s": round(dump_s, 3),
        "verify_s": round(verify_s, 3),
        "backup_s": round(dump_s + rename_s, 3),  # the backup itself, verification aside
        "total_s": round(time.monotonic() - t0, 3),
        "pruned": pruned,
        "at": round(started, 3),
    }
