"""The built-in runner for a release's SQL files (`[migrations] sql_dir` in its manifest).

Each `*.sql` file directly in that directory runs once, in name order (byte order: the real
app's dated `2026-…` files first, then any undated name), each in its own transaction with
the row that records it: `psql -X -v ON_ERROR_STOP=1 --single-transaction -f FILE -f RECORD`
as the app's role (cfg.database.user, run by the OS user _aipbx) against PostgreSQL itself
on loopback, not PgBouncer. The records live in the app's database, in
`public.aipbx_schema_migrations` (owned by the app's role, which creates it):

    name text primary key, sha256 text, applied_at timestamptz,
    how text: 'applied' (it ran), 'baseline' (recorded without running: see below) or
    'marked' (the operator said it was handled by hand: `aipbxctl migrations mark`),
    release text (the release dir that recorded it)

Before anything runs, every shipped file is compared with its record: a file whose sha256
differs from the recorded one was changed after it was applied, and the upgrade is refused,
naming it. A recorded name that is no longer shipped is ignored.

Baseline: when the database has no tables yet (a first deploy: the real app creates its
schema itself, with Sequelize sync, when it starts), the files describe changes to a schema
that does not exist yet and that the app will create already changed, so every pending
file is recorded as `baseline` without running (unless the manifest says `baseline =
"never"`). When the app's tables exist, pending files run, tracking table or not (a
database from before the appliance: each file runs once, then is recorded).

A failing file stops the run: its transaction (the file and its record) is rolled back, the
files applied before it in the same run stay applied and recorded (each is a unit of its
own; the next upgrade skips them), and the error names the file and quotes psql's ERROR
line. Nothing is restored (`upgrade --restore-db` puts the pre-upgrade backup back when the
operator wants the earlier ones undone too).

A file runs alone: a private copy (root-owned, in a root-owned directory, so the files root
writes there are never in a directory the psql user controls) of exactly the bytes hashed,
so `\\i`/`\\ir` of its neighbours is not supported, nor a file that commits by itself
(its own BEGIN/COMMIT would end the runner's transaction early)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance import secrets
from appliance.config import Config
from appliance.errors import AipbxError, CommandError, UsageError
from appliance.paths import Paths
from appliance.release.manifest import SqlMigrations
from appliance.releases import SERVICE_USER, Installed
from appliance.run import run_as

log = logging.getLogger("aipbx.migrate")

TABLE = "aipbx_schema_migrations"
QUALIFIED = f"public.{TABLE}"
TIMEOUT_S = 3600.0  # one file
QUERY_TIMEOUT_S = 120.0
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"

CREATE_TABLE = f"""CREATE TABLE IF NOT EXISTS {QUALIFIED} (
    name text PRIMARY KEY,
    sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{{64}}$'),
    applied_at timestamptz NOT NULL DEFAULT now(),
    how text NOT NULL CHECK (how IN ('applied', 'baseline', 'marked')),
    release text
);
"""

# The row of a file that ran; in the file's transaction (psql's --single-transaction).
RECORD_NAME = "aipbx-record.sql"
RECORD_SQL = (
    f"INSERT INTO {QUALIFIED} (name, sha256, how, release)\n"
    "VALUES (:'aipbx_name', :'aipbx_sha256', 'applied', :'aipbx_release');\n"
)

# Relations that make a database "the app's": anything but the catalogs and our table.
APP_TABLES_SQL = (
    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' "
    f"AND NOT (n.nspname = 'public' AND c.relname = '{TABLE}')"
)
STATE_SQL = (
    f"SELECT json_build_object('app_tables', ({APP_TABLES_SQL}), "
    f"'tracking', to_regclass('{QUALIFIED}') IS NOT NULL)"
)
RECORDS_SQL = (
    "SELECT coalesce(json_agg(json_build_object('name', name, 'sha256', sha256, 'how', how, "
    "'release', release, 'applied_at', extract(epoch FROM applied_at)) ORDER BY name), "
    f"'[]') FROM {QUALIFIED}"
)


class How(StrEnum):
    """How a recorded file was handled."""

    APPLIED = "applied"
    BASELINE = "baseline"
    MARKED = "marked"


class Status(StrEnum):
    """A shipped file against the records (`aipbxctl migrations list`)."""

    APPLIED = "applied"
    BASELINE = "baseline"
    MARKED = "marked"
    PENDING = "pending"  # not recorded: the next upgrade runs it (or records it as baseline)
    CHANGED = "changed"  # recorded with another sha256: an upgrade is refused


@dataclass(frozen=True)
class SqlFile:
    name: str
    sha256: str
    path: Path  # where it is in the release (resolved, inside the release)


@dataclass(frozen=True)
class Record:
    name: str
    sha256: str
    how: How
    release: str | None = None
    applied_at: float = 0.0


# --- pure: order, decisions, errors ---------------------------------------------------------


def ordered(names: Iterable[str]) -> list[str]:
    """Name order: the bytes of the UTF-8 names (the same as `LC_ALL=C ls`)."""
    return sorted(names, key=lambda n: n.encode())


def bad_name(name: str) -> str | None:
    """Why a shipped file's name cannot be run and recorded, or None."""
    if not name.endswith(".sql") or name == ".sql":
        return "is not a NAME.sql file"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "has a control character in its name"
    return None


def status_of(f: SqlFile, rec: Record | None) -> Status:
    if rec is None:
        return Status.PENDING
    if rec.sha256 != f.sha256:
        return Status.CHANGED
    return Status(rec.how.value)


@dataclass(frozen=True)
class Plan:
    """What an upgrade does with a release's files."""

    run: tuple[SqlFile, ...] = ()  # pending, to run in this order
    baseline: tuple[SqlFile, ...] = ()  # pending, recorded as baseline without running
    recorded: tuple[SqlFile, ...] = ()  # already applied, baseline or marked: skipped
    changed: tuple[tuple[SqlFile, Record], ...] = ()  # refused
    not_shipped: tuple[str, ...] = ()  # recorded names this release does not ship


def plan(
    files: Sequence[SqlFile],
    records: Mapping[str, Record],
    *,
    app_tables: int,
    baseline: str = "empty-database",
) -> Plan:
    """Decide per file. `app_tables`: relations of the app's in the database (0: nothing
    yet, the app will create its schema: pending files are a baseline)."""
    by_name = {f.name: f for f in files}
    names = ordered(by_name)
    recorded, pending, changed = [], [], []
    for name in names:
        f, rec = by_name[name], records.get(name)
        st = status_of(f, rec)
        if st is Status.PENDING:
            pending.append(f)
        elif st is Status.CHANGED:
            assert rec is not None
            changed.append((f, rec))
        else:
            recorded.append(f)
    not_shipped = tuple(ordered(n for n in records if n not in by_name))
    as_baseline = app_tables == 0 and baseline == "empty-database"
    return Plan(
        run=() if as_baseline else tuple(pending),
        baseline=tuple(pending) if as_baseline else (),
        recorded=tuple(recorded),
        changed=tuple(changed),
        not_shipped=not_shipped,
    )


_PSQL_DIAG = re.compile(
    r"^psql:(?P<file>.*):(?P<line>\d+): (?P<level>ERROR|FATAL|PANIC):\s+(?P<msg>.*)$"
)
_ANY_DIAG = re.compile(r"\b(?P<level>ERROR|FATAL|PANIC):\s+(?P<msg>.*)$")
_PSQL_OWN = re.compile(r"^psql:(?:(?P<file>.*):(?P<line>\d+): )?\s*error: (?P<msg>.*)$")


@dataclass(frozen=True)
class ErrorLine:
    """The line of psql's output that says why a file failed."""

    text: str  # e.g. 'ERROR:  extension "vector" is not available'
    line: int | None = None  # the line of the file psql was reading
    source: str | None = field(default=None, compare=False)  # that file, as psql named it

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}" if self.line is not None else self.text


def error_line(output: str) -> ErrorLine:
    """psql's ERROR line (its first one; the DETAIL/HINT/CONTEXT lines after it are in the
    journal), else psql's own error (a connection or a file it could not read), else the
    last line."""
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        m = _PSQL_DIAG.match(ln)
        if m:
            return ErrorLine(f"{m['level']}:  {m['msg']}", int(m["line"]), m["file"])
    for ln in lines:
        m = _PSQL_OWN.match(ln)
        if m:
            return ErrorLine(
                f"psql: error: {m['msg']}", int(m["line"]) if m["line"] is not None else None
            )
    for ln in lines:
        m = _ANY_DIAG.search(ln)
        if m:
            return ErrorLine(f"{m['level']}:  {m['msg']}")
    return ErrorLine(lines[-1] if lines else "no output")


_EXT_MISSING = (
    re.compile(r'extension "(?P<x>[^"]+)" is not available'),
    re.compile(r'could not open extension control file "[^"]*/(?P<x>[^"/]+)\.control"'),
)
_EXT_DENIED = re.compile(r'permission denied to create extension "(?P<x>[^"]+)"')
_EXT_ANY = re.compile(r'extension "(?P<x>[^"]+)"')


def failure_hint(error: str, name: str, *, database: str = "", role: str = "") -> str:
    """What the operator can do about a file that failed with `error` (psql's output)."""
    mark = f"aipbxctl migrations mark {name}"
    for rx in _EXT_MISSING:
        m = rx.search(error)
        if m:
            return (
                f"the extension {m['x']} is not installed on this host; install it or mark the "
                f"file handled: {mark}"
            )
    m = _EXT_DENIED.search(error)
    if m:
        who = f"the role {role}" if role else "the app's role"
        return (
            f"{who} may not create the extension {m['x']}; create it as postgres "
            f"(runuser -u postgres -- psql -d {database or 'DB'} -c 'CREATE EXTENSION "
            f"{m['x']}') or mark the file handled: {mark}"
        )
    m = _EXT_ANY.search(error)
    if m:
        return (
            f"the error is about the extension {m['x']}: install it on this host, or mark the "
            f"file handled: {mark}"
        )
    return (
        "the live color was not touched; fix the file in a new release, or apply it by hand "
        f"and mark it handled ({mark}), then upgrade again"
    )


def sql_literal(value: str) -> str:
    """A string constant (standard_conforming_strings, on since PostgreSQL 9.1)."""
    if "\0" in value:
        raise UsageError(f"{value!r}: a NUL byte cannot be stored")
    return "'" + value.replace("'", "''") + "'"


def upsert_sql(files: Sequence[SqlFile], how: How, release: str) -> str:
    """One statement recording `files` as `how`: a baseline never replaces a record, a mark
    replaces one (the operator's word for that content)."""
    rows = ",\n".join(
        f"({sql_literal(f.name)}, {sql_literal(f.sha256)}, {sql_literal(how.value)}, "
        f"{sql_literal(release)})"
        for f in files
    )
    if how is How.MARKED:
        conflict = (
            "ON CONFLICT (name) DO UPDATE SET sha256 = EXCLUDED.sha256, how = EXCLUDED.how, "
            "release = EXCLUDED.release, applied_at = now()"
        )
    else:
        conflict = "ON CONFLICT (name) DO NOTHING"
    return (
        "SET standard_conforming_strings = on;\n"
        f"INSERT INTO {QUALIFIED} (name, sha256, how, release) VALUES\n{rows}\n{conflict};\n"
    )


def parse_records(text: str) -> dict[str, Record]:
    out: dict[str, Record] = {}
    for row in json.loads(text or "[]"):
        try:
            how = How(row["how"])
        except ValueError:
            continue  # the table's CHECK forbids it
        out[row["name"]] = Record(
            name=row["name"],
            sha256=row["sha256"],
            how=how,
            release=row.get("release"),
            applied_at=float(row.get("applied_at") or 0),
        )
    return out


def short(sha: str) -> str:
    return sha[:12]


# --- the release's files ---------------------------------------------------------------------


def release_files(release: Path, mig: SqlMigrations) -> list[SqlFile]:
    """The *.sql files of `mig.sql_dir`, in name order, hashed. Root reads them: each must
    resolve inside the release (root's tree; a shared dir is a link out of it, to a
    directory the app's user owns, so a path through one is refused)."""
    top = release.resolve()
    where = (release / mig.sql_dir).resolve()
    if where != top and top not in where.parents:
        raise UsageError(
            f"{release.name}: [migrations] sql_dir {mig.sql_dir!r} leads out of the release",
            hint="SQL files belong to the release, not to a shared or outside directory",
        )
    if not where.is_dir():
        raise UsageError(
            f"{release.name}: [migrations] sql_dir {mig.sql_dir!r} is not a directory",
            hint="pack the release with its SQL directory (`release pack --sql-migrations DIR`)",
        )
    files = []
    for entry in os.scandir(where):
        if not entry.name.endswith(".sql"):
            continue
        shown = f"{mig.sql_dir}/{entry.name}"
        why = bad_name(entry.name)
        if why:
            raise UsageError(f"{release.name}: {shown!r} {why}", hint="rename it")
        real = Path(entry.path).resolve()
        if top not in real.parents:
            raise UsageError(
                f"{release.name}: {shown} leads out of the release", hint="ship the file itself"
            )
        st = real.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{release.name}: {shown} is not a regular file")
        files.append(SqlFile(entry.name, _sha256_file(real), real))
    by_name = {f.name: f for f in files}
    return [by_name[n] for n in ordered(by_name)]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the database, as the app's role ---------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The app's database as the app's role: psql runs as `os_user` with the role's password
    in its environment (never in an argv), against PostgreSQL itself on loopback."""

    database: str
    role: str
    password: str
    port: int
    host: str = "127.0.0.1"
    os_user: str = SERVICE_USER


def target(paths: Paths, cfg: Config) -> Target:
    pw = secrets.load(paths.secrets).get("DB_PASS", "")
    if not pw:
        raise AipbxError(
            f"no DB_PASS in {paths.secrets}: the app's role cannot log in",
            hint="`aipbxctl setup` generates it",
        )
    return Target(
        database=cfg.database.name,
        role=cfg.database.user,
        password=pw,
        port=cfg.database.postgres_port,
    )


@dataclass
class Session:
    """psql runs against one Target from a private directory (root's, readable by all)."""

    target: Target
    home: Path
    _n: int = field(default=0)

    def env(self) -> dict[str, str]:
        t = self.target
        return {
            "PATH": BASE_PATH,
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
            "USER": t.os_user,
            "LOGNAME": t.os_user,
            "PGHOST": t.host,
            "PGPORT": str(t.port),
            "PGUSER": t.role,
            "PGDATABASE": t.database,
            "PGPASSWORD": t.password,
            "PGAPPNAME": "aipbx-migrations",
            "PGCONNECT_TIMEOUT": "10",
            "PGCLIENTENCODING": "UTF8",
        }

    def put(self, name: str, data: bytes) -> Path:
        """A new root-owned 0644 file in the private directory (never an existing one)."""
        self._n += 1
        d = self.home / f"{self._n:04d}"
        d.mkdir(mode=0o755)
        path = d / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        return path

    def psql(self, args: Sequence[str], *, timeout: float = QUERY_TIMEOUT_S) -> tuple[int, str]:
        """(exit code, stdout and stderr interleaved); 127/126 when psql cannot start, -1 on
        a timeout (its process group killed)."""
        argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *args]
        hidden = [self.target.password]
        try:
            proc = run_as(
                argv,
                user=self.target.os_user,
                env=self.env(),
                cwd=self.home,
                timeout=timeout,
                check=False,
                secrets=hidden,
            )
        except CommandError as e:
            return e.returncode, e.stderr
        return proc.returncode, proc.stdout

    def query(self, sql: str) -> str:
        code, out = self.psql(["-At", "-c", sql])
        if code != 0:
            why = error_line(out)
            raise AipbxError(
                f"cannot query {self.target.database} as {self.target.role}: {why}",
                hint="is PostgreSQL running? `aipbxctl doctor`",
            )
        return out.strip()

    def script(self, name: str, sql: str) -> None:
        """Run `sql` in one transaction."""
        path = self.put(name, sql.encode())
        code, out = self.psql(["--single-transaction", "-f", str(path)])
        if code != 0:
            raise AipbxError(
                f"{self.target.database}: {name} failed as {self.target.role}: {error_line(out)}",
                hint="`aipbxctl logs aipbxctl` has psql's output",
            )


@contextmanager
def session(t: Target) -> Iterator[Session]:
    home = Path(tempfile.mkdtemp(prefix="aipbx-sql-"))
    try:
        os.chmod(home, 0o755)  # root's; the psql user reads, never writes
        yield Session(t, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class DbState:
    app_tables: int
    tracking: bool
    records: dict[str, Record]


def read_state(s: Session) -> DbState:
    st = json.loads(s.query(STATE_SQL))
    records = parse_records(s.query(RECORDS_SQL)) if st["tracking"] else {}
    return DbState(int(st["app_tables"]), bool(st["tracking"]), records)


def ensure_table(s: Session) -> None:
    s.script("create-tracking-table.sql", CREATE_TABLE)


def record(s: Session, files: Sequence[SqlFile], how: How, release: str) -> None:
    if files:
        s.script(f"record-{how.value}.sql", upsert_sql(files, how, release))


def _log_output(name: str, output: str) -> None:
    for ln in output.splitlines()[-200:]:
        log.info("%s: %s", name, ln, extra={"fields": {"action": "migrate", "file": name}})


@dataclass(frozen=True)
class Applied:
    name: str
    seconds: float


class SqlMigrationFailed(AipbxError):
    """A file failed: it was rolled back; `applied` ran before it in the same run and stay
    applied and recorded."""

    def __init__(
        self, message: str, *, hint: str, file: str, error: ErrorLine, applied: Sequence[Applied]
    ) -> None:
        super().__init__(message, hint=hint)
        self.file = file
        self.error = error
        self.applied = list(applied)


def failed_message(release: str, file: str, error: ErrorLine, applied: Sequence[str]) -> str:
    """Pure: "N applied, FILE failed: ERROR ..." and what became of the database."""
    at = f" (line {error.line})" if error.line is not None else ""
    if applied:
        before = (
            f"the {len(applied)} applied before it in this run stay applied and recorded "
            f"({', '.join(applied)}); the next upgrade skips them"
        )
    else:
        before = "nothing else was applied in this run"
    return (
        f"SQL migrations of {release}: {len(applied)} applied, {file} failed{at}: "
        f"{error.text}. Its transaction was rolled back (the database has none of its "
        f"changes); {before}; nothing was switched"
    )


def apply_file(s: Session, f: SqlFile, release: str, *, timeout: float = TIMEOUT_S) -> None:
    """Run one file and record it, in one transaction. Raises SqlMigrationFailed (with no
    `applied`: the caller knows) when psql fails; the transaction is then rolled back."""
    data = f.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != f.sha256:
        raise UsageError(f"{f.name} changed while the upgrade ran", hint="upgrade again")
    copy = s.put(f.name, data)
    rec = s.put("record.sql", RECORD_SQL.encode())
    code, out = s.psql(
        [
            "--single-transaction",
            "-v",
            f"aipbx_name={f.name}",
            "-v",
            f"aipbx_sha256={f.sha256}",
            "-v",
            f"aipbx_release={release}",
            "-f",
            str(copy),
            "-f",
            str(rec),
        ],
        timeout=timeout,
    )
    # psql names the copy it read: name the file instead ("psql:NAME.sql:5: ERROR: ...")
    out = out.replace(str(copy), f.name).replace(str(rec), RECORD_NAME)
    _log_output(f.name, out)  # the journal; the ERROR line goes into the error itself
    if code != 0:
        why = error_line(out)
        if why.source == RECORD_NAME:  # the file ran; its record did not go in
            why = ErrorLine(f"{why.text} (recording it in {QUALIFIED})")
        if code == -1:
            why = ErrorLine(f"timed out after {timeout:g}s (its process group was killed)")
        raise SqlMigrationFailed(
            str(why),
            hint=failure_hint(out, f.name, database=s.target.database, role=s.target.role),
            file=f.name,
            error=why,
            applied=[],
        )


def refuse_changed(rel_name: str, p: Plan) -> None:
    if not p.changed:
        return
    names = ", ".join(
        f"{f.name} (recorded {short(r.sha256)} as {r.how.value}"
        f"{' by ' + r.release if r.release else ''}, shipped {short(f.sha256)})"
        for f, r in p.changed
    )
    first = p.changed[0][0].name
    raise UsageError(
        f"{rel_name}: {len(p.changed)} SQL file(s) changed after they were recorded: {names}; "
        "nothing was run",
        hint="ship the file as it was applied and put a change in a new file; if the database "
        f"already has the new content, `aipbxctl migrations mark {first} --release {rel_name}`",
    )


# --- the upgrade's step ----------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A release's files checked against the database: nothing has run yet."""

    release: Installed
    target: Target
    files: tuple[SqlFile, ...]
    state: DbState
    plan: Plan


def inspect(t: Target, rel: Installed) -> Prepared:
    """Read the release's files and the records, and decide. Runs and changes nothing."""
    mig = rel.manifest.migrations
    if mig is None:
        raise UsageError(
            f"{rel.dirname} has no SQL migrations ([migrations] sql_dir)",
            hint="`aipbxctl release pack --sql-migrations DIR` packs a release with them",
        )
    files = tuple(release_files(rel.path, mig))
    with session(t) as s:
        st = read_state(s)
    p = plan(files, st.records, app_tables=st.app_tables, baseline=mig.baseline)
    return Prepared(rel, t, files, st, p)


def prepare(paths: Paths, cfg: Config, rel: Installed, t: Target | None = None) -> Prepared:
    """inspect(), refusing a changed file and an unrecorded database: the upgrade's first
    database step."""
    prep = inspect(t or target(paths, cfg), rel)
    refuse_changed(rel.dirname, prep.plan)
    refuse_unrecorded(rel.dirname, prep.state, prep.plan)
    return prep


def refuse_unrecorded(rel_name: str, st: DbState, p: Plan) -> None:
    """Pure: a database that has the app's tables but no tracking table came from before
    the appliance (a Docker deployment, a restore): it holds an unknown share of the files'
    changes, and running them all could undo some (the real app ships one that drops and
    recreates its operator_* tables). Nothing runs until the operator records what it has
    (`migrations mark`, which creates the tracking table); then the rest run."""
    if st.tracking or st.app_tables == 0 or not p.run:
        return
    raise UsageError(
        f"{rel_name}: the database has {st.app_tables} table(s) of the app but no record of "
        f"its SQL files ({QUALIFIED} does not exist): it came from before the appliance, "
        f"and running all {len(p.run)} file(s) could redo or undo changes it already has. "
        "Nothing was run or switched",
        hint=f"record the files it already has: `aipbxctl migrations mark --all --release "
        f"{rel_name}` when it is up to date, or `aipbxctl migrations mark FILE...` for some "
        "(the others then run at the next upgrade); `aipbxctl migrations list` shows them",
    )


def execute(prep: Prepared, figures: dict[str, Any] | None = None) -> str:
    """Record the baseline or run the pending files, each once, in order; what happened,
    for the upgrade's steps. Fills figures["sql_migrations"] and, once a file applied,
    figures["database"] = "migrated" (what `upgrade --restore-db` undoes)."""
    figures = figures if figures is not None else {}
    rel, p = prep.release, prep.plan
    assert rel.manifest.migrations is not None
    where = rel.manifest.migrations.sql_dir
    out: dict[str, Any] = {
        "sql_dir": where,
        "files": len(prep.files),
        "recorded_before": len(p.recorded),
        "applied": [],
        "baseline": [f.name for f in p.baseline],
    }
    figures["sql_migrations"] = out
    if not p.run and not p.baseline:
        return f"SQL files ({where}): nothing to run, all {len(p.recorded)} already recorded"
    applied: list[Applied] = []
    with session(prep.target) as s:
        ensure_table(s)
        if p.baseline:
            record(s, p.baseline, How.BASELINE, rel.dirname)
            log.info(
                "%s: %d SQL file(s) recorded as baseline without running: the database has "
                "no tables yet",
                rel.dirname,
                len(p.baseline),
                extra={"fields": {"action": "migrate", "outcome": "baseline"}},
            )
            return (
                f"SQL files ({where}): the database has no tables yet (the app creates its "
                f"schema when it starts), so {len(p.baseline)} file(s) were recorded as "
                "baseline without running"
            )
        for f in p.run:
            t0 = time.monotonic()
            try:
                apply_file(s, f, rel.dirname)
            except SqlMigrationFailed as e:
                out["failed"] = f.name
                out["error"] = str(e.error)
                raise _failed(rel, f, e, applied, figures) from None
            took = time.monotonic() - t0
            applied.append(Applied(f.name, took))
            out["applied"].append(f.name)
            figures["database"] = "migrated"
            log.info(
                "%s: applied %s in %.2fs",
                rel.dirname,
                f.name,
                took,
                extra={"fields": {"action": "migrate", "file": f.name, "outcome": "applied"}},
            )
    names = ", ".join(a.name for a in applied)
    total = sum(a.seconds for a in applied)
    return (
        f"SQL files ({where}): {len(applied)} applied ({names}) in {total:.1f}s; "
        f"{len(p.recorded)} already recorded"
    )


def _failed(
    rel: Installed,
    f: SqlFile,
    e: SqlMigrationFailed,
    applied: list[Applied],
    figures: dict[str, Any],
) -> SqlMigrationFailed:
    if not applied:
        figures["database"] = "unchanged"
    message = failed_message(rel.dirname, f.name, e.error, [a.name for a in applied])
    log.error(
        "%s", message, extra={"fields": {"action": "migrate", "file": f.name, "outcome": "failed"}}
    )
    return SqlMigrationFailed(
        message, hint=e.hint or "", file=f.name, error=e.error, applied=applied
    )


# --- aipbxctl migrations list | mark ---------------------------------------------------------


def rows(files: Sequence[SqlFile], records: Mapping[str, Record]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        rec = records.get(f.name)
        out.append(
            {
                "name": f.name,
                "status": str(status_of(f, rec)),
                "sha256": f.sha256,
                "recorded_sha256": rec.sha256 if rec else None,
                "recorded_at": rec.applied_at if rec else None,
                "recorded_by": rec.release if rec else None,
            }
        )
    return out


def listing(prep: Prepared, *, live: bool) -> dict[str, Any]:
    p, st = prep.plan, prep.state
    mig = prep.release.manifest.migrations
    assert mig is not None
    counts: dict[str, int] = {}
    for r in rows(prep.files, st.records):
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    next_upgrade = "refused" if p.changed else "baseline" if p.baseline else "run"
    return {
        "release": prep.release.dirname,
        "live": live,
        "sql_dir": mig.sql_dir,
        "baseline": mig.baseline,
        "database": prep.target.database,
        "tracking_table": st.tracking,
        "app_tables": st.app_tables,
        "files": rows(prep.files, st.records),
        "counts": counts,
        "not_shipped": list(p.not_shipped),
        "next_upgrade": next_upgrade,
        "pending": [f.name for f in (p.run or p.baseline)],
    }


def mark(
    t: Target, rel: Installed, files: Sequence[SqlFile], wanted: Sequence[str]
) -> dict[str, Any]:
    """Record `wanted` (names or paths of files of `rel`) as marked with their sha256,
    without running them. A file already recorded with that sha256 is left as it is."""
    by_name = {f.name: f for f in files}
    chosen: list[SqlFile] = []
    for w in wanted:
        name = Path(w).name
        if name not in by_name:
            assert rel.manifest.migrations is not None
            shown = name if name.isprintable() and name else repr(w)
            raise UsageError(
                f"{rel.dirname} ships no {shown} in {rel.manifest.migrations.sql_dir}",
                hint=f"`aipbxctl migrations list --release {rel.dirname}` lists its files",
            )
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    with session(t) as s:
        st = read_state(s)
        # recorded with this content (applied, baseline or marked): nothing to do
        already = [f for f in chosen if f.name in st.records]
        already = [f for f in already if status_of(f, st.records[f.name]) is not Status.CHANGED]
        todo = [f for f in chosen if f not in already]
        replaced = {f.name: st.records[f.name].sha256 for f in todo if f.name in st.records}
        if todo:
            ensure_table(s)
            record(s, todo, How.MARKED, rel.dirname)
    return {
        "release": rel.dirname,
        "marked": [
            {"name": f.name, "sha256": f.sha256, "replaced_sha256": replaced.get(f.name)}
            for f in todo
        ],
        "already": [{"name": f.name, "how": st.records[f.name].how.value} for f in already],
    }
