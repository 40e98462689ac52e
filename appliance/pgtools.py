"""The PostgreSQL client tools (pg_dump, pg_restore, psql) run as postgres, through the
cluster's local socket with peer authentication, never through PgBouncer.

aipbx-backup.service (User=postgres) runs them itself; `aipbxctl` as root runs them through
`runuser -u postgres`. A file they read is opened by the caller (root when it is root), so
postgres needs no access to a file the operator names."""

from __future__ import annotations

import hashlib
import os
import pwd
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import Config
from appliance.errors import AipbxError, UsageError
from appliance.run import run_bytes

if TYPE_CHECKING:
    from subprocess import CompletedProcess

PG_USER = "postgres"


def pg_ids() -> tuple[int, int]:
    """postgres's uid and gid."""
    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError:
        raise AipbxError("there is no postgres user: is PostgreSQL installed?") from None
    return pw.pw_uid, pw.pw_gid


def as_postgres(argv: Sequence[str]) -> list[str]:
    """argv run as postgres: directly when we are postgres (the unit), through runuser when
    root (aipbxctl)."""
    uid, _ = pg_ids()
    if os.geteuid() == uid:
        return list(argv)
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *argv]
    raise UsageError("backups and restores run as root (or postgres)", hint="use sudo")


def pg_run(
    argv: Sequence[str],
    *,
    stdin: Path | int | None = None,
    timeout: float | None = 6 * 3600,
    hint: str | None = None,
) -> CompletedProcess[bytes]:
    """Run a pg tool as postgres, binary output captured; `stdin` is opened here (as root
    when we are root), or an fd opened by the caller. Raises CommandError."""
    return run_bytes(as_postgres(argv), stdin=stdin, timeout=timeout, hint=hint)


def db_args(cfg: Config) -> list[str]:
    # The local socket (peer authentication as postgres), the cluster's port.
    return ["-p", str(cfg.database.postgres_port)]


def psql(cfg: Config, sql: str, *, db: str | None = None) -> str:
    argv = ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", *db_args(cfg)]
    argv += ["-d", db or cfg.database.name, "-c", sql]
    return pg_run(argv, timeout=3600).stdout.decode().strip()


def db_bytes(cfg: Config) -> int:
    return int(psql(cfg, f"SELECT pg_database_size('{cfg.database.name}')", db="postgres"))


def schema_fingerprint(cfg: Config) -> str:
    """sha256 of the database's schema (pg_dump --schema-only): what a migration changes."""
    out = pg_run(["pg_dump", "--schema-only", *db_args(cfg), cfg.database.name]).stdout
    # pg_dump >= 15.14 wraps its script in \restrict KEY ... \unrestrict KEY with a random
    # key per run: not part of the schema.
    lines = [ln for ln in out.splitlines() if not ln.startswith((b"\\restrict ", b"\\unrestrict "))]
    return hashlib.sha256(b"\n".join(lines)).hexdigest()


def table_rows(cfg: Config) -> dict[str, int]:
    """Exact row counts of every table of the database, schema.table -> rows."""
    sql = (
        "SELECT n.nspname || '.' || c.relname, (xpath('/row/c/text()', query_to_xml("
        "format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')"
        "))[1]::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', "
        "'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1"
    )
    rows: dict[str, int] = {}
    for line in psql(cfg, sql).splitlines():
        name, _, count = line.rpartition("|")
        if name:
            rows[name] = int(count)
    return rows
