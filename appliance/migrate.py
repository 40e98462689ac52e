"""Migrations inside an upgrade: a pre-upgrade backup (pg_dump -Fc, verified with
pg_restore --list), then the release's migrate command, run from the new release as the
service user with the backend's environment. A failed migration restores the backup."""

from __future__ import annotations

import os
import time
from pathlib import Path

from appliance import secrets
from appliance.colors import Color
from appliance.config import Config
from appliance.errors import AipbxError, CommandError
from appliance.launcher import backend_env
from appliance.paths import Paths
from appliance.releases import SERVICE_USER, Installed
from appliance.run import run


def backup_before(paths: Paths, cfg: Config, rel: Installed) -> Path:
    paths.backups.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = paths.backups / f"pre-upgrade-{rel.dirname}-{stamp}.dump"
    tmp = dest.with_name(f".{dest.name}.partial")
    run(
        ["runuser", "-u", "postgres", "--", "pg_dump", "-Fc", "-f", str(tmp), cfg.database.name],
        timeout=3600,
        hint="the upgrade stopped before any change",
    )
    run(["runuser", "-u", "postgres", "--", "pg_restore", "--list", str(tmp)], timeout=600)
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)
    return dest


def run_migration(paths: Paths, cfg: Config, rel: Installed, backup: Path) -> None:
    env = backend_env(cfg, Color.BLUE, rel.manifest, rel.path, {"PATH": "/usr/bin:/bin"})
    env["DB_HOST"] = "127.0.0.1"  # from the host, PgBouncer on loopback
    secret = secrets.load(paths.secrets)
    env.update(secret)
    # runuser without --login keeps the environment: the password never enters an argv.
    argv = ["runuser", "-u", SERVICE_USER, "--", *rel.manifest.migrate]
    try:
        run(argv, cwd=str(rel.path), env=env, timeout=3600, secrets=list(secret.values()))
    except CommandError as e:
        run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "pg_restore",
                "--clean",
                "--if-exists",
                "--single-transaction",
                "-d",
                cfg.database.name,
                str(backup),
            ],
            timeout=3600,
        )
        raise AipbxError(
            f"the migration of {rel.dirname} failed ({e.message}); the database was restored "
            f"from {backup}",
            hint="the live color was not touched; fix the migration and upgrade again",
        ) from e
