"""The systemd units in units/ and the shipped conffile, read as systemd and dpkg will see
them: the sandboxing each unit promises, and a conffile that documents every key."""

from __future__ import annotations

import configparser
import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest

from appliance import config

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "units"
SERVICES = sorted(p.name for p in UNITS.glob("*.service"))
# A service without User= must say why it runs as root in a comment of this form.
ROOT_REASON = re.compile(r"^# Runs as root: \S", re.MULTILINE)


def unit(name: str) -> configparser.ConfigParser:
    # systemd allows repeated keys (SystemCallFilter=, ExecStart=): not strict, and %i
    # is not an interpolation.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text(), source=name)
    return parser


def values(name: str, section: str, key: str) -> list[str]:
    """Every value a key takes in a section, repeated keys included, in order."""
    out: list[str] = []
    current = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line.split("=", 1)[0] == key and "=" in line:
            out.append(line.split("=", 1)[1])
    return out


def test_the_expected_units_exist() -> None:
    assert SERVICES == [
        "aipbx-backend@.service",
        "aipbx-backup.service",
        "aipbx-netns@.service",
        "aipbx-pgbouncer.service",
        "aipbx-watchdog.service",
    ]
    assert (UNITS / "aipbx.target").is_file()
    assert (UNITS / "aipbx-backup.timer").is_file()


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_unprivileged_or_says_why_not(name: str) -> None:
    svc = unit(name)["Service"]
    user = svc.get("User", "root")
    if user in ("root", "0"):
        assert ROOT_REASON.search((UNITS / name).read_text()), f"{name}: root without a reason"
    else:
        assert user != "nobody", "nobody is shared with other services"


@pytest.mark.parametrize("name", SERVICES)
def test_service_cannot_gain_privileges(name: str) -> None:
    svc = unit(name)["Service"]
    assert svc.get("NoNewPrivileges") == "yes"
    assert svc.get("SystemCallArchitectures") == "native"
    assert svc.get("RestrictSUIDSGID") == "yes"
    assert "CapabilityBoundingSet" in svc
    caps = set(svc["CapabilityBoundingSet"].split())
    assert "CAP_SYS_ADMIN" not in caps
    if svc.get("User", "root") not in ("root", "0"):
        assert caps == set(), f"{name}: an unprivileged service needs no capability"


@pytest.mark.parametrize("name", SERVICES)
def test_service_sees_a_read_only_os_and_a_private_tmp(name: str) -> None:
    svc = unit(name)["Service"]
    assert svc.get("ProtectSystem") == "strict"
    # systemd 252 leaves /run writable under strict once ProtectProc= or the like is set
    assert "/run" in values(name, "Service", "ReadOnlyPaths")
    assert svc.get("PrivateTmp") == "yes"
    assert svc.get("ProtectHome") == "yes"
    assert svc.get("PrivateDevices") == "yes"


def test_netns_unit_holds_the_namespace_unprivileged_and_wires_it_privileged() -> None:
    svc = unit("aipbx-netns@.service")["Service"]
    assert svc.get("PrivateNetwork") == "yes"
    assert svc.get("User") == "_aipbx"
    assert svc.get("CapabilityBoundingSet") == ""
    assert svc.get("ExecStartPost") == "+/usr/libexec/aipbx/aipbx-netns up %i"
    assert svc.get("ExecStopPost") == "+/usr/libexec/aipbx/aipbx-netns down %i"


def test_backend_is_limited_but_keeps_the_jit() -> None:
    name = "aipbx-backend@.service"
    u = unit(name)
    svc = u["Service"]
    assert svc.get("User") == "_aipbx" and svc.get("Group") == "_aipbx"
    assert svc.get("MemoryMax") == "2G"
    assert svc.get("CPUQuota") == "200%"
    # Node's V8 JIT needs writable+executable memory.
    assert svc.get("MemoryDenyWriteExecute", "no") != "yes"
    assert svc.get("PrivateNetwork") == "yes"
    assert u["Unit"].get("JoinsNamespaceOf") == "aipbx-netns@%i.service"
    assert svc.get("ReadWritePaths") == "/var/lib/aipbx/shared"
    assert "aipbx-netns@%i.service" in u["Unit"]["BindsTo"].split()
    assert "aipbx-netns@%i.service" in u["Unit"]["After"].split()
    assert u["Unit"].get("PartOf") == "aipbx.target"
    assert u["Install"].get("WantedBy") == "aipbx.target"


def test_watchdog_is_notify_with_a_watchdog_timeout() -> None:
    u = unit("aipbx-watchdog.service")
    svc = u["Service"]
    assert svc.get("Type") == "notify"
    assert svc.get("NotifyAccess") == "main"
    assert svc.get("WatchdogSec") == "30s"
    assert svc.get("Restart") == "always"
    assert svc.get("ExecStart") == "/usr/libexec/aipbx/aipbx-watchdog"
    assert svc.get("MemoryDenyWriteExecute") == "yes"
    # It reads no other process's /proc entry (only /proc/locks, meminfo, its own net).
    assert svc.get("ProtectProc") == "invisible"
    assert set(svc["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN"}
    # It writes one directory, its alert spool: not state.json, /etc/aipbx or /run/aipbx.
    assert "ReadWritePaths" not in svc
    assert svc.get("StateDirectory") == "aipbx/watchdog"
    assert svc.get("StateDirectoryMode") == "0700"
    lines = values("aipbx-watchdog.service", "Service", "InaccessiblePaths")
    hidden = {p for v in lines for p in v.split()}
    assert {"-/var/lib/aipbx/shared", "-/etc/letsencrypt/accounts"} <= hidden
    assert u["Unit"].get("PartOf") == "aipbx.target"


def test_pgbouncer_is_skipped_until_setup() -> None:
    u = unit("aipbx-pgbouncer.service")
    assert u["Unit"].get("ConditionPathExists") == "/etc/aipbx/pgbouncer.ini"
    svc = u["Service"]
    assert svc.get("Type") == "notify"
    assert svc.get("User") == "postgres"
    assert svc.get("ExecStart") == "/usr/sbin/pgbouncer /etc/aipbx/pgbouncer.ini"
    # not in the _aipbx group: an ACL lets postgres through /etc/aipbx (tmpfiles.d)
    assert "SupplementaryGroups" not in svc
    tmpfiles = (ROOT / "packaging/debian/aipbx-appliance.tmpfiles").read_text()
    assert re.search(r"^a\+\s+/etc/aipbx\s+(-\s+){4}u:postgres:--x$", tmpfiles, re.M)


def test_pgbouncer_starts_after_both_veths_and_pulls_them_in() -> None:
    """PgBouncer binds each listen address once, at start: a color's veth that comes up
    after it is never listened on (issue 11, item 10). Both namespaces come first
    whenever it starts, alone or with the target."""
    netns = {"aipbx-netns@blue.service", "aipbx-netns@green.service"}
    after = {u for v in values("aipbx-pgbouncer.service", "Unit", "After") for u in v.split()}
    wants = {u for v in values("aipbx-pgbouncer.service", "Unit", "Wants") for u in v.split()}
    assert netns <= after and netns <= wants
    # loopback clients need no veth: a namespace that fails must not stop PgBouncer
    assert not values("aipbx-pgbouncer.service", "Unit", "Requires")
    assert not values("aipbx-pgbouncer.service", "Unit", "BindsTo")


def test_backup_is_a_sandboxed_postgres_oneshot_on_a_daily_timer() -> None:
    u = unit("aipbx-backup.service")
    svc = u["Service"]
    assert svc.get("Type") == "oneshot"
    assert svc.get("User") == "postgres" and svc.get("Group") == "postgres"
    assert svc.get("ExecStart") == "/usr/bin/aipbxctl backup --scheduled"
    # the outcome is recorded by root, even for a run that was killed
    assert svc.get("ExecStopPost") == "+/usr/bin/aipbxctl backup --record-unit-result"
    assert svc.get("ReadWritePaths") == "/var/backups/aipbx"
    assert svc.get("PrivateNetwork") == "yes" and svc.get("RestrictAddressFamilies") == "AF_UNIX"
    assert svc.get("UMask") == "0077"
    hidden = {
        p for v in values("aipbx-backup.service", "Service", "InaccessiblePaths") for p in v.split()
    }
    assert {"-/var/lib/aipbx", "-/opt/aipbx"} <= hidden
    # not in the _aipbx group, which reads the app's secrets.env and backend.env
    assert "SupplementaryGroups" not in svc
    assert u["Unit"].get("ConditionPathExists") == "/etc/aipbx/secrets.env"
    assert "Install" not in u  # only the timer starts it
    t = unit("aipbx-backup.timer")
    assert t["Timer"].get("OnCalendar") == "*-*-* 03:00:00 UTC"
    assert t["Timer"].get("Persistent") == "true"
    assert t["Install"].get("WantedBy") == "timers.target"


def test_packaging_starts_the_backup_timer_not_its_service() -> None:
    rules = (ROOT / "packaging/debian/rules").read_text()
    assert "\tdh_installsystemd aipbx-backup.timer\n" in rules
    assert "dh_installsystemd aipbx-backup.service" not in rules


@pytest.mark.parametrize("name", SERVICES)
def test_no_service_removes_the_ipc_of_a_shared_user(name: str) -> None:
    # RemoveIPC= deletes every IPC object of the unit's user when the unit stops: for
    # postgres that is PostgreSQL's shared memory, for _aipbx the other color's.
    svc = unit(name)["Service"]
    assert svc.get("RemoveIPC", "no") == "no"
    if svc.get("User", "root") not in ("root", "0"):
        assert svc.get("PrivateIPC") == "yes"


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_is_part_of_the_target(name: str) -> None:
    assert unit(name)["Unit"].get("PartOf") == "aipbx.target"


def test_target_wants_the_shared_services() -> None:
    u = unit("aipbx.target")
    wants = {w for line in values("aipbx.target", "Unit", "Wants") for w in line.split()}
    assert wants == {
        "aipbx-watchdog.service",
        "nginx.service",
        "postgresql.service",
        "aipbx-pgbouncer.service",
        "aipbx-netns@blue.service",
        "aipbx-netns@green.service",
    }
    assert u["Install"].get("WantedBy") == "multi-user.target"


def test_repeated_keys_all_count() -> None:
    filters = values("aipbx-backend@.service", "Service", "SystemCallFilter")
    assert filters[0] == "@system-service"
    denied = {w for f in filters[1:] if f.startswith("~") for w in f[1:].split()}
    # what @privileged holds, less @setuid (setuid to itself: gunicorn, pm2)
    for group in (
        "@chown",
        "@clock",
        "@module",
        "@raw-io",
        "@reboot",
        "@swap",
        "@mount",
        "@debug",
        "bpf",
        "chroot",
        "pivot_root",
        "acct",
    ):
        assert group in denied, group
    assert "@setuid" not in denied


def test_packaging_installs_every_unit() -> None:
    install = (ROOT / "packaging/debian/aipbx-appliance.install").read_text().split()
    for u in UNITS.rglob("*"):
        if u.is_file():  # the units, and the drop-ins for Debian's units (units/dropins/)
            name = u.relative_to(UNITS).as_posix()
            assert f"units/{name}" in install, name


# The shipped /etc/aipbx/aipbx.toml: every key of appliance/config.py, commented out, with
# its default and a comment saying what it does.
CONFFILE = ROOT / "packaging/aipbx.toml"
KEY_LINE = re.compile(r"^# (?P<key>[a-z_]+) = (?P<value>.+?)\s+# (?P<doc>\S.*)$")


def documented_keys() -> dict[tuple[str, str], object]:
    section = ""
    found: dict[tuple[str, str], object] = {}
    for line in CONFFILE.read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]$", line):
            section = m.group(1)
        elif section and (m := KEY_LINE.match(line)):
            value = tomllib.loads(f"v = {m.group('value')}")["v"]
            found[(section, m.group("key"))] = value
    return found


def schema_defaults() -> dict[tuple[str, str], object]:
    out: dict[tuple[str, str], object] = {}
    for section, cls in typing.get_type_hints(config.Config).items():
        for f in dataclasses.fields(cls):
            default = f.default
            out[(section, f.name)] = list(default) if isinstance(default, tuple) else default
    return out


def test_conffile_parses_and_sets_nothing() -> None:
    tomllib.loads(CONFFILE.read_text())
    assert config.load(CONFFILE) == config.Config()


def test_conffile_documents_every_key_with_its_default() -> None:
    assert documented_keys() == schema_defaults()
