"""Migrations inside an upgrade (DESIGN decision 7): a pre-upgrade backup (appliance.backup:
pg_dump -Fc, verified, renamed only when good), then the release's migrate command, run
from the new release before the new color starts.

The command runs as the service user (_aipbx) with the backend's environment and a clean
one otherwise (no root HOME, no sudo variables), a private HOME/TMPDIR, its own process
group (a timeout kills all of it), and DB_HOST/DB_PORT pointing at PostgreSQL itself on
loopback rather than PgBouncer: a migration tool may need a session (advisory locks, SET,
prepared statements), which transaction pooling does not keep.

When it fails, the database must be as it was, and the operator is told how that was
ensured: if its schema is unchanged (the migration ran in a transaction, which PostgreSQL
rolled back) nothing is restored and no write of the live color is lost; if the migration
left changes, the pre-upgrade backup is restored in one transaction (appliance.restore),
and the writes the live color made since the backup are named as lost."""

from __future__ import annotations

import logging
import os
import pwd
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance import appenv, backup, pgtools
from appliance.config import Config
from appliance.errors import AipbxError, CommandError
from appliance.launcher import backend_env
from appliance.paths import Paths
from appliance.releases import SERVICE_USER, Installed
from appliance.run import masked, run_as
from appliance.safefs import remove_tree

log = logging.getLogger("aipbx.migrate")

TIMEOUT_S = 3600.0
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


class MigrationFailed(AipbxError):
    """The release's migration failed; `database` says what became of the database:
    unchanged (nothing to undo), restored (from the pre-upgrade backup) or changed (the
    restore failed too: the operator must act)."""

    def __init__(self, message: str, *, hint: str, database: str, backup_file: Path) -> None:
        super().__init__(message, hint=hint)
        self.database = database
        self.backup_file = backup_file


def backup_before(paths: Paths, cfg: Config, rel: Installed) -> Path:
    """The pre-upgrade backup (waits for a daily backup that happens to run)."""
    done = backup.take(
        paths, cfg, kind=backup.PRE_UPGRADE, label=rel.dirname, prune_old=False, wait=3600
    )
    return Path(done["file"])


def migration_env(
    paths: Paths, cfg: Config, rel: Installed, home: Path
) -> tuple[dict[str, str], list[str]]:
    """The migration's whole environment, and the secret values in it (to mask): the app's
    own, from the function the backend's launcher uses (backend.env, the app's part of
    secrets.env, the release's [env], the appliance's), on a clean base, with no color and
    DB_HOST/DB_PORT at PostgreSQL itself on loopback (SCRAM), not PgBouncer's pool."""
    base = {
        "PATH": BASE_PATH,
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "TMPDIR": str(home),
        "USER": SERVICE_USER,
        "LOGNAME": SERVICE_USER,
    }
    env = backend_env(cfg, None, rel.manifest, rel.path, base, appenv.load(paths))
    env["AIPBX_MIGRATE"] = "1"
    return env, appenv.secret_values(env, rel.manifest.generated_env)


def _run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float, hidden: list[str]
) -> tuple[int, str]:
    """Run as the service user in a process group of its own; (exit code, output with the
    secrets masked). Not started: 127/126; timed out: -1 (the group killed)."""
    try:
        proc = run_as(
            argv, user=SERVICE_USER, env=env, cwd=cwd, timeout=timeout, check=False, secrets=hidden
        )
    except CommandError as e:
        return e.returncode, e.stderr  # already masked
    return proc.returncode, masked([proc.stdout], hidden)[0]


def run_migration(
    paths: Paths,
    cfg: Config,
    rel: Installed,
    backup_file: Path,
    figures: dict[str, Any] | None = None,
    *,
    timeout: float = TIMEOUT_S,
) -> str:
    """Run the release's migration; returns what happened, for the upgrade's steps. On a
    failure raises MigrationFailed after making sure the database is as it was."""
    figures = figures if figures is not None else {}
    before = pgtools.schema_fingerprint(cfg)
    try:
        pw = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise AipbxError(f"there is no {SERVICE_USER} user: reinstall aipbx-appliance") from None
    home = Path(tempfile.mkdtemp(prefix="aipbx-migrate-"))
    try:
        os.chown(home, pw.pw_uid, pw.pw_gid)
        env, hidden = migration_env(paths, cfg, rel, home)
        t0 = time.monotonic()
        code, output = _run(list(rel.manifest.migrate), rel.path, env, timeout, hidden)
        took = time.monotonic() - t0
    finally:
        # The migration (_aipbx) wrote there: removed without recursion or following a link.
        remove_tree(home, ignore_errors=True)
    for line in output.splitlines()[-200:]:
        log.info("migration of %s: %s", rel.dirname, line, extra={"fields": {"action": "migrate"}})
    if code == 0:
        figures.update(database="migrated", migrate_s=round(took, 3))
        return f"migration done in {took:.1f}s"
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    why = f"exit {code}: {lines[-1] if lines else 'no output'}"
    after = pgtools.schema_fingerprint(cfg)
    if after == before:
        figures.update(database="unchanged")
        raise MigrationFailed(
            f"the migration of {rel.dirname} failed ({why}). The database is as it was: the "
            "migration left no change (PostgreSQL rolled its transaction back), so the "
            f"pre-upgrade backup was not restored (it is kept: {backup_file})",
            hint="the live color was not touched; fix the migration and upgrade again",
            database="unchanged",
            backup_file=backup_file,
        )
    from appliance import restore

    taken = backup.read_meta(backup_file) or {}
    since = time.strftime("%H:%M:%S UTC", time.gmtime(float(taken.get("created") or 0)))
    try:
        restore.restore_database(cfg, backup_file, lock_timeout="120s")
    except AipbxError as e:
        figures.update(database="changed")
        raise MigrationFailed(
            f"the migration of {rel.dirname} failed ({why}) and left changes in the "
            f"database; restoring the pre-upgrade backup {backup_file} failed too "
            f"({e.message}): the database is as the migration left it",
            hint=f"the live color was not switched; `aipbxctl restore {backup_file}`",
            database="changed",
            backup_file=backup_file,
        ) from e
    figures.update(database="restored")
    log.error(
        "the migration of %s failed and the database was restored from %s",
        rel.dirname,
        backup_file,
        extra={"fields": {"action": "migrate", "outcome": "restored"}},
    )
    raise MigrationFailed(
        f"the migration of {rel.dirname} failed ({why}) after changing the database: it was "
        f"restored from the pre-upgrade backup {backup_file} in one transaction. Writes the "
        f"live color made since that backup ({since}) are not in it",
        hint="the live color was not switched; fix the migration and upgrade again",
        database="restored",
        backup_file=backup_file,
    )
