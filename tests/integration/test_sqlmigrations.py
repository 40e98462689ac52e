"""The SQL-file runner against a real PostgreSQL (initdb on loopback, SCRAM as in
production): psql runs as another OS user (nobody here, _aipbx on the appliance) with the
app's role, each file once in name order in its own transaction, recorded; a changed file
refused; a failing file rolled back with its ERROR line while the ones before it stay; the
baseline of an empty database; `migrations mark`. And the real aiPBX backend's own files
(from ../shared/realapp): recorded as a baseline on an empty database, and, run against a
database without the app's schema, failing with psql's ERROR line and the file's name."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import sqlmigrations
from appliance.errors import AipbxError, UsageError
from appliance.release.manifest import Kind, Manifest, SqlMigrations
from appliance.releases import Installed
from appliance.sqlmigrations import SqlMigrationFailed, Target
from tests.integration.procs import as_postgres, create_app_database, postgres_cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REAL_TARBALLS = str(REPO.parent / "shared/realapp/aiPBX_backend-*.tar.gz")
ROLE, DB, PASSWORD = "aipbx_user", "aipbx_production", "s3cr'et pw"
OS_USER = "nobody"  # _aipbx on the appliance: any user but root and postgres
PSQL = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Path, int]]:
    d = Path(tempfile.mkdtemp(prefix="aipbx-sqlmig-it-"))
    pg = pwd.getpwnam("postgres")
    os.chown(d, pg.pw_uid, pg.pw_gid)
    try:
        with postgres_cluster(d) as port:
            yield d, port
    finally:
        shutil.rmtree(d)


_n = 0


@pytest.fixture
def target(cluster: tuple[Path, int]) -> Target:
    """A fresh database of the app's, owned by the app's role."""
    global _n
    _n += 1
    workdir, port = cluster
    role, db = f"{ROLE}_{_n}", f"{DB}_{_n}"
    create_app_database(workdir, port, role, db, PASSWORD)
    return Target(database=db, role=role, password=PASSWORD, port=port, os_user=OS_USER)


def sql(t: Target, query: str, cluster: tuple[Path, int]) -> str:
    """A query as postgres through the local socket: what is really in the database."""
    workdir, port = cluster
    out = subprocess.run(
        [*PSQL, "-At", "-h", str(workdir), "-p", str(port), "-d", t.database, "-c", query],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def as_app(t: Target, cluster: tuple[Path, int], query: str) -> None:
    """What the app's own schema sync does: create its tables as its role."""
    workdir, port = cluster
    argv = [*PSQL[4:], "-h", str(workdir), "-p", str(port), "-d", t.database]
    as_postgres([*argv, "-c", f"SET ROLE {t.role}; {query}"])


def release(
    base: Path, files: dict[str, str], *, version: str = "2", baseline: str = "empty-database"
) -> Installed:
    path = base / f"aipbx-{version}"
    d = path / "migrations/postgres"
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.sql"):
        old.unlink()
    for name, text in files.items():
        (d / name).write_text(text)
    m = Manifest(
        name="aipbx",
        version=version,
        kind=Kind.BACKEND,
        command=("node", "dist/main.js"),
        migrations=SqlMigrations("migrations/postgres", baseline),
    )
    return Installed(path.name, m, path, 0.0)


def records(t: Target, cluster: tuple[Path, int]) -> list[tuple[str, str, str]]:
    out = sql(t, f"SELECT name, how, release FROM {sqlmigrations.QUALIFIED} ORDER BY 1", cluster)
    return [tuple(line.split("|")) for line in out.splitlines()]  # type: ignore[misc]


def prepared(t: Target, rel: Installed, *, tracked: bool = True) -> sqlmigrations.Prepared:
    """An upgrade's first SQL step. `tracked`: the database has had the tracking table from
    the start (else one with the app's tables and no records is refused)."""
    if tracked:
        with sqlmigrations.session(t) as s:
            sqlmigrations.ensure_table(s)
    return sqlmigrations.prepare(None, None, rel, t)  # type: ignore[arg-type]


def run(t: Target, rel: Installed, *, tracked: bool = True) -> tuple[str, dict[str, object]]:
    figures: dict[str, object] = {}
    return sqlmigrations.execute(prepared(t, rel, tracked=tracked), figures), figures


ORDERED = {
    # created by the app (the tables exist): only the order of the inserts is checked
    "2026-01-02-second.sql": "INSERT INTO steps (name) VALUES ('second');\n",
    "2026-01-01-first.sql": "INSERT INTO steps (name) VALUES ('first');\n",
    "add-undated.sql": "INSERT INTO steps (name) VALUES ('undated');\n",
    "2026-01-03-third.sql": (
        "-- a comment in Russian: добавляем колонку\n"
        "ALTER TABLE steps ADD COLUMN IF NOT EXISTS note text;\n"
        "INSERT INTO steps (name, note) VALUES ('third', 'ok');\n"
    ),
}


def test_files_run_in_name_order_each_once_and_are_recorded(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    as_app(target, cluster, "CREATE TABLE steps (id serial PRIMARY KEY, name text)")
    rel = release(tmp_path, ORDERED)
    done, figures = run(target, rel)
    assert "4 applied" in done
    assert sql(target, "SELECT string_agg(name, ',' ORDER BY id) FROM steps", cluster) == (
        "first,second,third,undated"
    )
    assert records(target, cluster) == [
        ("2026-01-01-first.sql", "applied", "aipbx-2"),
        ("2026-01-02-second.sql", "applied", "aipbx-2"),
        ("2026-01-03-third.sql", "applied", "aipbx-2"),
        ("add-undated.sql", "applied", "aipbx-2"),
    ]
    owner = sql(
        target,
        f"SELECT tableowner FROM pg_tables WHERE tablename = '{sqlmigrations.TABLE}'",
        cluster,
    )
    assert owner == target.role
    assert figures["database"] == "migrated"
    shipped = {
        f.name: f.sha256
        for f in sqlmigrations.release_files(rel.path, SqlMigrations("migrations/postgres"))
    }
    stored = sql(target, f"SELECT name || '=' || sha256 FROM {sqlmigrations.QUALIFIED}", cluster)
    assert dict(line.split("=") for line in stored.splitlines()) == shipped

    # a second run applies nothing; a newer release runs only its new file
    done, figures = run(target, rel)
    assert done.startswith("SQL files (migrations/postgres): nothing to run")
    assert "database" not in figures
    newer = release(
        tmp_path,
        {**ORDERED, "2026-02-01-fourth.sql": "INSERT INTO steps (name) VALUES ('4');"},
        version="3",
    )
    done, _ = run(target, newer)
    assert "1 applied" in done and "4 already recorded" in done
    assert sql(target, "SELECT count(*) FROM steps", cluster) == "5"


def test_a_changed_file_is_refused_before_any_file_runs(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    as_app(target, cluster, "CREATE TABLE steps (id serial PRIMARY KEY, name text)")
    run(target, release(tmp_path, ORDERED))
    changed = {
        **ORDERED,
        "2026-01-02-second.sql": "INSERT INTO steps (name) VALUES ('second, edited');\n",
        "2026-05-01-new.sql": "INSERT INTO steps (name) VALUES ('new');\n",
    }
    rel = release(tmp_path, changed, version="3")
    with pytest.raises(UsageError) as e:
        run(target, rel)
    assert "2026-01-02-second.sql" in e.value.message and "nothing was run" in e.value.message
    assert sql(target, "SELECT count(*) FROM steps WHERE name = 'new'", cluster) == "0"
    # `migrations mark` accepts the new content; then the upgrade goes on
    files = sqlmigrations.release_files(rel.path, SqlMigrations("migrations/postgres"))
    done = sqlmigrations.mark(target, rel, files, ["migrations/postgres/2026-01-02-second.sql"])
    assert [m["name"] for m in done["marked"]] == ["2026-01-02-second.sql"]
    assert done["marked"][0]["replaced_sha256"]
    out, _ = run(target, rel)
    assert "1 applied (2026-05-01-new.sql)" in out
    assert ("2026-01-02-second.sql", "marked", "aipbx-3") in records(target, cluster)


def test_a_failing_file_is_rolled_back_and_the_earlier_ones_stay(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    as_app(target, cluster, "CREATE TABLE steps (id serial PRIMARY KEY, name text)")
    files = {
        "1-a.sql": "INSERT INTO steps (name) VALUES ('a');\n",
        "2-b.sql": "INSERT INTO steps (name) VALUES ('b');\n",
        "3-c.sql": (
            "INSERT INTO steps (name) VALUES ('c, rolled back');\n"
            "CREATE TABLE c_table (x int);\n"
            "\n"
            'ALTER TABLE "aiCdr" ADD COLUMN IF NOT EXISTS "projectId" INTEGER;\n'
        ),
        "4-d.sql": "INSERT INTO steps (name) VALUES ('d, never ran');\n",
    }
    rel = release(tmp_path, files)
    figures: dict[str, object] = {}
    prep = prepared(target, rel)
    with pytest.raises(SqlMigrationFailed) as e:
        sqlmigrations.execute(prep, figures)
    msg = e.value.message
    assert msg.startswith(
        'SQL migrations of aipbx-2: 2 applied, 3-c.sql failed (line 4): ERROR:  relation "aiCdr" '
        "does not exist."
    ), msg
    assert "rolled back" in msg and "(1-a.sql, 2-b.sql)" in msg and "nothing was switched" in msg
    assert e.value.file == "3-c.sql" and [a.name for a in e.value.applied] == ["1-a.sql", "2-b.sql"]
    assert "aipbxctl migrations mark 3-c.sql" in (e.value.hint or "")
    assert sql(target, "SELECT string_agg(name, ',' ORDER BY id) FROM steps", cluster) == "a,b"
    assert sql(target, "SELECT to_regclass('public.c_table') IS NULL", cluster) == "t"
    assert [r[0] for r in records(target, cluster)] == ["1-a.sql", "2-b.sql"]
    assert figures["database"] == "migrated"  # what `upgrade --restore-db` would undo
    assert figures["sql_migrations"]["failed"] == "3-c.sql"  # type: ignore[index]

    # the fixed file in a new release: the next upgrade runs it and the one after it only
    fixed = {**files, "3-c.sql": "INSERT INTO steps (name) VALUES ('c');\n"}
    done, _ = run(target, release(tmp_path, fixed, version="3"))
    assert "2 applied" in done
    assert sql(target, "SELECT string_agg(name, ',' ORDER BY id) FROM steps", cluster) == (
        "a,b,c,d, never ran"
    )


def test_nothing_applied_says_unchanged(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    as_app(target, cluster, "CREATE TABLE steps (id int)")
    rel = release(tmp_path, {"a.sql": "SELECT 1/0;\n"})
    figures: dict[str, object] = {}
    prep = prepared(target, rel)
    with pytest.raises(
        SqlMigrationFailed, match=r"0 applied, a.sql failed \(line 1\): ERROR:  " "division by zero"
    ):
        sqlmigrations.execute(prep, figures)
    assert figures["database"] == "unchanged"


def test_a_file_whose_record_fails_is_rolled_back_too(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    as_app(target, cluster, "CREATE TABLE steps (id int)")
    sneaky = (
        "INSERT INTO steps VALUES (1);\n"
        f"INSERT INTO {sqlmigrations.QUALIFIED} (name, sha256, how) "
        "VALUES ('x.sql', repeat('a', 64), 'applied');\n"
    )
    with pytest.raises(SqlMigrationFailed) as e:
        run(target, release(tmp_path, {"x.sql": sneaky}))
    assert "0 applied, x.sql failed: ERROR:  duplicate key value" in e.value.message
    assert f"(recording it in {sqlmigrations.QUALIFIED})" in e.value.message
    assert sql(target, "SELECT count(*) FROM steps", cluster) == "0"
    assert records(target, cluster) == []


def test_an_empty_database_is_a_baseline(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    rel = release(tmp_path, {"1.sql": "CREATE TABLE from_sql (x int);\n", "2.sql": "SELECT 1;\n"})
    prep = sqlmigrations.prepare(None, None, rel, target)  # type: ignore[arg-type]
    assert prep.state.app_tables == 0 and not prep.state.tracking
    done, figures = run(target, rel)
    assert "2 file(s) were recorded as baseline without running" in done
    assert sql(target, "SELECT to_regclass('public.from_sql') IS NULL", cluster) == "t"
    assert records(target, cluster) == [
        ("1.sql", "baseline", "aipbx-2"),
        ("2.sql", "baseline", "aipbx-2"),
    ]
    assert "database" not in figures
    # the app then creates its tables; a newer release's new file runs
    as_app(target, cluster, "CREATE TABLE users (id int)")
    newer = release(
        tmp_path,
        {
            "1.sql": "CREATE TABLE from_sql (x int);\n",
            "2.sql": "SELECT 1;\n",
            "3.sql": "ALTER TABLE users ADD COLUMN name text;\n",
        },
        version="3",
    )
    done, _ = run(target, newer)
    assert "1 applied (3.sql)" in done


def test_baseline_never_runs_the_files_on_an_empty_database(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    rel = release(tmp_path, {"1.sql": "CREATE TABLE from_sql (x int);\n"}, baseline="never")
    done, _ = run(target, rel)
    assert "1 applied" in done
    assert sql(target, "SELECT to_regclass('public.from_sql') IS NOT NULL", cluster) == "t"


def test_tables_without_a_tracking_table_are_refused_until_the_operator_marks(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    """A database from before the appliance: nothing runs (one of the real app's files drops
    and recreates tables) until the operator records what it already has."""
    as_app(target, cluster, "CREATE TABLE users (id int)")  # a database from before
    rel = release(
        tmp_path,
        {
            "1.sql": "DROP TABLE users; CREATE TABLE users (id int);\n",
            "2.sql": "ALTER TABLE users ADD COLUMN IF NOT EXISTS a int;\n",
        },
    )
    as_app(target, cluster, "INSERT INTO users VALUES (1)")
    with pytest.raises(UsageError) as e:
        run(target, rel, tracked=False)
    assert "no record of its SQL files" in e.value.message
    assert "migrations mark --all" in (e.value.hint or "")
    assert sql(target, "SELECT count(*) FROM users", cluster) == "1"  # nothing ran
    assert sql(target, f"SELECT to_regclass('{sqlmigrations.QUALIFIED}')", cluster) == ""
    files = sqlmigrations.release_files(rel.path, SqlMigrations("migrations/postgres"))
    sqlmigrations.mark(target, rel, files, ["1.sql"])  # it has had that one
    done, _ = run(target, rel, tracked=False)
    assert "1 applied (2.sql)" in done
    assert sql(target, "SELECT count(*) FROM users", cluster) == "1"
    assert records(target, cluster) == [
        ("1.sql", "marked", "aipbx-2"),
        ("2.sql", "applied", "aipbx-2"),
    ]


def test_mark_then_the_upgrade_skips_the_file(
    tmp_path: Path, target: Target, cluster: tuple[Path, int]
) -> None:
    as_app(target, cluster, "CREATE TABLE users (id int)")
    files = {
        "2026-03-21-chats.sql": "CREATE TABLE IF NOT EXISTS chats (id int);\n",
        "2026-03-21-knowledge-base-tables.sql": "CREATE EXTENSION IF NOT EXISTS vector;\n",
        "2026-04-18-add-interrupt-response.sql": "ALTER TABLE users ADD COLUMN x int;\n",
    }
    rel = release(tmp_path, files)
    with pytest.raises(SqlMigrationFailed) as e:
        run(target, rel)
    assert (
        "1 applied, 2026-03-21-knowledge-base-tables.sql failed (line 1): ERROR:  "
        in e.value.message
    )
    assert 'extension "vector" is not available' in e.value.message
    assert e.value.hint == (
        "the extension vector is not installed on this host; install it or mark the file "
        "handled: aipbxctl migrations mark 2026-03-21-knowledge-base-tables.sql"
    )
    listed = sqlmigrations.listing(sqlmigrations.inspect(target, rel), live=False)
    assert [(f["name"], f["status"]) for f in listed["files"]] == [
        ("2026-03-21-chats.sql", "applied"),
        ("2026-03-21-knowledge-base-tables.sql", "pending"),
        ("2026-04-18-add-interrupt-response.sql", "pending"),
    ]
    all_files = sqlmigrations.release_files(rel.path, SqlMigrations("migrations/postgres"))
    done = sqlmigrations.mark(target, rel, all_files, ["2026-03-21-knowledge-base-tables.sql"])
    assert done["marked"][0]["replaced_sha256"] is None
    again = sqlmigrations.mark(target, rel, all_files, ["2026-03-21-chats.sql"])
    assert again["marked"] == [] and again["already"] == [
        {"name": "2026-03-21-chats.sql", "how": "applied"}
    ]
    with pytest.raises(UsageError, match="ships no nope.sql"):
        sqlmigrations.mark(target, rel, all_files, ["nope.sql"])
    out, _ = run(target, rel)
    assert "1 applied (2026-04-18-add-interrupt-response.sql)" in out
    assert [r[:2] for r in records(target, cluster)] == [
        ("2026-03-21-chats.sql", "applied"),
        ("2026-03-21-knowledge-base-tables.sql", "marked"),
        ("2026-04-18-add-interrupt-response.sql", "applied"),
    ]


def test_a_connection_failure_reads_as_such(tmp_path: Path, target: Target) -> None:
    wrong = Target(target.database, target.role, "wrong", target.port, os_user=OS_USER)
    rel = release(tmp_path, {"1.sql": "SELECT 1;\n"})
    with pytest.raises(AipbxError) as e:
        sqlmigrations.prepare(None, None, rel, wrong)  # type: ignore[arg-type]
    assert e.value.message.startswith(f"cannot query {target.database} as {target.role}: psql")
    assert "password authentication failed" in e.value.message


# --- the real app's files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    found = glob.glob(REAL_TARBALLS)
    assert found, f"the real backend's source is missing: {REAL_TARBALLS}"
    out: dict[str, str] = {}
    with tarfile.open(found[0]) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and parts[1:3] == ["migrations", "postgres"] and len(parts) == 4:
                f = tar.extractfile(m)
                assert f is not None
                out[parts[3]] = f.read().decode()
    assert len(out) >= 30 and "2026-03-21-knowledge-base-tables.sql" in out
    return out


def test_the_real_files_are_a_baseline_on_an_empty_database(
    tmp_path: Path, target: Target, cluster: tuple[Path, int], real_files: dict[str, str]
) -> None:
    rel = release(tmp_path, real_files)
    done, _ = run(target, rel)
    assert f"{len(real_files)} file(s) were recorded as baseline" in done
    recs = records(target, cluster)
    assert [r[0] for r in recs] == sqlmigrations.ordered(real_files)
    assert {r[1] for r in recs} == {"baseline"}
    assert recs[-1][0] == "add-dynamic-analytics-fields.sql"  # undated: after the dated ones
    # the app's tables are not there: nothing of the files ran
    assert sql(target, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", cluster) == "1"
    listed = sqlmigrations.listing(sqlmigrations.inspect(target, rel), live=True)
    assert listed["counts"] == {"baseline": len(real_files)} and listed["next_upgrade"] == "run"


def test_the_real_files_without_the_apps_schema_fail_with_their_error(
    tmp_path: Path, target: Target, cluster: tuple[Path, int], real_files: dict[str, str]
) -> None:
    # A table of the app's but not its schema: the first file needs "aiCdr".
    as_app(target, cluster, "CREATE TABLE users (id int)")
    rel = release(tmp_path, real_files)
    with pytest.raises(SqlMigrationFailed) as e:
        run(target, rel)
    assert e.value.message.startswith(
        "SQL migrations of aipbx-2: 0 applied, 2026-02-25-unify-analytics.sql failed (line "
    )
    assert 'ERROR:  relation "aiCdr" does not exist' in e.value.message
    assert records(target, cluster) == []


def test_the_real_vector_file_reads_as_a_missing_extension(
    tmp_path: Path, target: Target, cluster: tuple[Path, int], real_files: dict[str, str]
) -> None:
    as_app(target, cluster, "CREATE TABLE users (id int)")
    name = "2026-03-21-knowledge-base-tables.sql"
    rel = release(tmp_path, {name: real_files[name]})
    with pytest.raises(SqlMigrationFailed) as e:
        run(target, rel)
    assert f'0 applied, {name} failed (line 5): ERROR:  extension "vector" is not available' in (
        e.value.message
    )
    assert e.value.hint == (
        "the extension vector is not installed on this host; install it or mark the file "
        f"handled: aipbxctl migrations mark {name}"
    )


# --- aipbxctl migrations list | mark -------------------------------------------------------------


def test_the_cli_lists_and_marks(
    tmp_path: Path,
    target: Target,
    cluster: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dataclasses import replace

    from appliance import __main__ as cli
    from appliance.paths import Paths
    from appliance.release.manifest import render_manifest

    paths = Paths(tmp_path / "root")
    paths.config.parent.mkdir(parents=True)
    paths.config.write_text(
        f'[database]\nname = "{target.database}"\nuser = "{target.role}"\n'
        f"postgres_port = {target.port}\n"
    )
    paths.secrets.write_text(f"DB_PASS={target.password}\n")
    real = sqlmigrations.target
    monkeypatch.setattr(sqlmigrations, "target", lambda p, c: replace(real(p, c), os_user=OS_USER))
    monkeypatch.setenv("AIPBX_ROOT", str(paths.root))
    as_app(target, cluster, "CREATE TABLE users (id int)")
    for version, files in (
        ("1", {"1.sql": "SELECT 1;\n"}),
        ("2", {"1.sql": "SELECT 1;\n", "2.sql": "CREATE EXTENSION IF NOT EXISTS vector;\n"}),
    ):
        rel = release(paths.releases, files, version=version)
        (rel.path / "aipbx-release.toml").write_text(render_manifest(rel.manifest))
        os.utime(rel.path, (int(version), int(version)))  # installed in this order
    paths.state.parent.mkdir(parents=True)
    paths.state.write_text('{"live_color": "blue", "colors": {"blue": "aipbx-1"}}\n')

    assert cli.main(["migrations", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("aipbx-2: 2 SQL file(s) in migrations/postgres;")
    assert "tracking table public.aipbx_schema_migrations not created yet" in out
    assert "an upgrade to it runs the 2 pending file(s)" in out

    assert cli.main(["migrations", "mark", "2.sql"]) == 0
    assert capsys.readouterr().out.startswith("marked 2.sql of aipbx-2 as handled (sha256 ")
    assert cli.main(["migrations", "list", "--release", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["release"] == "aipbx-1" and data["live"] is True
    assert data["files"][0]["status"] == "pending" and data["not_shipped"] == ["2.sql"]
    assert cli.main(["migrations", "mark", "nope.sql"]) == 2
    assert "aipbx-2 ships no nope.sql" in capsys.readouterr().err
    assert records(target, cluster) == [("2.sql", "marked", "aipbx-2")]
