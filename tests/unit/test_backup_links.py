"""Root in postgres's backup directory (issue 11, item 1): the lock, a new backup, its
sidecar, the unit's last-run file and a file to restore are never reached through a link
postgres planted, and what root reads there is a bounded regular file. Runs as root; the
scratch uid OTHER stands for postgres (pg_ids is patched to it), pg_dump and pg_restore
are faked."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance import backup, backup_status, config, restore, safefs
from appliance.errors import AipbxError, UsageError
from appliance.paths import Paths

OTHER = (54321, 54322)
AT = 1_800_000_000.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    def boom(*_: object) -> None:
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class FakePg:
    """pg_dump writes `dump` at its -f path (or `plant` does something else there);
    pg_restore reads its stdin fd and lists one table."""

    def __init__(self, plant: Any = None) -> None:
        self.plant = plant
        self.calls: list[str] = []
        self.read: list[bytes] = []

    def __call__(self, argv: Sequence[str], *, stdin: Any = None, **_: Any) -> Any:
        self.calls.append(argv[0])
        if argv[0] == "pg_dump":
            out = Path(argv[list(argv).index("-f") + 1])
            if self.plant is not None:
                self.plant(out)
            else:
                out.write_bytes(b"PGDMP fake dump")
                os.chown(out, *OTHER)
            return subprocess.CompletedProcess(argv, 0, b"", b"")
        assert isinstance(stdin, int)
        self.read.append(os.read(stdin, 1 << 16))
        listing = b"; toc\n1; 1259 1 TABLE DATA public t x\n"
        return subprocess.CompletedProcess(argv, 0, listing, b"")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Paths, config.Config, Path]:
    monkeypatch.setattr(backup, "pg_ids", lambda: OTHER)
    monkeypatch.setattr(time, "time", lambda: AT)
    paths = Paths(tmp_path)
    cfg = config.parse('[backups]\ndir = "/srv/backups"\n')
    d = backup.backup_dir(cfg, paths)
    d.mkdir(parents=True)
    os.chown(d, *OTHER)
    os.chmod(d, 0o700)
    return paths, cfg, d


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    os.chmod(victim, 0o644)
    return victim


def _unchanged(victim: Path) -> None:
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    assert victim.read_text() == "root's\n"


def _plant(target: Path | str, link: Path) -> None:
    link.symlink_to(target)
    os.lchown(link, *OTHER)


def test_a_lock_link_planted_by_postgres_hands_nothing_over(
    env: tuple[Paths, config.Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runuser -u postgres -- ln -sf /etc/victim /var/backups/aipbx/.lock; aipbxctl backup`"""
    paths, cfg, d = env
    victim = _victim(tmp_path)
    _plant(victim, d / backup.LOCK_NAME)
    pg = FakePg()
    monkeypatch.setattr(backup, "pg_run", pg)
    with pytest.raises(AipbxError, match="symlink or not a regular file; refused"):
        backup.take(paths, cfg, kind=backup.MANUAL)
    _unchanged(victim)
    assert pg.calls == []  # refused before pg_dump ran


def test_a_backup_is_postgres_s_and_made_through_fds(
    env: tuple[Paths, config.Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, cfg, d = env
    monkeypatch.setattr(backup, "pg_run", FakePg())
    name = backup.file_name(backup.MANUAL, cfg.database.name, AT)
    # a dangling link where the sidecar goes: replaced, never written through
    _plant(tmp_path / "made-elsewhere", d / f"{name}.json")
    done = backup.take(paths, cfg, kind=backup.MANUAL)
    dump = Path(done["file"])
    assert dump.name == name and dump.read_bytes() == b"PGDMP fake dump"
    assert not (tmp_path / "made-elsewhere").exists()
    for p in (dump, backup.meta_path(dump), d / backup.LOCK_NAME):
        st = p.lstat()
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == OTHER, p
        assert stat.S_IMODE(st.st_mode) == 0o600, p


def test_a_partial_swapped_for_a_link_is_neither_chmodded_nor_read(
    env: tuple[Paths, config.Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, cfg, d = env
    victim = _victim(tmp_path)
    pg = FakePg(plant=lambda out: _plant(victim, out))
    monkeypatch.setattr(backup, "pg_run", pg)
    with pytest.raises(backup.BackupError, match="not followed"):
        backup.take(paths, cfg, kind=backup.MANUAL)
    _unchanged(victim)
    assert pg.read == []  # pg_restore never got its bytes
    assert [p.name for p in d.iterdir()] == [backup.LOCK_NAME]  # the planted link is gone


def test_a_partial_that_is_a_fifo_does_not_hang_the_backup(
    env: tuple[Paths, config.Config, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, cfg, _ = env
    monkeypatch.setattr(backup, "pg_run", FakePg(plant=lambda out: os.mkfifo(out)))
    with pytest.raises(backup.BackupError, match="a fifo, not a regular file"):
        backup.take(paths, cfg, kind=backup.MANUAL)


def test_the_backup_directory_is_made_through_fds_never_through_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backup, "pg_ids", lambda: OTHER)
    d = tmp_path / "srv" / "backups"
    backup.ensure_dir(d)
    st = d.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*OTHER, 0o700)
    assert (tmp_path / "srv").stat().st_uid == 0
    # another user's link at the directory, or on its way: refused, nothing made there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _plant(elsewhere, tmp_path / "theirs")
    for bad in (tmp_path / "theirs", tmp_path / "theirs" / "backups"):
        with pytest.raises(backup.BackupError, match="not followed"):
            backup.ensure_dir(bad)
    assert list(elsewhere.iterdir()) == []


def test_sidecars_that_are_links_fifos_or_huge_are_not_read(
    tmp_path: Path,
) -> None:
    dump = tmp_path / "db.dump"
    dump.write_bytes(b"x")
    side = backup.meta_path(dump)
    _plant("/etc/passwd", side)
    assert backup.read_meta(dump) is None
    side.unlink()
    os.mkfifo(side)
    assert backup.read_meta(dump) is None
    side.unlink()
    side.write_text('{"pad": "' + "x" * (backup.META_LIMIT + 1) + '"}')
    assert backup.read_meta(dump) is None
    side.write_text("[" * 100_000)  # nested deeper than json's recursion
    assert backup.read_meta(dump) is None


def test_a_link_named_like_a_backup_is_not_listed(tmp_path: Path) -> None:
    _plant("/etc/passwd", tmp_path / "db-20260101T030000Z.dump")
    (tmp_path / "db-20260102T030000Z.dump").write_bytes(b"x")
    assert [b.name for b in backup.list_backups(tmp_path)] == ["db-20260102T030000Z.dump"]


def test_the_units_last_run_file_is_read_only_as_a_small_regular_file(
    tmp_path: Path,
) -> None:
    paths = Paths(tmp_path)
    cfg = config.parse("")
    d = backup.backup_dir(cfg, paths)
    d.mkdir(parents=True)
    good = tmp_path / "elsewhere.json"
    good.write_text(json.dumps({"at": AT, "ok": True, "file": "/x", "invocation": "r1"}))
    ok_env = {"SERVICE_RESULT": "success", "INVOCATION_ID": "r1"}
    for plant in (
        lambda p: _plant(good, p),  # postgres's link to a file saying "ok": not trusted
        os.mkfifo,  # no writer: reading it would block forever
        lambda p: _plant("/dev/zero", p),  # an endless read
    ):
        plant(d / backup.LAST_RUN)
        out = backup_status.record_unit_result(paths, cfg, ok_env)
        assert not out["ok"], out
        (d / backup.LAST_RUN).unlink()


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "postgres-link"])
def test_restore_refuses_what_is_not_a_backup_file_before_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    pg = FakePg()
    monkeypatch.setattr(backup, "pg_run", pg)
    victim = _victim(tmp_path)
    p = tmp_path / "x.dump"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "device":
        p.symlink_to("/dev/zero")
    elif kind == "directory":
        p.mkdir()
    else:
        _plant(victim, p)
    with pytest.raises(UsageError) as e:
        restore.check(p)
    why = "not followed" if kind == "postgres-link" else "not a regular file"
    assert why in e.value.message and "\n" not in e.value.message
    assert pg.calls == []
    _unchanged(victim)


def test_a_restore_by_name_finds_a_link_but_does_not_follow_it(
    env: tuple[Paths, config.Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, cfg, d = env
    monkeypatch.setattr(backup, "pg_run", FakePg())
    _plant(_victim(tmp_path), d / "db.dump")
    found = restore.resolve(paths, cfg, "db.dump")
    assert found == d / "db.dump"
    with pytest.raises(UsageError, match="not followed"):
        restore.check(found)


def test_the_migrations_home_is_removed_whatever_the_migration_left(tmp_path: Path) -> None:
    """migrate removes its HOME (_aipbx wrote there) with safefs.remove_tree: at any depth,
    links removed, not followed."""
    home = tmp_path / "home"
    home.mkdir()
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f").write_text("kept")
    _plant(keep, home / "link")
    safefs.remove_tree(home)
    assert not home.exists() and (keep / "f").read_text() == "kept"


def test_a_partial_hard_linked_to_a_root_file_is_neither_chmodded_nor_read(
    env: tuple[Paths, config.Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fs.protected_hardlinks off, postgres could link a root file at the partial's
    name: it has two names and root's owner, so it is not the file pg_dump wrote."""
    paths, cfg, d = env
    victim = _victim(tmp_path)
    pg = FakePg(plant=lambda out: os.link(victim, out))
    monkeypatch.setattr(backup, "pg_run", pg)
    with pytest.raises(backup.BackupError, match="not the file pg_dump wrote"):
        backup.take(paths, cfg, kind=backup.MANUAL)
    _unchanged(victim)
    assert pg.read == []
