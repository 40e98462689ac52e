"""The SQL-file runner's pure parts: order, the decision per file, psql's ERROR line and the
hint, the manifest's [migrations], `release pack --sql-migrations`, and the upgrade's order
of SQL files, backup and migrate command (with the database parts faked)."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from appliance import migrate, sqlmigrations, upgrade
from appliance.actions import migrations_cmd
from appliance.cli import parser
from appliance.errors import ExitCode, UsageError
from appliance.paths import Paths
from appliance.release.manifest import (
    Kind,
    Manifest,
    SqlMigrations,
    load_manifest,
    manifest_from_dict,
    parse_manifest,
    render_manifest,
)
from appliance.release.pack import pack
from appliance.releases import Installed
from appliance.sqlmigrations import (
    ErrorLine,
    How,
    Plan,
    Record,
    SqlFile,
    Status,
    error_line,
    failed_message,
    failure_hint,
    ordered,
    plan,
)

REAL_NAMES = [
    "add-dynamic-analytics-fields.sql",
    "2026-03-21-knowledge-base-tables.sql",
    "2026-02-26-add-webhook-headers.sql",
    "2026-03-21-chats.sql",
    "2026-02-25-unify-analytics.sql",
]


def f(name: str, content: str = "") -> SqlFile:
    sha = hashlib.sha256((content or name).encode()).hexdigest()
    return SqlFile(name, sha, Path("/r") / name)


def rec(file: SqlFile, how: How = How.APPLIED, sha: str | None = None) -> Record:
    return Record(file.name, sha or file.sha256, how, "aipbx-1")


# --- order and decisions ---------------------------------------------------------------------


def test_name_order_is_byte_order_dated_files_first() -> None:
    assert ordered(REAL_NAMES) == [
        "2026-02-25-unify-analytics.sql",
        "2026-02-26-add-webhook-headers.sql",
        "2026-03-21-chats.sql",
        "2026-03-21-knowledge-base-tables.sql",
        "add-dynamic-analytics-fields.sql",
    ]
    # upper case before lower case, as `LC_ALL=C ls` lists them
    assert ordered(["b.sql", "B.sql", "a.sql"]) == ["B.sql", "a.sql", "b.sql"]


def test_pending_files_run_in_name_order_and_recorded_ones_are_skipped() -> None:
    a, b, c = f("2026-01-01-a.sql"), f("2026-01-02-b.sql"), f("2026-01-03-c.sql")
    p = plan([c, a, b], {b.name: rec(b)}, app_tables=55)
    assert p.run == (a, c)
    assert p.recorded == (b,) and p.baseline == () and p.changed == ()


def test_a_second_run_has_nothing_to_do() -> None:
    files = [f("1.sql"), f("2.sql")]
    records = {x.name: rec(x) for x in files}
    assert plan(files, records, app_tables=3) == Plan(recorded=tuple(files))


def test_no_tables_of_the_app_means_baseline_unless_never() -> None:
    a, b = f("a.sql"), f("b.sql")
    p = plan([a, b], {}, app_tables=0)
    assert p.baseline == (a, b) and p.run == ()
    p = plan([a, b], {}, app_tables=0, baseline="never")
    assert p.run == (a, b) and p.baseline == ()
    # a release with a new file onto a database whose app never created its tables
    p = plan([a, b], {a.name: rec(a, How.BASELINE)}, app_tables=0)
    assert p.baseline == (b,) and p.recorded == (a,)


def test_tables_without_a_tracking_table_run_every_file() -> None:
    files = [f("a.sql"), f("b.sql")]
    assert plan(files, {}, app_tables=55).run == tuple(files)


def test_a_changed_file_is_found_whatever_its_record_says() -> None:
    a, b = f("a.sql"), f("b.sql")
    for how in How:
        p = plan([a, b], {a.name: rec(a, how, sha="0" * 64)}, app_tables=5)
        assert [x for x, _ in p.changed] == [a]
        assert sqlmigrations.status_of(a, rec(a, how, sha="0" * 64)) is Status.CHANGED
    with pytest.raises(UsageError) as e:
        sqlmigrations.refuse_changed("aipbx-2", p)
    assert "a.sql" in e.value.message and "nothing was run" in e.value.message
    assert e.value.exit_code == ExitCode.USAGE
    assert "aipbxctl migrations mark a.sql --release aipbx-2" in (e.value.hint or "")


def test_a_recorded_file_no_longer_shipped_is_fine() -> None:
    a = f("a.sql")
    gone = f("old.sql")
    p = plan([a], {gone.name: rec(gone), a.name: rec(a)}, app_tables=5)
    assert p.not_shipped == ("old.sql",) and p.changed == () and p.run == ()


def test_status_of_each_kind_of_record() -> None:
    a = f("a.sql")
    assert sqlmigrations.status_of(a, None) is Status.PENDING
    for how in How:
        assert sqlmigrations.status_of(a, rec(a, how)) == Status(how.value)


def test_bad_names() -> None:
    assert sqlmigrations.bad_name("2026-01-01 x'y.sql") is None
    assert sqlmigrations.bad_name("a\nb.sql") is not None
    assert sqlmigrations.bad_name(".sql") is not None


# --- psql's output -----------------------------------------------------------------------------

VECTOR = """\
psql:/tmp/aipbx-sql-x/0003/2026-03-21-knowledge-base-tables.sql:5: ERROR:  extension "vector" is not available
DETAIL:  Could not open extension control file "/usr/share/postgresql/15/extension/vector.control": No such file or directory.
HINT:  The extension must first be installed on the system where PostgreSQL is running.
"""  # noqa: E501

OLD_VECTOR = """\
psql:/tmp/x/kb.sql:5: ERROR:  could not open extension control file "/usr/share/postgresql/15/extension/vector.control": No such file or directory
"""  # noqa: E501


def test_the_error_line_not_the_last_line() -> None:
    e = error_line(VECTOR)
    assert e == ErrorLine('ERROR:  extension "vector" is not available', 5)
    assert str(e) == 'line 5: ERROR:  extension "vector" is not available'


def test_the_first_error_wins_over_notices_and_context() -> None:
    out = (
        'psql:/t/a.sql:2: NOTICE:  relation "x" already exists, skipping\n'
        "check_name | column_exists\n"
        'psql:/t/a.sql:9: ERROR:  column "y" of relation "x" does not exist\n'
        "LINE 1: ALTER TABLE x DROP COLUMN y;\n"
        "                                  ^\n"
        "CONTEXT:  SQL statement\n"
    )
    assert error_line(out) == ErrorLine('ERROR:  column "y" of relation "x" does not exist', 9)


def test_a_path_with_colons_keeps_its_line_number() -> None:
    out = 'psql:/t/we:ird:name.sql:12: ERROR:  relation "aiCdr" does not exist\n'
    assert error_line(out) == ErrorLine('ERROR:  relation "aiCdr" does not exist', 12)


def test_psqls_own_errors() -> None:
    conn = (
        'psql: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
        'password authentication failed for user "aipbx_user"\n'
    )
    assert error_line(conn).text.startswith("psql: error: connection to server")
    assert error_line(conn).line is None
    missing = "psql:/t/w.sql:2: error: /t/kb.sql: No such file or directory\n"
    assert error_line(missing) == ErrorLine("psql: error: /t/kb.sql: No such file or directory", 2)
    assert error_line("") == ErrorLine("no output")
    assert error_line("something\nthe end\n") == ErrorLine("the end")


def test_an_extension_reads_as_such() -> None:
    name = "2026-03-21-knowledge-base-tables.sql"
    for out in (VECTOR, OLD_VECTOR):
        hint = failure_hint(out, name)
        assert hint == (
            "the extension vector is not installed on this host; install it or mark the file "
            f"handled: aipbxctl migrations mark {name}"
        )
    denied = 'psql:/t/k.sql:1: ERROR:  permission denied to create extension "vector"\n'
    hint = failure_hint(denied, name, database="aipbx_production", role="aipbx_user")
    assert "the role aipbx_user may not create the extension vector" in hint
    assert "-d aipbx_production" in hint and f"aipbxctl migrations mark {name}" in hint
    other = 'psql:/t/a.sql:3: ERROR:  relation "aiCdr" does not exist\n'
    assert "extension" not in failure_hint(other, "a.sql")
    assert "aipbxctl migrations mark a.sql" in failure_hint(other, "a.sql")


def test_the_failure_message_counts_what_applied() -> None:
    err = ErrorLine('ERROR:  extension "vector" is not available', 5)
    msg = failed_message("aipbx-2", "kb.sql", err, ["a.sql", "b.sql"])
    assert msg.startswith(
        'SQL migrations of aipbx-2: 2 applied, kb.sql failed (line 5): ERROR:  extension "vector"'
    )
    assert "rolled back" in msg and "(a.sql, b.sql)" in msg and "nothing was switched" in msg
    msg = failed_message("aipbx-2", "kb.sql", ErrorLine("no output"), [])
    assert "0 applied, kb.sql failed: no output" in msg
    assert "nothing else was applied" in msg


def test_records_sql_quotes_names_and_a_mark_replaces() -> None:
    a = f("it's.sql")
    sql = sqlmigrations.upsert_sql([a], How.BASELINE, "aipbx-1")
    assert "'it''s.sql'" in sql and "DO NOTHING" in sql
    assert "standard_conforming_strings = on" in sql
    assert "DO UPDATE" in sqlmigrations.upsert_sql([a], How.MARKED, "aipbx-1")
    with pytest.raises(UsageError):
        sqlmigrations.sql_literal("a\0b")


def test_parse_records() -> None:
    text = (
        '[{"name": "a.sql", "sha256": "ab", "how": "marked", "release": "x-1", '
        '"applied_at": 1700000000.5}]'
    )
    assert sqlmigrations.parse_records(text) == {
        "a.sql": Record("a.sql", "ab", How.MARKED, "x-1", 1700000000.5)
    }
    assert sqlmigrations.parse_records("[]") == {}


# --- the release's files ---------------------------------------------------------------------


def test_release_files_hashed_in_order_only_sql(tmp_path: Path) -> None:
    rel = tmp_path / "aipbx-2"
    d = rel / "migrations/postgres"
    d.mkdir(parents=True)
    for n in REAL_NAMES:
        (d / n).write_text(f"-- {n}\n")
    (d / "README.md").write_text("not SQL")
    (d / "linked.sql").symlink_to("2026-03-21-chats.sql")  # inside the release: fine
    files = sqlmigrations.release_files(rel, SqlMigrations("migrations/postgres"))
    assert [x.name for x in files] == ordered([*REAL_NAMES, "linked.sql"])
    chats = next(x for x in files if x.name == "2026-03-21-chats.sql")
    assert chats.sha256 == hashlib.sha256(b"-- 2026-03-21-chats.sql\n").hexdigest()


def test_release_files_refused_outside_the_release(tmp_path: Path) -> None:
    rel = tmp_path / "aipbx-2"
    (rel / "sql").mkdir(parents=True)
    outside = tmp_path / "shared"
    outside.mkdir()
    (outside / "x.sql").write_text("DROP TABLE users;")
    (rel / "sql/x.sql").symlink_to(outside / "x.sql")
    with pytest.raises(UsageError, match="leads out of the release"):
        sqlmigrations.release_files(rel, SqlMigrations("sql"))
    (rel / "static").symlink_to(outside)  # a shared dir is a link out
    with pytest.raises(UsageError, match="leads out of the release"):
        sqlmigrations.release_files(rel, SqlMigrations("static"))
    with pytest.raises(UsageError, match="is not a directory"):
        sqlmigrations.release_files(rel, SqlMigrations("nope"))
    os.unlink(rel / "sql/x.sql")
    (rel / "sql/a\nb.sql").write_text("")
    with pytest.raises(UsageError, match="control character"):
        sqlmigrations.release_files(rel, SqlMigrations("sql"))


# --- manifest and pack -----------------------------------------------------------------------

BASE = 'name = "aipbx"\nversion = "2"\nkind = "backend"\ncommand = ["node", "dist/main.js"]\n'


def test_manifest_migrations_table() -> None:
    m = parse_manifest(BASE + '[migrations]\nsql_dir = "./migrations/postgres/"\n')
    assert m.migrations == SqlMigrations("migrations/postgres", "empty-database")
    assert parse_manifest(render_manifest(m)) == m
    m = parse_manifest(BASE + '[migrations]\nsql_dir = "sql"\nbaseline = "never"\n')
    assert m.migrations == SqlMigrations("sql", "never")
    # both a command and SQL files: the SQL files run first, then the command
    both = parse_manifest(BASE + 'migrate = ["node", "m.js"]\n[migrations]\nsql_dir = "sql"\n')
    assert both.migrate == ("node", "m.js") and both.migrations is not None
    assert parse_manifest(BASE).migrations is None


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('migrations = "sql"\n', "migrations"),
        ("[migrations]\n", "migrations.sql_dir"),
        ('[migrations]\nsql_dir = "../x"\n', "migrations.sql_dir"),
        ('[migrations]\nsql_dir = "/srv/sql"\n', "migrations.sql_dir"),
        ('[migrations]\nsql_dir = "static/sql"\n', "migrations.sql_dir"),
        ('[migrations]\nsql_dir = "sql"\nbaseline = "always"\n', "migrations.baseline"),
        ('[migrations]\nsql_dir = "sql"\ndir = "x"\n', "migrations.dir"),
    ],
)
def test_manifest_migrations_refused(extra: str, key: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_manifest(BASE + extra)
    assert f": {key}:" in e.value.message


def test_a_frontend_has_no_sql() -> None:
    data: dict[str, Any] = {"name": "spa", "version": "1", "kind": "frontend"}
    data["migrations"] = {"sql_dir": "sql"}
    with pytest.raises(UsageError, match="migrations: a frontend runs nothing"):
        manifest_from_dict(data)


def test_pack_sets_the_sql_dir(tmp_path: Path) -> None:
    src = tmp_path / "app"
    (src / "migrations/postgres").mkdir(parents=True)
    (src / "migrations/postgres/2026-01-01-a.sql").write_text("SELECT 1;\n")
    art = pack(
        src,
        tmp_path / "out",
        name="aipbx",
        version="2",
        command=["node", "dist/main.js"],
        sql_migrations="migrations/postgres",
    )
    with tarfile.open(art) as tar:
        member = tar.extractfile("aipbx-release.toml")
        assert member is not None
        m = parse_manifest(member.read().decode())
    assert m.migrations == SqlMigrations("migrations/postgres")
    with pytest.raises(UsageError, match="is not a directory"):
        pack(src, tmp_path / "o2", name="a", version="1", command=["x"], sql_migrations="nope")
    # the manifest's own [migrations] keeps its other key when only one flag is given
    (src / "aipbx-release.toml").write_text(
        BASE + '[migrations]\nsql_dir = "migrations/postgres"\nbaseline = "never"\n'
    )
    art = pack(src, tmp_path / "o3", version="3", sql_baseline="empty-database")
    with tarfile.open(art) as tar:
        member = tar.extractfile("aipbx-release.toml")
        assert member is not None
        m = parse_manifest(member.read().decode())
    assert m.migrations == SqlMigrations("migrations/postgres", "empty-database")
    assert load_manifest(src / "aipbx-release.toml").migrations == SqlMigrations(
        "migrations/postgres", "never"
    )


def test_cli_parses_migrations_and_pack_flags() -> None:
    a = parser().parse_args(["migrations", "list", "--json", "--release", "2.5.5"])
    assert (a.command, a.migrations_command, a.json, a.release) == (
        "migrations",
        "list",
        True,
        "2.5.5",
    )
    a = parser().parse_args(["migrations", "mark", "a.sql", "b.sql"])
    assert a.files == ["a.sql", "b.sql"] and a.release is None
    a = parser().parse_args(
        [
            "release",
            "pack",
            "d",
            "--sql-migrations",
            "migrations/postgres",
            "--sql-baseline",
            "never",
        ]
    )
    assert (a.sql_migrations, a.sql_baseline) == ("migrations/postgres", "never")
    for files, all_ in (([], False), (["x.sql"], True)):  # files or --all, one of them
        with pytest.raises(UsageError, match="name the files to mark, or --all"):
            migrations_cmd.run_mark(Paths(Path("/nonexistent")), {"files": files, "all": all_})


# --- the upgrade's order (database parts faked) ------------------------------------------------


class _Tl:
    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.steps: list[tuple[str, str]] = []

    def step(self, step: Any, detail: str) -> None:
        self.steps.append((str(step), detail))


def _ctx(tl: _Tl) -> upgrade.Ctx:
    return upgrade.Ctx(paths=None, cfg=None, services=None, tl=tl)  # type: ignore[arg-type]


def _rel(migrate_cmd: tuple[str, ...] = (), sql: bool = True) -> Installed:
    m = Manifest(
        name="aipbx",
        version="2",
        kind=Kind.BACKEND,
        command=("node",),
        migrate=migrate_cmd,
        migrations=SqlMigrations("sql") if sql else None,
    )
    return Installed("aipbx-2", m, Path("/nonexistent"), 0.0)


def _fake(
    monkeypatch: pytest.MonkeyPatch, calls: list[str], run: tuple[SqlFile, ...], fail: str = ""
) -> None:
    def prepare(_p: Any, _c: Any, rel: Installed) -> sqlmigrations.Prepared:
        calls.append("prepare")
        return sqlmigrations.Prepared(
            rel,
            sqlmigrations.Target("db", "role", "pw", 5432),
            run,
            sqlmigrations.DbState(5, True, {}),
            Plan(run=run),
        )

    def execute(_prep: Any, figures: dict[str, Any]) -> str:
        calls.append("sql")
        figures["sql_migrations"] = {"applied": [x.name for x in run]}
        if fail == "sql":
            raise sqlmigrations.SqlMigrationFailed(
                "1 applied, b.sql failed", hint="h", file="b.sql", error=ErrorLine("E"), applied=[]
            )
        return "sql done"

    def backup_before(*_a: Any) -> Path:
        calls.append("backup")
        return Path("/var/backups/aipbx/pre.dump")

    def run_migration(*_a: Any, **_k: Any) -> str:
        calls.append("command")
        if fail == "command":
            raise migrate.MigrationFailed(
                "the migration failed", hint="h", database="restored", backup_file=Path("/b")
            )
        return "command done"

    monkeypatch.setattr(sqlmigrations, "prepare", prepare)
    monkeypatch.setattr(sqlmigrations, "execute", execute)
    monkeypatch.setattr(migrate, "backup_before", backup_before)
    monkeypatch.setattr(migrate, "run_migration", run_migration)


def test_sql_then_the_command_after_one_backup(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake(monkeypatch, calls, (f("a.sql"),))
    tl = _Tl()
    upgrade._migrate(_ctx(tl), _rel(("node", "m.js")))
    assert calls == ["prepare", "backup", "sql", "command"]
    assert [d for _, d in tl.steps] == [
        "pre-upgrade backup /var/backups/aipbx/pre.dump",
        "sql done",
        "command done",
    ]


def test_no_backup_when_no_sql_file_will_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake(monkeypatch, calls, ())
    upgrade._migrate(_ctx(_Tl()), _rel())
    assert calls == ["prepare", "sql"]


def test_a_failed_sql_file_stops_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake(monkeypatch, calls, (f("a.sql"),), fail="sql")
    tl = _Tl()
    with pytest.raises(sqlmigrations.SqlMigrationFailed):
        upgrade._migrate(_ctx(tl), _rel(("node", "m.js")))
    assert calls == ["prepare", "backup", "sql"]
    assert tl.steps[-1][1] == "FAILED: b.sql: E; nothing switched"


def test_a_restore_after_the_command_says_it_undid_the_sql(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    _fake(monkeypatch, calls, (f("a.sql"),), fail="command")
    with pytest.raises(migrate.MigrationFailed) as e:
        upgrade._migrate(_ctx(_Tl()), _rel(("node", "m.js")))
    assert "also undid the 1 SQL file(s) applied before the command" in e.value.message


def test_the_error_line_knows_which_file_psql_was_reading() -> None:
    out = (
        "psql:aipbx-record.sql:2: ERROR:  duplicate key value violates unique constraint "
        '"aipbx_schema_migrations_pkey"\n'
    )
    e = error_line(out)
    assert e.source == "aipbx-record.sql" and e.line == 2
    assert e == ErrorLine(
        'ERROR:  duplicate key value violates unique constraint "aipbx_schema_migrations_pkey"', 2
    )


def test_a_database_from_before_the_appliance_is_refused_until_marked() -> None:
    a, b = f("a.sql"), f("b.sql")
    p = plan([a, b], {}, app_tables=55)
    with pytest.raises(UsageError) as e:
        sqlmigrations.refuse_unrecorded("aipbx-2", sqlmigrations.DbState(55, False, {}), p)
    assert "no record of its SQL files" in e.value.message and "Nothing was run" in e.value.message
    assert "migrations mark --all --release aipbx-2" in (e.value.hint or "")
    # once the tracking table exists (a mark created it), the pending files run
    sqlmigrations.refuse_unrecorded("aipbx-2", sqlmigrations.DbState(55, True, {}), p)
    # an empty database is a baseline, not a refusal
    empty = plan([a, b], {}, app_tables=0)
    sqlmigrations.refuse_unrecorded("aipbx-2", sqlmigrations.DbState(0, False, {}), empty)


def test_mark_takes_files_or_all() -> None:
    a = parser().parse_args(["migrations", "mark", "--all"])
    assert a.all and a.files == []
    a = parser().parse_args(["migrations", "mark", "x.sql", "y.sql"])
    assert not a.all and a.files == ["x.sql", "y.sql"]
