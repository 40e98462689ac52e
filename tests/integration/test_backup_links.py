"""Backups and restore against a real PostgreSQL (initdb on loopback, pg_dump and
pg_restore run as postgres through runuser, as `aipbxctl backup` does), with links postgres
planted in its backup directory (issue 11, item 1): the lock, a sidecar's name and a file to
restore are never followed, and a good backup is postgres's, 0600, verified through the fd
root opened."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import backup, config, restore
from appliance.errors import AipbxError, UsageError
from appliance.paths import Paths
from tests.integration.procs import as_postgres, create_app_database, postgres_cluster

pytestmark = pytest.mark.integration

ROLE, DB = "aipbx_user", "aipbx_production"


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Path, int]]:
    d = Path(tempfile.mkdtemp(prefix="aipbx-backup-it-"))
    pg = pwd.getpwnam("postgres")
    os.chown(d, pg.pw_uid, pg.pw_gid)
    try:
        with postgres_cluster(d) as port:
            create_app_database(d, port, ROLE, DB, "pw")
            psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(d), "-p", str(port)]
            as_postgres(
                [*psql, "-d", DB],
                input=f"SET ROLE {ROLE};\nCREATE TABLE t (id int);\n"
                "INSERT INTO t SELECT generate_series(1, 100);\n",
            )
            yield d, port
    finally:
        shutil.rmtree(d)


@pytest.fixture
def env(
    cluster: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Paths, config.Config, Path]]:
    workdir, port = cluster
    monkeypatch.setenv("PGHOST", str(workdir))  # the pg tools' socket (runuser keeps it)
    root = Path(tempfile.mkdtemp(prefix="aipbx-backup-root-"))
    os.chmod(root, 0o755)  # postgres writes the backups under it
    paths = Paths(root)
    cfg = config.parse(
        f'[database]\nname = "{DB}"\nuser = "{ROLE}"\npostgres_port = {port}\n'
        '[backups]\ndir = "/srv/backups"\n'
    )
    backup.ensure_dir(backup.backup_dir(cfg, paths))
    try:
        yield paths, cfg, backup.backup_dir(cfg, paths)
    finally:
        shutil.rmtree(root)


def _plant(target: Path | str, link: Path) -> None:
    """A link as postgres makes it."""
    subprocess.run(
        ["runuser", "-u", "postgres", "--", "ln", "-s", str(target), str(link)], check=True
    )


def _victim(root: Path) -> Path:
    victim = root / "victim"
    victim.write_text("root's\n")
    os.chmod(victim, 0o644)
    return victim


def _unchanged(victim: Path) -> None:
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)


def test_the_backup_directory_is_postgres_s(env: tuple[Paths, config.Config, Path]) -> None:
    _, _, d = env
    pg = pwd.getpwnam("postgres")
    st = d.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (pg.pw_uid, pg.pw_gid, 0o700)


def test_a_lock_link_is_refused_and_a_real_backup_is_postgres_s(
    env: tuple[Paths, config.Config, Path],
) -> None:
    paths, cfg, d = env
    victim = _victim(paths.root)
    _plant(victim, d / backup.LOCK_NAME)
    with pytest.raises(AipbxError, match="refused"):
        backup.take(paths, cfg, kind=backup.MANUAL)
    _unchanged(victim)
    (d / backup.LOCK_NAME).unlink()
    done = backup.take(paths, cfg, kind=backup.MANUAL)
    assert done["tables"] == 1
    pg = pwd.getpwnam("postgres")
    for p in (Path(done["file"]), backup.meta_path(Path(done["file"])), d / backup.LOCK_NAME):
        st = p.lstat()
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == (pg.pw_uid, pg.pw_gid)
        assert stat.S_IMODE(st.st_mode) == 0o600
    v = restore.check(Path(done["file"]))
    assert v.checksum is True and v.tables == 1


def test_restore_refuses_postgres_s_link_and_restores_the_real_file(
    env: tuple[Paths, config.Config, Path],
) -> None:
    paths, cfg, d = env
    done = backup.take(paths, cfg, kind=backup.MANUAL)
    _plant(done["file"], d / "looks-good.dump")
    found = restore.resolve(paths, cfg, "looks-good.dump")
    with pytest.raises(UsageError, match="not followed"):
        restore.check(found)
    with pytest.raises(UsageError, match="not followed"):
        restore.restore_database(cfg, found)  # nor read later, by the pipeline
    seconds = restore.restore_database(cfg, Path(done["file"]))
    assert seconds >= 0
