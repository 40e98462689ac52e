"""The drop-ins the package ships for Debian's own units (units/dropins/, installed into
/lib/systemd/system/UNIT.d/aipbx-hardening.conf): each is a sandbox a service keeps
working in (tests/system/test_reach.py checks that, and the scores, in a booted machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DROPINS = ROOT / "units" / "dropins"
UNITS = (
    "nginx.service",
    "postgresql@.service",
    "postgresql.service",
    "pgbouncer.service",
    "certbot.service",
)


def settings(unit: str) -> dict[str, list[str]]:
    """Every key of the drop-in's [Service] section, repeated keys in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (DROPINS / f"{unit}.d" / "aipbx-hardening.conf").read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_every_debian_unit_has_its_drop_in_installed() -> None:
    assert sorted(p.name for p in DROPINS.iterdir()) == sorted(f"{u}.d" for u in UNITS)
    install = (ROOT / "packaging/debian/aipbx-appliance.install").read_text().splitlines()
    for unit in UNITS:
        line = f"units/dropins/{unit}.d/aipbx-hardening.conf lib/systemd/system/{unit}.d"
        assert line in install, line


@pytest.mark.parametrize("unit", UNITS)
def test_the_drop_in_sandboxes_the_service(unit: str) -> None:
    s = settings(unit)
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("SystemCallArchitectures", "native"),
    ):
        assert s.get(key) == [value], (unit, key, s.get(key))
    assert "/run" in s["ReadOnlyPaths"]  # systemd 252 leaves /run writable otherwise
    caps = set(s["CapabilityBoundingSet"][-1].split())
    assert "CAP_SYS_ADMIN" not in caps and "CAP_SYS_PTRACE" not in caps
    assert s["SystemCallFilter"][0] == "@system-service"


def test_nginx_keeps_only_what_a_root_master_needs() -> None:
    s = settings("nginx.service")
    assert set(s["CapabilityBoundingSet"][0].split()) == {
        "CAP_NET_BIND_SERVICE",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_KILL",
    }
    # the PID file nginx.conf names, made outside the sandbox, is its only place in /run
    # before Debian's `nginx -t`, which opens it too
    assert s["ExecStartPre"] == [
        "",
        "+/usr/bin/touch /run/nginx.pid",
        "/usr/sbin/nginx -t -q -g 'daemon on; master_process on;'",
    ]
    assert "-/run/nginx.pid" in s["ReadWritePaths"][0].split()
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6"]


def test_postgresql_runs_as_postgres_on_loopback() -> None:
    s = settings("postgresql@.service")
    assert s["User"] == ["postgres"] and s["CapabilityBoundingSet"] == [""]
    assert s["IPAddressDeny"] == ["any"] and s["IPAddressAllow"] == ["localhost"]
    assert s["ReadWritePaths"] == ["/var/lib/postgresql /var/log/postgresql /run/postgresql"]
    # other local users keep peer authentication: no user namespace
    assert "PrivateUsers" not in s
