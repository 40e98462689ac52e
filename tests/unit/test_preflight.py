"""Before an upgrade changes anything: room on the disks (appliance.preflight), PostgreSQL
answering (appliance.pgready), and a downgrade confirmed (appliance.versions)."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path
from typing import Any

import pytest

from appliance import pgready, preflight, releases, state, upgrade
from appliance.colors import Color
from appliance.errors import AipbxError, CommandError, ExitCode, UsageError
from appliance.paths import Paths
from appliance.release.manifest import Kind, Manifest
from appliance.release.pack import pack
from appliance.versions import compare, debian_compare
from tests.rollout_world import CFG, Units, World, install

MIB = preflight.MIB


# --- versions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.4.0", "1.10.0"),
        ("2.5.3", "v2.5.4"),
        ("2.0.0-rc.1", "2.0.0"),
        ("2.0.0rc1", "2.0.0"),
        ("2.0.0.dev3", "2.0.0a1"),
        ("2.0.0b2", "2.0.0rc1"),
        ("1.0", "1.0.post1"),
        ("1.0~rc1", "1.0"),  # Debian's tilde
        ("2024.03.01-abc", "2024.03.02-abc"),
        ("1.0-1", "1.0-10"),
        ("1.0a", "1.0b"),
    ],
)
def test_versions_compare_sensibly(older: str, newer: str) -> None:
    assert compare(older, newer) < 0 and compare(newer, older) > 0


@pytest.mark.parametrize(("a", "b"), [("1.0", "1.0.0"), ("3.1.0+build7", "3.1.0"), ("v2", "2")])
def test_versions_that_are_the_same(a: str, b: str) -> None:
    assert compare(a, b) == 0


def test_debian_order_matches_dpkg() -> None:
    ordered = ["1.0~~", "1.0~~a", "1.0~", "1.0", "1.0a", "1.0+", "1.0.1", "1.1"]
    for a, b in itertools.pairwise(ordered):
        assert debian_compare(a, b) < 0, (a, b)


def _m(version: str, name: str = "app") -> Manifest:
    return Manifest(name=name, version=version, kind=Kind.BACKEND, command=("x",))


def test_a_downgrade_is_named() -> None:
    warning = preflight.downgrade(_m("1.9.0"), _m("1.10.0"))
    assert warning and "app-1.9.0 is older than the live app-1.10.0" in warning
    assert "migrations are not undone" in warning
    assert preflight.downgrade(_m("1.10.0"), _m("1.9.0")) is None
    assert preflight.downgrade(_m("1.0"), _m("2.0", name="other")) is None
    assert preflight.downgrade(_m("1.0"), None) is None


# --- room ---------------------------------------------------------------------------------


def test_the_unpacked_size_comes_from_the_gzip_trailer() -> None:
    assert preflight.unpacked_estimate(10 * MIB, 100 * MIB) == 100 * MIB + 100 * MIB // 8
    # ISIZE is the size mod 4 GiB: below the compressed size it has wrapped
    wrapped = preflight.unpacked_estimate(3 << 30, 1 << 30)
    assert wrapped == (5 << 30) + (5 << 30) // 8
    assert preflight.unpacked_estimate(7, None) == 14


def test_shortfalls_add_up_needs_on_one_file_system(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    needs = preflight.needs(paths, 100 * MIB)
    one = {n.path: preflight.Room(n.path, 1, 180 * MIB, 10**6) for n in needs}
    short = preflight.shortfalls(needs, one)
    # 100 MiB to unpack, 64 MiB slack, 32 MiB for the state
    assert len(short) == 1 and "need about 196 MiB" in short[0]
    two = {n.path: preflight.Room(n.path, i, 180 * MIB, 10**6) for i, n in enumerate(needs)}
    assert preflight.shortfalls(needs, two) == []
    few_inodes = {n.path: preflight.Room(n.path, i, 10**12, 10) for i, n in enumerate(needs)}
    assert any("free inodes" in s for s in preflight.shortfalls(needs, few_inodes))


def test_no_room_is_one_line_and_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(tmp_path)
    monkeypatch.setattr(preflight, "measure", lambda p: preflight.Room(p, 1, 5 * MIB, 10**6))
    with pytest.raises(preflight.NoSpace) as e:
        preflight.check_space(paths, unpack_bytes=50 * MIB)
    assert e.value.exit_code == ExitCode.FAILURE
    assert "not enough disk space to upgrade" in e.value.message
    assert "has 5 MiB free" in e.value.message and "nothing was changed" in e.value.message
    assert "\n" not in e.value.message and e.value.hint and "df -h" in e.value.hint


def test_gzip_isize(tmp_path: Path) -> None:
    f = tmp_path / "a.gz"
    f.write_bytes(gzip.compress(b"x" * 123456))
    assert preflight.gzip_isize(f) == 123456
    (tmp_path / "short").write_bytes(b"abc")
    assert preflight.gzip_isize(tmp_path / "short") is None
    assert preflight.gzip_isize(tmp_path / "missing") is None


# --- the upgrade's order -------------------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Paths, Units, Path]:
    w = World(tmp_path / "world.json")
    w.set("clock", ["boot-a", 1000.0])
    install(monkeypatch, w)
    paths, units = Paths(tmp_path / "root"), Units(w)
    paths.colors.mkdir(parents=True)  # the package makes it
    out = tmp_path / "artifacts"
    out.mkdir()
    for version in ("1.0", "2.0"):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "main.js").write_text(f"// {version}\n")
        pack(src, out, name="app", version=version, kind="backend", command=["node", "main.js"])
    return paths, units, out


def _ctx(paths: Paths, units: Units) -> upgrade.Ctx:
    return upgrade.Ctx(paths, CFG, units, upgrade.Timeline(out=lambda _s: None))


def _upgrade_to(paths: Paths, units: Units, artifact: Path) -> upgrade.Ctx:
    ctx = _ctx(paths, units)
    upgrade.upgrade(ctx, artifact, upgrade.Options(probation_s=0, drain_s=0))
    return ctx


def test_an_upgrade_without_room_changes_nothing(
    host: tuple[Paths, Units, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, units, out = host
    monkeypatch.setattr(preflight, "measure", lambda p: preflight.Room(p, 1, 1 * MIB, 10**6))
    with pytest.raises(preflight.NoSpace):
        _upgrade_to(paths, units, out / "app-2.0.tar.gz")
    assert not paths.releases.exists() or not any(paths.releases.iterdir())
    assert not paths.state.exists()


def test_a_downgrade_needs_a_yes(host: tuple[Paths, Units, Path]) -> None:
    paths, units, out = host
    _upgrade_to(paths, units, out / "app-2.0.tar.gz")
    ctx = _ctx(paths, units)  # its confirm says no, as a script without --yes does
    with pytest.raises(UsageError, match="older than the live app-2.0.*refused") as e:
        upgrade.upgrade(ctx, out / "app-1.0.tar.gz", upgrade.Options(probation_s=0, drain_s=0))
    assert e.value.hint and "--yes" in e.value.hint
    assert not (paths.releases / "app-1.0").exists()
    assert "WARNING" in ctx.tl.steps[-1]["detail"]
    asked: list[str] = []
    ctx = _ctx(paths, units)
    ctx.confirm = asked.append  # --yes
    upgrade.upgrade(ctx, out / "app-1.0.tar.gz", upgrade.Options(probation_s=0, drain_s=0))
    assert asked and "deploy it anyway" in asked[0]
    assert state.load(paths.state).live_release() == "app-1.0"


def test_the_confirmation_refuses_a_script_without_yes(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.actions import rollout

    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(UsageError, match="refused without --yes"):
        rollout.confirm_risky("app-1.0 is older", yes=False)
    rollout.confirm_risky("app-1.0 is older", yes=True)


def test_a_rollback_says_what_it_does_to_the_database() -> None:
    st = state.State(live_color=Color.GREEN, previous_color=Color.BLUE)
    st = st.with_(colors={"green": "app-2.0", "blue": "app-1.0"})
    opts = upgrade.Options(probation_s=0, drain_s=0)
    line = upgrade._rollback_plan(st, "app-1.0", True, opts)
    assert line.startswith("from app-2.0 (on green) to app-1.0: instant")
    assert "migrations app-2.0 ran are not undone" in line
    line = upgrade._rollback_plan(st, "app-1.0", False, upgrade.Options(0, 0, restore_db=True))
    assert "started on the idle color" in line and "goes back to the backup" in line


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        'psql: error: connection to server at "127.0.0.1", port 5432 failed: Connection refused',
        'pg_dump: error: connection to server on socket "/var/run/postgresql/.s.PGSQL.5432" '
        "failed: No such file or directory\n\tIs the server running locally and accepting",
        "FATAL:  the database system is starting up",
        "server closed the connection unexpectedly",
        "Error: connect ECONNREFUSED 127.0.0.1:5432",
    ],
)
def test_unreachable_texts(text: str) -> None:
    assert pgready.looks_unreachable(text)


@pytest.mark.parametrize(
    "text",
    [
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password '
        'authentication failed for user "aipbx"',
        'ERROR:  extension "vector" is not available',
    ],
)
def test_other_database_errors_are_not_unreachable(text: str) -> None:
    assert not pgready.looks_unreachable(text)


def test_a_migration_upgrade_is_refused_while_postgresql_is_down(
    host: tuple[Paths, Units, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    paths, units, out = host
    src = tmp_path / "src-3.0"
    src.mkdir()
    (src / "main.js").write_text("// 3\n")
    art = pack(
        src, out, name="app", version="3.1", kind="backend", command=["node"], migrate=["node", "m"]
    )
    down = pgready.Down("127.0.0.1:5432", "no answer")
    monkeypatch.setattr(pgready, "_ask", lambda cfg, t: down)
    with pytest.raises(pgready.PostgresDown) as e:
        _upgrade_to(paths, units, art)
    assert e.value.message == (
        "PostgreSQL is not answering on 127.0.0.1:5432 (no answer): start it "
        "(systemctl start postgresql) and run the upgrade again; nothing was unpacked, "
        "migrated or switched"
    )
    assert e.value.exit_code == ExitCode.FAILURE
    assert not (paths.releases / "app-3.1").exists()


class _Tl:
    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.steps: list[tuple[str, str]] = []

    def step(self, step: Any, detail: str) -> None:
        self.steps.append((str(step), detail))


def _rel(migrate: tuple[str, ...] = ("node", "m.js")) -> releases.Installed:
    m = Manifest(name="aipbx", version="2", kind=Kind.BACKEND, command=("x",), migrate=migrate)
    return releases.Installed("aipbx-2", m, Path("/nonexistent"), 0.0)


def test_a_migration_that_meets_a_stopped_postgresql_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance import migrate

    stderr = (
        'pg_dump: error: connection to server on socket "/var/run/postgresql/.s.PGSQL.5432" '
        "failed: No such file or directory\n\tIs the server running locally and accepting "
        "connections on that socket?\n"
    )

    def backup_before(*_a: Any) -> Path:
        e = CommandError(["runuser", "-u", "postgres", "--", "pg_dump"], 1, stderr)
        raise AipbxError(f"pg_dump of aipbx failed: {e.message}") from e

    monkeypatch.setattr(migrate, "backup_before", backup_before)
    monkeypatch.setattr(
        pgready, "_ask", lambda cfg, t: pgready.Down("the local socket", "no answer")
    )
    tl = _Tl()
    ctx = upgrade.Ctx(paths=None, cfg=CFG, services=None, tl=tl)  # type: ignore[arg-type]
    with pytest.raises(pgready.PostgresDown) as e:
        upgrade._migrate(ctx, _rel())
    assert "runuser" not in e.value.message
    assert e.value.message.startswith("PostgreSQL is not answering on the local socket")
    assert e.value.message.endswith("nothing was migrated or switched")
    assert e.value.hint and "systemctl start postgresql" in e.value.hint
    # the server answers: the error is something else, and is left as it is
    monkeypatch.setattr(pgready, "_ask", lambda cfg, t: True)
    with pytest.raises(AipbxError, match="pg_dump of aipbx failed: runuser exited with 1"):
        upgrade._migrate(ctx, _rel())


def test_a_migration_cut_off_by_postgresql_says_what_became_of_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance import migrate

    monkeypatch.setattr(migrate, "backup_before", lambda *a: Path("/var/backups/aipbx/pre.dump"))

    def run_migration(*_a: Any, **_k: Any) -> str:  # the check after it met a stopped server
        raise CommandError(["runuser"], 1, "server closed the connection unexpectedly")

    monkeypatch.setattr(migrate, "run_migration", run_migration)
    monkeypatch.setattr(pgready, "_ask", lambda cfg, t: pgready.Down("127.0.0.1:5432", "no answer"))
    ctx = upgrade.Ctx(paths=None, cfg=CFG, services=None, tl=_Tl())  # type: ignore[arg-type]
    with pytest.raises(pgready.PostgresDown) as e:
        upgrade._migrate(ctx, _rel())
    assert "whether it changed the database cannot be checked" in e.value.message
    assert "nothing was switched" in e.value.message and "pre.dump is kept" in e.value.message


def test_reconcile_puts_a_link_right_from_state(tmp_path: Path) -> None:
    from appliance import reconcile

    paths = Paths(tmp_path)
    paths.colors.mkdir(parents=True)
    (paths.colors / "green").symlink_to("../releases/app-1.0")
    state.save(paths.state, state.State(live_color=Color.BLUE, colors={"green": "app-2.0"}))
    assert reconcile.links(paths) == [
        f"{paths.colors / 'green'} -> ../releases/app-2.0, as state.json says (was "
        "../releases/app-1.0)"
    ]
    assert reconcile.links(paths) == []
