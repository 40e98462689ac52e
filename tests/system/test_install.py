"""Issue 2 end to end: the built .deb installed with apt into a booted Debian 12, then
`aipbxctl setup`, config checks, units, reboot, remove, purge and install again. The tests
of this module run in order on one machine, as an operator would go."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.system.appliance import assert_no_failed_units, install
from tests.system.machine import Machine

pytestmark = pytest.mark.system

UNITS = (
    "aipbx.target",
    "aipbx-watchdog.service",
    "aipbx-backend@.service",
    "aipbx-netns@.service",
    "aipbx-pgbouncer.service",
)


def curl_headers(machine: Machine, url: str) -> tuple[int, dict[str, str], str]:
    r = machine.run(["curl", "-sk", "--max-time", "10", "-D", "/dev/stderr", url], check=False)
    lines = r.stderr.splitlines()
    status = int(lines[0].split()[1]) if lines else 0
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (ln.partition(":") for ln in lines[1:] if ":" in ln)
    }
    return status, headers, r.stdout


def test_install_creates_user_dirs_cert_and_serves_tls(machine: Machine, deb: Path) -> None:
    install(machine, deb)
    assert machine.run(["getent", "passwd", "_aipbx"]).stdout.startswith("_aipbx:")
    conffiles = machine.run(["dpkg-query", "-W", "-f=${Conffiles}", "aipbx-appliance"]).stdout
    assert "/etc/aipbx/aipbx.toml" in conffiles
    for d in ("/opt/aipbx/releases", "/opt/aipbx/colors", "/var/lib/aipbx", "/etc/aipbx/tls"):
        machine.run(["test", "-d", d])
    machine.run(["openssl", "x509", "-in", "/etc/aipbx/tls/selfsigned.crt", "-noout"])
    assert machine.run(["systemctl", "is-enabled", "aipbx.target"]).stdout.strip() == "enabled"
    machine.run(["systemctl", "is-active", "aipbx-watchdog.service"])
    assert_no_failed_units(machine)
    # TLS from the first minute: the API answers 503 (no release yet), over TLS.
    status, headers, body = curl_headers(machine, "https://127.0.0.1/api/")
    assert status == 503, body
    assert headers.get("retry-after") == "5"
    # the self-signed default: no HSTS (a browser must not pin it, nor preload the name)
    assert "strict-transport-security" not in headers


def test_config_check_refuses_bad_values_with_file_and_line(machine: Machine) -> None:
    cases = {
        '[backend]\nhttp_port = "5005"\n': ":2: backend.http_port must be an integer",
        "[site]\nnope = 1\n": ":2: unknown key site.nope",
        '[site]\n\ndomain = "bad_domain"\n': ":3: site.domain:",
        "[nginx]\nhttps_port = 70000\n": ":2: nginx.https_port: port 70000 is out of range",
    }
    for text, expected in cases.items():
        machine.path("/root").joinpath("bad.toml").write_text(text)
        r = machine.run(["aipbxctl", "config", "check", "/root/bad.toml"], check=False)
        assert r.returncode == 2, (text, r.stdout, r.stderr)
        first = r.stderr.splitlines()[0]
        assert first.startswith("aipbxctl: /root/bad.toml") and expected in first, first
    ok = machine.run(["aipbxctl", "config", "check"])
    assert ok.stdout.strip() == "/etc/aipbx/aipbx.toml: ok"


def test_config_check_refuses_a_subnet_that_clashes_with_a_host_route(machine: Machine) -> None:
    machine.sh(
        "ip link add aipbxtest0 type veth peer name aipbxtest1 && ip link set aipbxtest0 up && "
        "ip route add 10.203.0.0/16 dev aipbxtest0"
    )
    try:
        r = machine.run(["aipbxctl", "config", "check"], check=False)
        assert r.returncode == 2
        assert re.match(
            r"aipbxctl: /etc/aipbx/aipbx.toml:\d+: network.subnet 10.203.0.0/24 "
            r"overlaps the host's route 10.203.0.0/16 dev aipbxtest0",
            r.stderr,
        ), r.stderr
    finally:
        machine.run(["ip", "link", "delete", "aipbxtest0"])
    machine.run(["aipbxctl", "config", "check"])


def test_setup_configures_everything(machine: Machine) -> None:
    r = machine.run(
        [
            "aipbxctl",
            "setup",
            "--domain",
            "pbx.example.test",
            "--email",
            "ops@example.test",
            "--json",
        ],
        timeout=180,
    )
    report = json.loads(r.stdout)
    assert report["changed"] is True
    text = " ".join(report["changes"])
    for what in ("secrets", "PostgreSQL role", "database", "PgBouncer", "nginx"):
        assert what in text, (what, report)
    st = machine.run(["stat", "-c", "%a %U %G", "/etc/aipbx/secrets.env"]).stdout.split()
    assert st == ["640", "root", "_aipbx"]
    # the secret is never printed
    secrets = dict(
        line.split("=", 1)
        for line in machine.run(["cat", "/etc/aipbx/secrets.env"]).stdout.splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert secrets["DB_PASS"] not in r.stdout + r.stderr
    assert secrets["DB_PASS"] not in machine.run(["journalctl", "--no-pager"]).stdout
    # SCRAM in PostgreSQL, and a connection through PgBouncer with the generated password
    verifier = machine.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-XAtc",
            "SELECT rolpassword FROM pg_authid WHERE rolname='aipbx_user'",
        ]
    )
    assert verifier.stdout.startswith("SCRAM-SHA-256$")
    q = machine.run(
        [
            "psql",
            "-XAt",
            "-h",
            "127.0.0.1",
            "-p",
            "6432",
            "-U",
            "aipbx_user",
            "-d",
            "aipbx_production",
            "-c",
            "SELECT current_user",
        ],
        env={"PGPASSWORD": secrets["DB_PASS"]},
    )
    assert q.stdout.strip() == "aipbx_user"
    # the domain went into the conffile
    cfg = machine.run(["cat", "/etc/aipbx/aipbx.toml"]).stdout
    assert 'domain = "pbx.example.test"' in cfg
    assert_no_failed_units(machine)


def test_setup_twice_changes_nothing(machine: Machine) -> None:
    before = machine.run(
        [
            "sha256sum",
            "/etc/nginx/conf.d/aipbx.conf",
            "/etc/aipbx/secrets.env",
            "/etc/aipbx/pgbouncer.ini",
        ]
    ).stdout
    r = machine.run(["aipbxctl", "setup", "--domain", "pbx.example.test"])
    assert r.stdout.strip() == "setup: nothing to change, the appliance is already set up"
    j = json.loads(machine.run(["aipbxctl", "setup", "--json"]).stdout)
    assert j == {"changed": False, "changes": []}
    after = machine.run(
        [
            "sha256sum",
            "/etc/nginx/conf.d/aipbx.conf",
            "/etc/aipbx/secrets.env",
            "/etc/aipbx/pgbouncer.ini",
        ]
    ).stdout
    assert before == after


def test_tls_site_headers(machine: Machine) -> None:
    status, headers, _ = curl_headers(machine, "https://127.0.0.1/api/health")
    assert status == 503  # no release deployed yet
    assert headers["x-frame-options"] == "SAMEORIGIN"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert "strict-transport-security" not in headers  # self-signed (test_cert: with a CA's)
    assert headers["content-security-policy"].startswith("default-src 'self'")
    redirect = machine.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Host: evil.example",
            "http://127.0.0.1/x",
        ]
    ).stdout
    # the configured domain (setup ran with --domain above), never the Host header sent
    assert redirect == "301 https://pbx.example.test/x"
    # no port tells nginx's version
    for url in ("http://127.0.0.1/x", "https://127.0.0.1/x", "http://127.0.0.1:5005/x"):
        head = machine.run(["curl", "-sk", "-o", "/dev/null", "-D", "-", url]).stdout
        assert "\nserver: nginx\n" in head.lower(), (url, head)
    # no frontend deployed: a plain 404 saying so, and no rewrite cycle in nginx's log
    r = machine.run(["curl", "-sk", "-w", " %{http_code}", "https://127.0.0.1/"])
    assert r.stdout == "no frontend is deployed on this appliance\n 404", r.stdout
    assert "cycle" not in machine.path("/var/log/nginx/error.log").read_text()


def test_bad_config_is_refused_and_nothing_applied(machine: Machine) -> None:
    conf = machine.path("/etc/aipbx/aipbx.toml")
    good = conf.read_text()
    site_before = machine.run(["sha256sum", "/etc/nginx/conf.d/aipbx.conf"]).stdout
    try:
        bad = re.sub(r"(?m)^#? *pool_size *=.*$", 'pool_size = "many"', good, count=1)
        assert bad != good
        conf.write_text(bad)
        r = machine.run(["aipbxctl", "setup"], check=False)
        assert r.returncode == 2
        assert re.match(
            r"aipbxctl: /etc/aipbx/aipbx.toml:\d+: database.pool_size must be an " r"integer",
            r.stderr,
        ), r.stderr
        assert machine.run(["sha256sum", "/etc/nginx/conf.d/aipbx.conf"]).stdout == site_before
    finally:
        conf.write_text(good)


def test_status_doctor_and_logs(machine: Machine) -> None:
    data = json.loads(machine.run(["aipbxctl", "status", "--json"]).stdout)
    states = {s["name"]: s["active"] for s in data["services"]}
    assert data["set_up"] is True and data["live_color"] is None
    for unit in (
        "aipbx.target",
        "aipbx-watchdog.service",
        "nginx.service",
        "aipbx-pgbouncer.service",
    ):
        assert states[unit] == "active", (unit, states)
    # no release is live, so no color runs
    assert states["aipbx-backend@blue.service"] == "inactive"
    assert states["aipbx-backend@green.service"] == "inactive"
    doctor = machine.run(["aipbxctl", "doctor"], check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    # doctor names a stopped service with a hint, and exits 5
    machine.run(["systemctl", "stop", "aipbx-pgbouncer.service"])
    doctor = machine.run(["aipbxctl", "doctor"], check=False)
    assert doctor.returncode == 5
    assert "aipbx-pgbouncer.service is inactive" in doctor.stdout
    assert "hint:" in doctor.stdout
    machine.run(["systemctl", "start", "aipbx-pgbouncer.service"])
    logs = machine.run(["aipbxctl", "logs", "aipbxctl", "-n", "50"]).stdout
    assert "audit: setup by root" in logs


def test_units_verify_and_security_scores(machine: Machine) -> None:
    paths = [f"/lib/systemd/system/{u}" for u in UNITS]
    v = machine.run(["systemd-analyze", "verify", *paths], check=False)
    assert v.returncode == 0, v.stderr
    for unit in UNITS:
        if not unit.endswith(".service"):
            continue
        name = unit.replace("@.", "@blue.")
        r = machine.run(["systemd-analyze", "security", "--no-pager", name], check=False)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
        assert m, r.stdout[-500:] + r.stderr
        assert float(m.group(1)) <= 2.0, f"{name}: exposure {m.group(1)}"


def test_reboot_brings_the_appliance_back(machine: Machine) -> None:
    machine.shutdown()
    machine.boot()
    for unit in (
        "aipbx.target",
        "aipbx-watchdog.service",
        "nginx.service",
        "aipbx-pgbouncer.service",
        "postgresql.service",
    ):
        machine.run(["systemctl", "is-active", "--quiet", unit])
    status, _, _ = curl_headers(machine, "https://127.0.0.1/api/")
    assert status == 503
    assert_no_failed_units(machine)


def test_remove_purge_and_install_again(machine: Machine, deb: Path) -> None:
    machine.run(
        ["apt-get", "remove", "-y", "aipbx-appliance"],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=300,
    )
    for unit in ("aipbx-watchdog.service", "aipbx-pgbouncer.service", "aipbx.target"):
        r = machine.run(["systemctl", "is-active", unit], check=False)
        assert r.stdout.strip() in ("inactive", "unknown"), (unit, r.stdout)
    assert_no_failed_units(machine)
    machine.run(["test", "-f", "/etc/aipbx/aipbx.toml"])  # conffile kept on remove
    purge = machine.run(
        ["apt-get", "purge", "-y", "aipbx-appliance"],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=300,
    )
    said = purge.stdout + purge.stderr
    assert "kept" in said.lower() and "aipbx_production" in said, said
    for gone in ("/etc/aipbx", "/var/lib/aipbx", "/opt/aipbx", "/etc/nginx/conf.d/aipbx.conf"):
        assert machine.run(["test", "-e", gone], check=False).returncode == 1, gone
    # the database and its role are kept
    assert (
        machine.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-XAtc",
                "SELECT 1 FROM pg_database WHERE datname='aipbx_production'",
            ]
        ).stdout.strip()
        == "1"
    )
    assert_no_failed_units(machine)
    install(machine, deb)
    machine.run(["systemctl", "is-active", "aipbx-watchdog.service"])
    # setup again: the role exists, the new password is set on it
    machine.run(["aipbxctl", "setup"], timeout=180)
    assert_no_failed_units(machine)
