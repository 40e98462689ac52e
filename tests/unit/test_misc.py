from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

import pytest

from appliance import database, pgbouncer, secrets
from appliance.actions.logs import journalctl_argv
from appliance.config import Database
from appliance.errors import LockedError, UsageError
from appliance.fsutil import atomic_symlink, atomic_write, locked, write_if_changed
from appliance.run import masked


def _verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    ck = hmac.new(salted, b"Client Key", "sha256").digest()
    sk = hmac.new(salted, b"Server Key", "sha256").digest()
    b = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b(salt).decode()}$"
        f"{b(hashlib.sha256(ck).digest()).decode()}:{b(sk).decode()}"
    )


def test_scram_verifier_check() -> None:
    v = _verifier("s3cret", b"0123456789abcdef")
    assert database.scram_matches(v, "s3cret")
    assert not database.scram_matches(v, "other")
    assert not database.scram_matches("md5abc", "s3cret")


def test_secrets_generated_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    first, changed = secrets.ensure(path)
    assert changed and set(first) == set(secrets.GENERATED)
    assert len(first["ENCRYPTION_KEY"]) == 64
    assert path.stat().st_mode & 0o777 == 0o640
    second, changed = secrets.ensure(path)
    assert not changed and second == first


def test_pgbouncer_ini() -> None:
    ini = pgbouncer.render_ini(Database(), listen=["127.0.0.1", "10.203.0.1"], userlist="/u")
    assert "listen_addr = 127.0.0.1, 10.203.0.1" in ini
    assert "default_pool_size = 20" in ini
    assert "auth_type = scram-sha-256" in ini
    assert "aipbx_production = host=127.0.0.1 port=5432 dbname=aipbx_production" in ini
    assert pgbouncer.render_userlist("u", 'p"w') == '"u" "p""w"\n'


def test_logs_argv() -> None:
    assert journalctl_argv("nginx", True, 50)[-4:] == ["nginx.service", "-n", "50", "-f"]
    with pytest.raises(UsageError):
        journalctl_argv("nope", False, None)


def test_masked() -> None:
    assert masked(["psql", "password=hunter2"], ["hunter2"]) == ["psql", "password=***"]


def test_atomic_write_and_symlink(tmp_path: Path) -> None:
    f = tmp_path / "a" / "file"
    atomic_write(f, "one", mode=0o600)
    assert f.read_text() == "one" and f.stat().st_mode & 0o777 == 0o600
    assert not write_if_changed(f, "one", mode=0o600)
    assert write_if_changed(f, "two", mode=0o600)
    assert [p.name for p in f.parent.iterdir()] == ["file"]
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    link = tmp_path / "current"
    atomic_symlink("r1", link)
    atomic_symlink("r2", link)
    assert os.readlink(link) == "r2"


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with locked(lock, "upgrade"), pytest.raises(LockedError), locked(lock, "upgrade"):
        pass
    with locked(lock, "upgrade"):
        pass


def test_releases_table_has_one_line_per_release() -> None:
    from appliance.actions.rollout import format_releases

    data = {
        "releases": [
            {"release": "a-1", "kind": "backend", "colors": ["blue"], "live": True},
            {"release": "a-2", "kind": "backend", "colors": [], "live": False},
        ]
    }
    lines = format_releases(data).splitlines()
    assert len(lines) == 3 and lines[1].startswith("a-1") and lines[1].endswith("yes")


def test_release_lookup_by_version_prefers_the_live_app(tmp_path: Path) -> None:
    from appliance import releases
    from appliance.paths import Paths

    paths = Paths(tmp_path)
    for name in ("aipbx-sample", "aipbx-node"):
        d = paths.releases / f"{name}-1.0.0"
        d.mkdir(parents=True)
        (d / "aipbx-release.toml").write_text(
            f'name = "{name}"\nversion = "1.0.0"\nkind = "backend"\ncommand = ["true"]\n'
        )
    assert releases.find(paths, "1.0.0", prefer_name="aipbx-node").dirname == "aipbx-node-1.0.0"
    assert releases.find(paths, "aipbx-sample-1.0.0").dirname == "aipbx-sample-1.0.0"
    with pytest.raises(UsageError, match="2 do"):
        releases.find(paths, "1.0.0")


def test_lock_held_reads_proc_locks_without_taking_the_lock(tmp_path: Path) -> None:
    from appliance.fsutil import lock_held

    lock = tmp_path / "lock"
    assert not lock_held(lock)
    with locked(lock, "upgrade"):
        assert lock_held(lock)
    assert not lock_held(lock)
