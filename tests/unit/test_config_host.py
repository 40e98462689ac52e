"""`config check` refuses what would break the host, and whatever it is given to read
(issue 11, items 5 and 6), and the command line refuses durations that are not ones (item
13): each as `file:line: what is wrong` (or one line), exit 2."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import appenv, cli, config
from appliance import validate as v
from appliance.errors import ConfigError, ExitCode, UsageError
from appliance.paths import Paths

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    def boom(*_: object) -> None:
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(text, "aipbx.toml")
    assert e.value.exit_code == ExitCode.USAGE
    return e.value.message.splitlines()


def _fields() -> list[tuple[str, str, typing.Any]]:
    """(section, key, type) of every key of aipbx.toml."""
    out = []
    for sec in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[sec.name]
        hints = typing.get_type_hints(cls)
        out += [(sec.name, f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


# --- the colors' subnet -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "why"),
    [
        ("127.0.0.0/24", "loopback"),
        ("127.203.0.0/24", "loopback"),
        ("0.0.0.0/24", "'this network'"),
        ("169.254.0.0/24", "link-local"),
        ("224.0.0.0/24", "multicast"),
        ("239.255.255.0/24", "multicast"),
        ("240.0.0.0/24", "reserved"),
        ("255.255.255.0/24", "reserved (240.0.0.0/4, broadcast included)"),
        ("8.8.8.0/24", "not inside a private range"),
        ("192.0.2.0/24", "not inside a private range"),
        ("10.0.0.0/7", "not inside a private range"),
    ],
)
def test_a_subnet_in_a_special_or_public_range_is_refused(subnet: str, why: str) -> None:
    (err,) = errors_of(f'\n[network]\nsubnet = "{subnet}"\n')
    assert err.startswith("aipbx.toml:3: network.subnet:") and why in err


@pytest.mark.parametrize(
    "subnet", ["10.203.0.0/24", "172.16.5.0/29", "192.168.77.0/24", "100.64.0.0/24", "10.0.0.0/8"]
)
def test_private_subnets_are_accepted(subnet: str) -> None:
    assert config.parse(f'[network]\nsubnet = "{subnet}"\n').network.subnet == subnet


# --- control characters, a trailing newline first ---------------------------------------------


def test_a_trailing_newline_is_refused_in_every_string_key() -> None:
    for section, key, hint in _fields():
        if hint is str:
            text = f'[{section}]\n{key} = "x\\n"\n'
        elif typing.get_origin(hint) is tuple:
            text = f'[{section}]\n{key} = ["x\\n"]\n'
        else:
            continue
        errs = errors_of(text)
        assert errs == [
            f"aipbx.toml:2: {section}.{key}: 'x\\n' contains a control character ('\\n')"
        ]


def test_the_database_name_of_the_finding() -> None:
    (err,) = errors_of('[database]\nname = "aipbx_production\\n"\n')
    assert err.startswith("aipbx.toml:2: database.name:")


@pytest.mark.parametrize(
    "check",
    [v.domain, v.email, v.size, v.rate, v.cpu_quota, v.identifier, v.duration_seconds],
)
def test_validators_match_whole_values(check: typing.Callable[[str], object]) -> None:
    good: dict[typing.Callable[[str], object], str] = {
        v.domain: "pbx.example.com",
        v.email: "ops@example.com",
        v.size: "50m",
        v.rate: "10r/s",
        v.cpu_quota: "200%",
        v.identifier: "aipbx_user",
        v.duration_seconds: "30s",
    }
    value = good[check]
    check(value)
    with pytest.raises(ValueError):
        check(value + "\n")


# --- numbers: one range helper, every integer key ---------------------------------------------


def test_every_integer_key_has_a_range() -> None:
    ints = [(s, k) for s, k, hint in _fields() if hint is int]
    assert len(ints) > 15
    for section, key in ints:
        errs = errors_of(f"[{section}]\n{key} = -1\n")
        assert errs[0].startswith(f"aipbx.toml:2: {section}.{key}:"), errs
        assert "out of range" in errs[0], errs
        errs = errors_of(f"[{section}]\n{key} = {10**30}\n")
        assert errs[0].startswith(f"aipbx.toml:2: {section}.{key}:"), errs


def test_a_negative_burst_names_its_key() -> None:
    (err,) = errors_of('[nginx]\napi_rate = "10r/s"\napi_burst = -5\n')
    assert err == "aipbx.toml:3: nginx.api_burst: -5 is out of range 1-100000"
    (err,) = errors_of("[nginx]\nlogin_burst = 0\n")  # nginx -t refuses burst=0 too
    assert err.startswith("aipbx.toml:2: nginx.login_burst:")


def test_durations_are_bounded() -> None:
    (err,) = errors_of('[upgrade]\ndrain = "99999999999d"\n')
    assert err.startswith("aipbx.toml:2: upgrade.drain:") and "longer than a year" in err


# --- memory_max, as systemd reads MemoryMax= ---------------------------------------------------

MEMORY = {
    # value: accepted here (and then by systemd)
    "2g": True,
    "2G": True,
    "512m": True,
    "1t": True,
    "67108864": True,
    "50%": True,
    "100%": True,
    "infinity": True,
    "0": False,  # systemd: "out of range, ignoring"
    "0%": False,
    "150%": False,  # systemd: "Invalid memory limit"
    "99999999999999999999": False,  # systemd: "Numerical result out of range"
    "16777216t": False,
    "2GB": False,
    "2GiB": False,
    "1.5g": False,  # systemd takes it; kept simple here
    "1k": False,  # systemd takes it; the backend could not start in it
    "-1": False,
    "": False,
}


@pytest.mark.parametrize(("value", "ok"), sorted(MEMORY.items()))
def test_memory_max(value: str, ok: bool) -> None:
    text = f'[backend]\nmemory_max = "{value}"\n'
    if ok:
        assert config.parse(text).backend.memory_max == value
    else:
        (err,) = errors_of(text)
        assert err.startswith("aipbx.toml:2: backend.memory_max:")


def test_every_accepted_memory_max_is_one_systemd_applies(tmp_path: Path) -> None:
    """The rendered MemoryMax= of each accepted value, checked by this host's systemd (it
    says "ignoring" for a value it does not apply)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the test host (packaging/host-packages.txt)"
    for value, ok in MEMORY.items():
        if not ok:
            continue
        unit = tmp_path / "t.service"
        unit.write_text(
            f"[Service]\nExecStart=/bin/true\nMemoryMax={v.systemd_memory(v.memory_limit(value))}\n"
        )
        out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert "emory" not in out.stderr, (value, out.stderr)


# --- the backups directory ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "d",
    [
        "/", "/etc", "/etc/aipbx", "/usr/local/backups", "/var", "/var/lib/postgresql",
        "/var/lib/aipbx/b", "/boot", "/proc/x", "/sys", "/dev/shm", "/run/b", "/tmp/b",
        "/home", "/srv", "/var/backups", "/opt/aipbx/b", "/root/b", "/var/log/b", "/etc/",
        "//etc", "/var/./lib/x", "/var/backups/../lib",
    ],
)  # fmt: skip
def test_a_system_directory_for_backups_is_refused(d: str) -> None:
    (err,) = errors_of(f'[backups]\ndir = "{d}"\n')
    assert err.startswith("aipbx.toml:2: backups.dir:")


@pytest.mark.parametrize(
    ("d", "norm"),
    [
        ("/var/backups/aipbx", "/var/backups/aipbx"),
        ("/srv/backups/", "/srv/backups"),
        ("/mnt/nas/aipbx", "/mnt/nas/aipbx"),
        ("/home/backup/aipbx", "/home/backup/aipbx"),
        ("/backups", "/backups"),
    ],
)
def test_backup_directories_of_their_own_are_accepted(d: str, norm: str) -> None:
    assert config.parse(f'[backups]\ndir = "{d}"\n').backups.dir == d
    assert v.backup_dir(d) == norm


# --- what config check reads -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "huge", "not-utf8", "nested"])
def test_config_check_of_what_is_not_a_config_file(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "aipbx.toml"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "device":
        p.symlink_to("/dev/zero")
    elif kind == "huge":
        p.write_bytes(b"# " + b"x" * config.MAX_BYTES)
    elif kind == "not-utf8":
        p.write_bytes(b'[site]\n\ndomain = "\xff"\n')
    else:
        p.write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    line = 3 if kind == "not-utf8" else 1
    assert e.value.message.startswith(f"{p}:{line}: ") and "\n" not in e.value.message


def test_config_check_end_to_end_exits_2_with_one_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "bad.toml").write_text('[network]\nsubnet = "127.0.0.0/24"\n')
    for name, why in (("fifo.toml", "a fifo"), ("bad.toml", "loopback")):
        out = subprocess.run(
            [sys.executable, "-m", "appliance", "config", "check", str(tmp_path / name)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert out.returncode == 2, out
        first = out.stderr.splitlines()[0]
        assert first.startswith(f"aipbxctl: {tmp_path / name}:") and why in first
        assert "Traceback" not in out.stderr


# --- the app's environment file ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "huge", "device"])
def test_env_on_a_backend_env_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    paths = Paths(tmp_path)
    paths.etc.mkdir(parents=True)
    p = paths.backend_env
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "huge":
        p.write_bytes(b"A=" + b"x" * appenv.MAX_FILE_BYTES)
    else:
        p.symlink_to("/dev/zero")
    with pytest.raises(UsageError) as e:
        appenv.load(paths)
    assert e.value.exit_code == ExitCode.USAGE and "\n" not in e.value.message


# --- durations on the command line ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["upgrade", "a.tar.gz", "--health-timeout", "-5"],
        ["upgrade", "a.tar.gz", "--health-timeout", "0"],
        ["upgrade", "a.tar.gz", "--probation", "nan"],
        ["upgrade", "a.tar.gz", "--drain", "inf"],
        ["rollback", "--drain", "-inf"],
        ["rollback", "--probation", "1e400"],
        ["restart", "--probation", "-0.5"],
        ["restart", "--drain", "forever"],
        ["env", "set", "A=1", "--drain", "NaN"],
        ["upgrade", "a.tar.gz", "--drain", str(v.MAX_DURATION_S + 1)],
        ["logs", "-n", "-3"],
    ],
)
def test_a_duration_that_is_not_one_exits_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 2
        and err[0].startswith(f"aipbxctl: {argv[0]}")
        and err[1].startswith("hint: aipbxctl")
    ), err


def test_durations_that_are_ones() -> None:
    a = cli.parser().parse_args(
        ["upgrade", "a.tar.gz", "--probation", "0", "--drain", "2.5", "--health-timeout", "30"]
    )
    assert (a.probation, a.drain, a.health_timeout) == (0.0, 2.5, 30.0)


# --- migrations mark of a weird path -----------------------------------------------------------


@pytest.mark.parametrize(
    "wanted", ["x.sql\n", "/dev/zero", "", "/", "..", "a\x00b.sql", "\udcff.sql", "dir/"]
)
def test_migrations_mark_of_a_weird_path_is_one_line(wanted: str) -> None:
    from appliance import sqlmigrations
    from appliance.release.manifest import Kind, Manifest, SqlMigrations
    from appliance.releases import Installed

    m = Manifest(
        name="app",
        version="1",
        kind=Kind.BACKEND,
        command=("x",),
        migrations=SqlMigrations("sql"),
    )
    rel = Installed("app-1", m, Path("/nonexistent"), 0.0)
    files = [sqlmigrations.SqlFile("001.sql", "0" * 64, Path("/nonexistent/sql/001.sql"))]
    t = sqlmigrations.Target("db", "role", "pw", 5432)
    with pytest.raises(UsageError) as e:
        sqlmigrations.mark(t, rel, files, [wanted])
    assert "\n" not in e.value.message and e.value.message.isprintable()
