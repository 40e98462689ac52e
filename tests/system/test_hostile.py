"""Issue 11 in a booted Debian 12, with the sample backend (v1.0.0) live: root follows no
link postgres plants in the backup directory (the lock, a backup to restore); hostile
artifacts, config files and backend.env are refused in one line with exit 2, without a
traceback, a hang, a memory blow-up or anything left behind; `config check` and `setup`
refuse values that would break the host; durations on the command line are checked; an
artifact with an installed release's name and version but other content is refused. The
tests run in order on one machine; each puts back what it changed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.system import hostile_artifacts as ha
from tests.system.appliance import aipbxctl_json, assert_no_failed_units, install
from tests.system.machine import Machine

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
SAMPLE_DIR = Path(os.environ.get("AIPBX_SAMPLE_DIR", HERE.parents[1] / "build" / "sample"))
V1 = "/root/aipbx-sample-1.0.0.tar.gz"
V2 = "/root/aipbx-sample-2.0.0.tar.gz"
BACKUPS = "/var/backups/aipbx"
CONF = "/etc/aipbx/aipbx.toml"
STATE = "/var/lib/aipbx/state.json"
RELEASES = "/opt/aipbx/releases"
VICTIM = "/etc/aipbx-victim"
# What `aipbxctl setup` renders from aipbx.toml (appliance/actions/setup.py, backup_units.py).
RENDERED = (
    "/etc/aipbx/pgbouncer.ini",
    "/etc/aipbx/nginx-upstream.conf",
    "/etc/nginx/conf.d/aipbx.conf",
    "/etc/nginx/modules-enabled/90-aipbx-main.conf",
    "/etc/systemd/system/aipbx-backend@.service.d/50-aipbx-limits.conf",
    "/etc/systemd/system/aipbx-backup.service.d/50-aipbx-dir.conf",
    "/etc/systemd/system/aipbx-backup.timer.d/50-aipbx-time.conf",
)
# Runs a command and writes the largest RSS (KiB) of its processes: the image has no
# /usr/bin/time.
MAXRSS_PY = """\
import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""
RSS_BOUND_KIB = 256 << 10  # aipbxctl needs ~50 MiB; reading the 512 MiB PAX header needs 1 GiB


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path) -> None:
    for v in ("1.0.0", "2.0.0"):
        for suffix in ("", ".sha256"):
            src = SAMPLE_DIR / f"aipbx-sample-{v}.tar.gz{suffix}"
            if not src.is_file():
                pytest.fail(f"{src} is missing: run `make sample`", pytrace=False)
            shutil.copy(src, machine.path("/root") / src.name)
    machine.path("/root/maxrss.py").write_text(MAXRSS_PY)
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)
    aipbxctl_json(machine, "upgrade", V1, "--probation", "1", "--drain", "1", "--yes")


# --- helpers ----------------------------------------------------------------------------------


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    """The exit code, and on stderr one `aipbxctl:` line with at most one `hint:` line (an
    upgrade, restore or backup also echoes its one-line `audit:` record); returns the error."""
    lines = r.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("aipbxctl: ")]
    hints = [ln for ln in lines if ln.startswith("hint: ")]
    audits = [ln for ln in lines if ln.startswith("audit: ")]
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert len(errors) == 1 and len(hints) <= 1 and len(audits) <= 1, r.stderr
    assert len(lines) == len(errors) + len(hints) + len(audits), r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, r.stderr)
    return errors[0]


def api_version(machine: Machine) -> str:
    r = machine.run(["curl", "-s", "--max-time", "5", "http://127.0.0.1:5005/api"], check=False)
    try:
        return str(json.loads(r.stdout)["version"])
    except (ValueError, KeyError):
        return f"no version in {r.stdout[:200]!r}"


def stat(machine: Machine, *paths: str) -> list[str]:
    return machine.run(["stat", "-c", "%U:%G:%a", *paths]).stdout.split()


def state_bytes(machine: Machine) -> bytes:
    return machine.path(STATE).read_bytes()


def backup_names(machine: Machine) -> list[str]:
    _, out = aipbxctl_json(machine, "backups")
    return sorted(b["name"] for b in out["backups"])


def rendered(machine: Machine) -> dict[str, bytes | None]:
    return {
        p: machine.path(p).read_bytes() if machine.path(p).is_file() else None for p in RENDERED
    }


# --- privilege boundaries: the backup directory is postgres's --------------------------------


@pytest.mark.parametrize(
    "plant",
    [["ln", "-sf", VICTIM, f"{BACKUPS}/.lock"], ["mkfifo", f"{BACKUPS}/.lock"]],
    ids=["symlink", "fifo"],
)
def test_a_lock_planted_by_postgres_is_refused(machine: Machine, plant: list[str]) -> None:
    machine.sh(f"rm -f {VICTIM} && printf 'victim\\n' > {VICTIM} && chmod 0600 {VICTIM}")
    before = stat(machine, VICTIM)
    assert before == ["root:root:600"]
    try:
        machine.run(["rm", "-f", f"{BACKUPS}/.lock"])
        machine.run(["runuser", "-u", "postgres", "--", *plant])
        r = machine.run(["aipbxctl", "backup"], check=False, timeout=60)
        # a failed backup is also logged (and audited) on stderr: one line each
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("aipbxctl: ")]
        assert len(errors) == 1 and f"{BACKUPS}/.lock" in errors[0], r.stderr
        assert "refused" in errors[0] and re.search("symlink|not a regular file", errors[0])
        assert stat(machine, VICTIM) == before
        assert machine.path(VICTIM).read_text() == "victim\n"
        machine.run(["rm", "-f", f"{BACKUPS}/.lock"])
        _, done = aipbxctl_json(machine, "backup")
        dump = done["file"]
        owners = stat(machine, dump, f"{dump}.json", f"{BACKUPS}/.lock")
        assert owners == ["postgres:postgres:600"] * 3, owners
        assert stat(machine, VICTIM) == before
    finally:
        machine.run(["rm", "-f", VICTIM])
        machine.run(
            ["find", BACKUPS, "-maxdepth", "1", "-name", ".lock", "!", "-type", "f", "-delete"]
        )


@pytest.mark.parametrize("named", [f"{BACKUPS}/x.dump", "x.dump"], ids=["path", "name"])
def test_restore_does_not_follow_a_link_postgres_planted(machine: Machine, named: str) -> None:
    shadow = stat(machine, "/etc/shadow")
    backups = backup_names(machine)
    try:
        machine.run(
            ["runuser", "-u", "postgres", "--", "ln", "-sfn", "/etc/shadow", f"{BACKUPS}/x.dump"]
        )
        r = machine.run(["aipbxctl", "restore", named, "--yes"], check=False, timeout=60)
        one_line_error(r, "x.dump", "not followed")
    finally:
        machine.run(["rm", "-f", f"{BACKUPS}/x.dump"])
    assert stat(machine, "/etc/shadow") == shadow
    assert (
        machine.run(["systemctl", "is-active", "aipbx-backend@blue.service"]).stdout.strip()
        == "active"
    )
    assert api_version(machine) == "1.0.0"
    assert backup_names(machine) == backups  # not even the pre-restore backup was taken
    assert_no_failed_units(machine)


# --- bad input: one line, exit 2, nothing left ------------------------------------------------

ARTIFACTS: list[tuple[str, Callable[[Path], Path], list[str] | None, str]] = [
    ("non-utf8-manifest", ha.non_utf8_manifest, None, "not UTF-8"),
    ("nested-manifest", ha.nested_manifest, None, "nested too deeply"),
    ("huge-pax-header", ha.huge_pax_header, None, "extended header of 4294967296 bytes"),
    ("flipped-gzip-crc", ha.flipped_crc, None, "CRC check failed"),
    ("sha256-link-to-dev-zero", ha.good, ["ln", "-s", "/dev/zero"], "a character device"),
    ("sha256-fifo", ha.good, ["mkfifo"], "a fifo, not a regular file"),
    ("sha256-directory", ha.good, ["mkdir"], "a directory, not a regular file"),
]


@pytest.mark.parametrize(
    ("case", "build", "sums", "needle"), ARTIFACTS, ids=[a[0] for a in ARTIFACTS]
)
def test_a_hostile_artifact_is_refused_in_one_line(
    machine: Machine,
    tmp_path: Path,
    case: str,
    build: Callable[[Path], Path],
    sums: list[str] | None,
    needle: str,
) -> None:
    artifact = build(tmp_path)
    where = f"/root/hostile/{case}"
    machine.run(["rm", "-rf", where])
    machine.run(["mkdir", "-p", where])
    shutil.copy(artifact, machine.path(where) / artifact.name)
    if sums is None:
        shutil.copy(f"{artifact}.sha256", machine.path(where) / f"{artifact.name}.sha256")
    else:
        machine.run([*sums, f"{where}/{artifact.name}.sha256"])
    releases = sorted(os.listdir(machine.path(RELEASES)))
    st = state_bytes(machine)
    r = machine.run(
        [
            "python3",
            "/root/maxrss.py",
            "/root/maxrss",
            "aipbxctl",
            "upgrade",
            f"{where}/{artifact.name}",
            "--yes",
        ],
        check=False,
        timeout=120,
    )
    one_line_error(r, needle)
    maxrss = int(machine.path("/root/maxrss").read_text())
    assert maxrss < RSS_BOUND_KIB, f"{case}: max RSS {maxrss} KiB"
    after = sorted(os.listdir(machine.path(RELEASES)))
    assert after == releases and not [n for n in after if n.startswith(".unpack-")], after
    assert state_bytes(machine) == st
    assert api_version(machine) == "1.0.0"
    machine.run(["rm", "-rf", where])


CONFIG_FILES: list[tuple[str, str, str, str]] = [
    ("fifo", "/root/cfg/x.toml", "mkfifo /root/cfg/x.toml", "a fifo, not a regular file"),
    ("dev-zero", "/dev/zero", "true", "a character device, not a regular file"),
    ("link-to-dev-zero", "/root/cfg/x.toml", "ln -s /dev/zero /root/cfg/x.toml", "a character"),
    ("directory", "/root/cfg/x.toml", "mkdir /root/cfg/x.toml", "a directory, not a regular"),
    ("non-utf8", "/root/cfg/x.toml", "printf '[site]\\n# caf\\351\\n' > /root/cfg/x.toml", "UTF-8"),
    (
        "2MB",
        "/root/cfg/x.toml",
        "head -c 2097152 /dev/zero | tr '\\0' '#' > /root/cfg/x.toml",
        "larger than 1048576 bytes",
    ),
]


@pytest.mark.parametrize(
    ("case", "path", "make", "needle"), CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES]
)
def test_config_check_refuses_what_is_not_a_small_utf8_file(
    machine: Machine, case: str, path: str, make: str, needle: str
) -> None:
    machine.sh(f"rm -rf /root/cfg && mkdir /root/cfg && {make}")
    try:
        r = machine.run(["aipbxctl", "config", "check", path], check=False, timeout=30)
        one_line_error(r, f"{path}:", needle)
    finally:
        machine.run(["rm", "-rf", "/root/cfg"])


def test_env_list_refuses_a_fifo_backend_env(machine: Machine) -> None:
    env = "/etc/aipbx/backend.env"
    before = stat(machine, env)
    machine.run(["mv", env, "/root/backend.env.saved"])
    try:
        machine.run(["mkfifo", "-m", "0640", env])
        r = machine.run(["aipbxctl", "env", "list"], check=False, timeout=30)
        one_line_error(r, env, "a fifo")
    finally:
        machine.run(["rm", "-f", env])
        machine.run(["mv", "/root/backend.env.saved", env])
    assert stat(machine, env) == before
    assert machine.run(["aipbxctl", "env", "list"]).returncode == 0


# --- config check refuses what would break the host ------------------------------------------

CONFIG_REFUSALS: list[tuple[str, str, str, str]] = [
    ("subnet-loopback", "network", 'subnet = "127.0.0.0/24"', "network.subnet"),
    ("name-newline", "database", 'name = "aipbx_production\\n"', "database.name"),
    ("memory-2GB", "backend", 'memory_max = "2GB"', "backend.memory_max"),
    ("memory-0", "backend", 'memory_max = "0"', "backend.memory_max"),
    ("burst-negative", "nginx", "api_burst = -5", "nginx.api_burst"),
    ("backups-etc", "backups", 'dir = "/etc"', "backups.dir"),
]


def with_key(text: str, section: str, line: str) -> tuple[str, int]:
    """text with `line` right under [section]; and that line's number."""
    lines = text.splitlines()
    at = lines.index(f"[{section}]") + 1
    return "\n".join([*lines[:at], line, *lines[at:]]) + "\n", at + 1


@pytest.mark.parametrize(
    ("case", "section", "line", "key"), CONFIG_REFUSALS, ids=[c[0] for c in CONFIG_REFUSALS]
)
def test_config_check_and_setup_refuse_what_would_break_the_host(
    machine: Machine, case: str, section: str, line: str, key: str
) -> None:
    conf = machine.path(CONF)
    original = conf.read_bytes()
    files = rendered(machine)
    st = state_bytes(machine)
    new, n = with_key(original.decode(), section, line)
    expected = re.compile(rf"^aipbxctl: {re.escape(CONF)}:{n}: {re.escape(key)}: .+")
    try:
        conf.write_text(new)  # the same file (owner, mode): rewritten in place
        r = machine.run(["aipbxctl", "config", "check"], check=False, timeout=30)
        assert expected.match(one_line_error(r)), (case, r.stderr)
        r = machine.run(["aipbxctl", "setup"], check=False, timeout=120)
        assert expected.match(one_line_error(r)), (case, r.stderr)
        assert rendered(machine) == files
        assert state_bytes(machine) == st
    finally:
        conf.write_bytes(original)
    assert machine.run(["aipbxctl", "config", "check"]).returncode == 0
    assert api_version(machine) == "1.0.0"


DURATIONS: list[list[str]] = [
    ["upgrade", V2, "--health-timeout", "-5", "--yes"],
    ["upgrade", V2, "--probation", "nan", "--yes"],
    ["upgrade", V2, "--drain", "inf", "--yes"],
    ["rollback", "--drain", "-inf", "--yes"],
]


@pytest.mark.parametrize(
    "argv", DURATIONS, ids=["health-timeout-5", "probation-nan", "drain-inf", "rollback-drain-inf"]
)
def test_durations_on_the_command_line_are_checked(machine: Machine, argv: list[str]) -> None:
    st = state_bytes(machine)
    r = machine.run(["aipbxctl", *argv], check=False, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"aipbxctl: {argv[0]}: argument ") and argv[-3] in lines[0], lines
    assert lines[1] == f"hint: aipbxctl {argv[0]} --help", lines
    assert state_bytes(machine) == st
    assert api_version(machine) == "1.0.0"


# --- an installed release is immutable (last: it leaves v2 live) ------------------------------


def test_same_name_and_version_with_other_content_is_refused(
    machine: Machine, tmp_path: Path
) -> None:
    aipbxctl_json(machine, "upgrade", V2, "--probation", "1", "--drain", "1", "--yes")
    assert api_version(machine) == "2.0.0"
    aipbxctl_json(machine, "rollback", "--probation", "1", "--drain", "1", "--yes")
    assert api_version(machine) == "1.0.0"
    # the v2 build again, one file changed: the same name and version, other content
    src = tmp_path / "aipbx-sample-2.0.0"
    shutil.copytree(SAMPLE_DIR / "aipbx-sample-2.0.0", src, symlinks=True)
    changed = src / "aipbx_sample" / "settings.py"
    changed.write_text(changed.read_text() + "# rebuilt: other content, the same version\n")
    packed = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "release",
            "pack",
            str(src),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parents[1],
    )
    artifact = Path(packed.stdout.strip())
    assert artifact.name == "aipbx-sample-2.0.0.tar.gz"
    machine.run(["mkdir", "-p", "/root/same"])
    for f in (artifact, Path(f"{artifact}.sha256")):
        shutil.copy(f, machine.path("/root/same") / f.name)
    st = state_bytes(machine)
    r = machine.run(["aipbxctl", "upgrade", f"/root/same/{artifact.name}", "--yes"], check=False)
    one_line_error(r, "aipbx-sample-2.0.0", "same name and version but other content")
    assert state_bytes(machine) == st
    assert api_version(machine) == "1.0.0"
    # the artifact it was installed from is still welcome
    _, out = aipbxctl_json(machine, "upgrade", V2, "--probation", "1", "--drain", "1", "--yes")
    assert out["ok"] and out["release"] == "aipbx-sample-2.0.0"
    assert api_version(machine) == "2.0.0"
    machine.run(["rm", "-rf", "/root/same"])
    assert_no_failed_units(machine)
