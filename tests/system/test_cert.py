"""Issue 5 in a booted Debian 12: certificates from an ACME CA (Debian's Pebble, on
loopback inside the machine). The self-signed certificate of the install, `aipbxctl cert
issue` through nginx's webroot, renewals (by hand and by certbot.service, as
certbot.timer runs it) under HTTPS load on fresh and on kept-alive connections with no
failed request and no nginx reload, a renewal with a new key (a new directory and a
reload), a renewed certificate that does not match its key (refused), a renewal that
fails while the old certificate keeps serving and the watchdog says so, short
certificates driving the watchdog's expiry check, and bad input refused before certbot
runs.

The tests run in order on one machine. Pebble keeps its state in memory: it runs as one
transient unit for the whole module (the expiry test starts its own short-lived ones)."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system.appliance import aipbxctl_json, health, install, wait_until
from tests.system.machine import Machine

pytestmark = pytest.mark.system

DOMAIN = "pbx.aipbx.test"
EMAIL = "ops@aipbx.test"
PEBBLE_DIR = "/etc/pebble-test"
PEBBLE_CA = f"{PEBBLE_DIR}/cert.pem"  # pebble's own HTTPS certificate (certbot trusts it)
ACME = "https://localhost:14000/dir"
MANAGEMENT = "https://127.0.0.1:15000"
CA_ENV = {"REQUESTS_CA_BUNDLE": PEBBLE_CA}  # certbot speaks to the CA with python-requests
LIVE = f"/etc/letsencrypt/live/{DOMAIN}"
STATUS = "/var/lib/aipbx/cert-renewal.json"
CERTBOT_LOG = "/var/log/letsencrypt/letsencrypt.log"
# 25 days: under certbot's 30-day renewal window, so every run of certbot.service renews
# (as it would near the end of a real certificate's life), and above the watchdog's 14.
VALIDITY_S = 25 * 86400

# The load client (stdlib, run in the machine): fresh connections or kept-alive ones.
TLS_LOAD = Path(__file__).with_name("tls_load.py")


def say(text: str) -> None:
    """Figures for the record (shown with pytest -s)."""
    print(f"[cert] {text}", file=sys.stderr, flush=True)


def served(machine: Machine) -> dict[str, str]:
    """Issuer and serial of the certificate nginx serves for DOMAIN on 127.0.0.1:443."""
    out = machine.sh(
        f"openssl s_client -connect 127.0.0.1:443 -servername {DOMAIN} </dev/null 2>/dev/null"
        " | openssl x509 -noout -issuer -serial -nameopt RFC2253"
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def pebble_issuer(machine: Machine, kind: str) -> str:
    """Subject of Pebble's root or intermediate (made afresh each time pebble starts)."""
    pem = machine.run(["curl", "-sf", "--cacert", PEBBLE_CA, f"{MANAGEMENT}/{kind}/0"]).stdout
    path = f"{PEBBLE_DIR}/{kind}.pem"
    machine.path(path).write_text(pem)
    out = machine.run(["openssl", "x509", "-in", path, "-noout", "-subject", "-nameopt", "RFC2253"])
    return out.stdout.strip().removeprefix("subject=")


def start_pebble(machine: Machine, unit: str, port: int, validity_s: int) -> str:
    """Debian's pebble as a transient unit on loopback (`port` ACME, `port` + 1000
    management), issuing certificates valid for `validity_s`; its directory URL."""
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{port}",
            "managementListenAddress": f"127.0.0.1:{port + 1000}",
            "certificate": PEBBLE_CA,
            "privateKey": f"{PEBBLE_DIR}/key.pem",
            # Where it would validate; PEBBLE_VA_ALWAYS_VALID skips validation anyway.
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": validity_s,
        }
    }
    machine.path(f"{PEBBLE_DIR}/{unit}.json").write_text(json.dumps(config))
    env = ("PEBBLE_VA_ALWAYS_VALID=1", "PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0")
    machine.run(
        [
            "systemd-run",
            f"--unit={unit}",
            *(f"--setenv={e}" for e in env),
            "/usr/bin/pebble",
            "-config",
            f"{PEBBLE_DIR}/{unit}.json",
        ]
    )
    url = f"https://localhost:{port}/dir"
    wait_until(
        lambda: machine.run(["curl", "-sf", "--cacert", PEBBLE_CA, url], check=False).returncode
        == 0,
        30,
        f"{unit}'s ACME directory",
    )
    return url


@pytest.fixture(scope="module", autouse=True)
def pebble(machine: Machine, deb: Path) -> Iterator[None]:
    install(machine, deb)
    with machine.path("/etc/hosts").open("a") as hosts:
        hosts.write(f"127.0.0.1 {DOMAIN}\n")
    machine.path(PEBBLE_DIR).mkdir(parents=True, exist_ok=True)
    # Debian's pebble ships no certificate for its own HTTPS: one for localhost/127.0.0.1.
    machine.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            f"{PEBBLE_DIR}/key.pem",
            "-out",
            PEBBLE_CA,
        ]
    )
    start_pebble(machine, "pebble-test", 14000, VALIDITY_S)
    # certbot.service (what certbot.timer runs) trusts pebble's HTTPS the same way, as an
    # operator of a private ACME CA would set it.
    dropin = machine.path("/etc/systemd/system/certbot.service.d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "test-ca.conf").write_text(f"[Service]\nEnvironment=REQUESTS_CA_BUNDLE={PEBBLE_CA}\n")
    machine.run(["systemctl", "daemon-reload"])
    yield
    machine.run(["systemctl", "stop", "pebble-test.service"], check=False)


def test_install_serves_the_self_signed_certificate(machine: Machine) -> None:
    st = aipbxctl_json(machine, "cert", "status")[1]
    assert st["kind"] == "self-signed" and st["source"] == "/etc/aipbx/tls/selfsigned.crt"
    # served from the store nginx's workers read at each handshake, by www-data and no other
    assert re.fullmatch(r"/etc/aipbx-tls/key-[0-9a-f]{16}/fullchain\.pem", st["serving"])
    store = st["serving"].rsplit("/", 1)[0]
    modes = machine.run(
        ["stat", "-c", "%n %a %U:%G", "/etc/aipbx-tls", store, f"{store}/privkey.pem"]
    ).stdout.split("\n")
    assert [m.split()[1:] for m in modes if m] == [
        ["750", "root:www-data"],
        ["750", "root:www-data"],
        ["640", "root:www-data"],
    ], modes
    assert st["certificate"]["issuer"] == st["certificate"]["subject"]
    assert served(machine)["serial"] == st["certificate"]["serial"]
    assert st["renewal"]["problem"] is None
    assert st["renewal"]["timer"]["active"] == "active"  # Debian's certbot.timer
    # the appliance's hooks are in place
    hook = "/etc/letsencrypt/renewal-hooks/deploy/50-aipbx"
    assert machine.run(["stat", "-c", "%a %U", hook]).stdout.split() == ["755", "root"]
    unit = machine.run(["systemctl", "cat", "certbot.service"]).stdout
    assert "ExecStopPost=-/usr/bin/aipbxctl cert record-unit-result" in unit


def log_state(machine: Machine) -> str:
    return machine.sh(f"stat -c '%s %Y' {CERTBOT_LOG} 2>/dev/null || echo none").stdout


@pytest.mark.parametrize(
    ("domain", "email", "message"),
    [
        ("bad_domain", EMAIL, "aipbxctl: --domain: 'bad_domain' is not a valid domain name"),
        ("127.0.0.1", EMAIL, "aipbxctl: --domain: '127.0.0.1' is an address, not a domain"),
        (DOMAIN, "not-an-address", "aipbxctl: --email: 'not-an-address' is not a valid email"),
    ],
)
def test_bad_input_is_refused_before_certbot_runs(
    machine: Machine, domain: str, email: str, message: str
) -> None:
    before_log, before_conf = log_state(machine), machine.path("/etc/aipbx/aipbx.toml").read_text()
    started = time.monotonic()
    r = machine.run(
        ["aipbxctl", "cert", "issue", "--domain", domain, "--email", email, "--server", ACME],
        check=False,
        env=CA_ENV,
    )
    took = time.monotonic() - started
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.splitlines()[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr
    # certbot never ran: its log did not change (each run appends to it), nor did the config
    assert log_state(machine) == before_log
    assert machine.path("/etc/aipbx/aipbx.toml").read_text() == before_conf
    assert not machine.path("/etc/letsencrypt/live").exists()
    say(f"refused {domain!r}/{email!r} in {took:.2f} s: {r.stderr.splitlines()[0]}")


def test_issue_serves_a_chain_from_pebble(machine: Machine) -> None:
    started = time.monotonic()
    done = aipbxctl_json(
        machine,
        "cert",
        "issue",
        "--domain",
        DOMAIN,
        "--email",
        EMAIL,
        "--server",
        ACME,
        env=CA_ENV,
    )[1]
    took = time.monotonic() - started
    intermediate = pebble_issuer(machine, "intermediates")
    pebble_issuer(machine, "roots")  # saved for the verification below
    assert done["issued"] is True and done["serving"].startswith("/etc/aipbx-tls/key-")
    # renewals keep the key, so that nginx serves them without a reload
    renewal_conf = machine.path(f"/etc/letsencrypt/renewal/{DOMAIN}.conf").read_text()
    assert re.search(r"^reuse_key = True$", renewal_conf, re.M), renewal_conf
    assert done["certificate"]["issuer"] == intermediate
    now = served(machine)
    assert now == {"issuer": intermediate, "serial": done["certificate"]["serial"]}
    # the whole chain checks out against Pebble's root, for the name
    verify = machine.sh(
        f"openssl s_client -connect 127.0.0.1:443 -servername {DOMAIN} -verify_hostname "
        f"{DOMAIN} -CAfile {PEBBLE_DIR}/roots.pem -verify_return_error </dev/null 2>&1"
    ).stdout
    assert "Verify return code: 0 (ok)" in verify, verify
    # saved in aipbx.toml
    conf = machine.path("/etc/aipbx/aipbx.toml").read_text()
    assert f'domain = "{DOMAIN}"' in conf and f'email = "{EMAIL}"' in conf
    assert f'acme_server = "{ACME}"' in conf
    machine.run(["aipbxctl", "config", "check"])
    st = aipbxctl_json(machine, "cert", "status")[1]
    assert st["kind"] == "acme" and st["rendered_as_configured"] is True
    assert st["source"] == f"{LIVE}/fullchain.pem" and st["serving"] == done["serving"]
    assert st["renewal"]["problem"] is None
    assert st["renewal"]["last_renewal"]["serial"] == now["serial"]
    # plain HTTP still redirects, to the domain whatever Host the client sent
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
            f"http://{DOMAIN}/api/",
        ]
    )
    assert redirect.stdout == f"301 https://{DOMAIN}/api/"
    # a CA's certificate: now HSTS is sent (no `preload` unless nginx.hsts_preload)
    head = machine.run(
        [
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--resolve",
            f"{DOMAIN}:443:127.0.0.1",
            f"https://{DOMAIN}/api/",
        ]
    ).stdout.lower()
    assert "strict-transport-security: max-age=63072000; includesubdomains\n" in head, head
    say(
        f"issued serial {now['serial']} by {intermediate} in {took:.1f} s "
        f"(certbot part {done['seconds']} s)"
    )


def nginx_workers(machine: Machine) -> set[int]:
    """nginx's worker PIDs: a reload replaces every one of them."""
    master = machine.run(["cat", "/run/nginx.pid"]).stdout.strip()
    return {int(p) for p in machine.run(["pgrep", "-P", master]).stdout.split()}


def renew_under_load(machine: Machine, renew: Callable[[], object]) -> dict[str, Any]:
    """Run `renew` while two loads run (they start 2 s before): 100 req/s on fresh TLS
    connections and 100 req/s on 16 kept-alive HTTP/1.1 connections (POSTs, never
    retried). Returns both summaries."""
    machine.path("/root/tls_load.py").write_text(TLS_LOAD.read_text())
    box: dict[str, Any] = {}

    def load(mode: str) -> None:
        argv = ["python3", "/root/tls_load.py", DOMAIN, "/api/health", "100", "10", mode]
        box[mode] = json.loads(machine.run(argv).stdout)

    threads = [threading.Thread(target=load, args=(m,)) for m in ("fresh", "keepalive")]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        renew()
    finally:
        for t in threads:
            t.join(60)
    assert {"fresh", "keepalive"} <= box.keys(), f"a load client did not finish: {box}"
    return box


def assert_switched(load: dict[str, Any], before: str, after: str) -> float:
    """The fresh connections were served the old serial, then the new one, nothing else.
    Returns how long both were seen (with no reload: the handshakes in flight)."""
    seen = load["serials"]
    assert {s for s, _ in seen} == {before, after}, seen
    assert seen[0][0] == before and seen[-1][0] == after, seen
    first_new = next(at for s, at in seen if s == after)
    overlap: float = seen[-1][1] - first_new
    assert overlap < 2, seen
    return overlap


def assert_no_failure_and_no_reload(
    machine: Machine, loads: dict[str, Any], workers: set[int]
) -> None:
    fresh, kept = loads["fresh"], loads["keepalive"]
    for load in (fresh, kept):
        assert load["failures"] == [], load
        assert load["rate"] >= 50 and load["requests"] >= 500, load
    # every kept-alive connection lived through the renewal: none was closed under its
    # client (a graceful reload closes them all, and a request racing the close fails)
    assert kept["connections_opened"] == 16, kept
    assert len(kept["serials"]) == 1, kept  # they all still speak the TLS of before
    assert workers == nginx_workers(machine), "nginx was reloaded"


def renewed_under_load(machine: Machine, renew: Callable[[], object], what: str) -> str:
    """Renew under both loads: a new serial, no failed request, no reload, and the fresh
    connections switching from the old serial to the new one. Returns the new serial."""
    before = served(machine)["serial"]
    workers = nginx_workers(machine)
    loads = renew_under_load(machine, renew)
    after = served(machine)["serial"]
    fresh, kept = loads["fresh"], loads["keepalive"]
    say(
        f"{what}: serial {before} -> {after}; fresh connections: {fresh['requests']} "
        f"requests at {fresh['rate']} req/s, failures {len(fresh['failures'])}, serials seen "
        f"{fresh['serials']}; kept-alive: {kept['requests']} POSTs at {kept['rate']} req/s "
        f"on {kept['connections_opened']} connections, failures {len(kept['failures'])}"
    )
    assert after != before
    assert_no_failure_and_no_reload(machine, loads, workers)
    overlap = assert_switched(fresh, before, after)
    say(f"old and new serial both seen for {overlap * 1000:.0f} ms; nginx workers unchanged")
    return after


def test_forced_renewal_serves_a_new_serial_with_no_failed_request(machine: Machine) -> None:
    """Renewal keeps the key (reuse_key): the deploy hook renames the new chain into the
    key's directory and nginx serves it from the next handshake. No reload: no worker is
    replaced and no kept-alive connection is closed."""
    store = machine.run(["readlink", "/etc/aipbx-tls/current"]).stdout.strip()

    def renew() -> None:
        machine.run(
            ["certbot", "renew", "--force-renewal", "--no-random-sleep-on-renew", "-q"],
            env=CA_ENV,
        )

    after = renewed_under_load(machine, renew, "forced renewal")
    assert machine.run(["readlink", "/etc/aipbx-tls/current"]).stdout.strip() == store
    doc = json.loads(machine.path(STATUS).read_text())
    assert doc["last_renewal"]["serial"] == after
    assert doc["last_renewal"]["nginx_reloaded"] is False
    assert doc["last_renewal"]["served"] == "served from the next handshake, no reload"
    assert doc["last_attempt"]["ok"] is True


def test_renewal_by_certbot_service_as_the_timer_runs_it(machine: Machine) -> None:
    """certbot.service (PrivateTmp=) renews a due certificate; the deploy hook serves it
    from inside it, without a reload; its ExecStopPost records the run."""

    def start() -> None:
        machine.run(["systemctl", "start", "certbot.service"], timeout=300)

    after = renewed_under_load(machine, start, "certbot.service renewal")
    assert (
        machine.run(
            ["systemctl", "show", "-p", "Result", "--value", "certbot.service"]
        ).stdout.strip()
        == "success"
    )
    st = aipbxctl_json(machine, "cert", "status")[1]
    assert st["renewal"]["problem"] is None
    assert st["renewal"]["last_renewal"]["serial"] == after
    assert st["renewal"]["certbot_service"]["result"] == "success"
    entries = machine.run(
        ["journalctl", "-o", "json", "--no-pager", "AIPBX_ACTION=cert_renew", "AIPBX_OUTCOME=ok"]
    ).stdout
    assert after in entries


def test_a_renewed_certificate_that_does_not_match_its_key_is_not_served(
    machine: Machine,
) -> None:
    """With the files loaded at each handshake, `nginx -t` no longer reads them: the deploy
    hook checks the pair itself. A lineage whose certificate is for another key is refused,
    nothing in the store changes, nginx keeps serving, and the failure is recorded."""
    before = served(machine)["serial"]
    current = machine.run(["readlink", "/etc/aipbx-tls/current"]).stdout.strip()
    chain = machine.path(f"/etc/aipbx-tls/{current}/fullchain.pem").read_bytes()
    bad = f"/root/bad-lineage/{DOMAIN}"
    machine.path(bad).mkdir(parents=True, exist_ok=True)
    machine.run(["cp", "-L", f"{LIVE}/privkey.pem", f"{bad}/privkey.pem"])
    machine.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "30", "-subj", f"/CN={DOMAIN}", "-keyout", "/root/other.key",
            "-out", f"{bad}/fullchain.pem",
        ]
    )  # fmt: skip
    machine.run(["cp", f"{bad}/fullchain.pem", f"{bad}/cert.pem"])
    r = machine.run(["aipbxctl", "cert", "deploy-hook"], check=False, env={"RENEWED_LINEAGE": bad})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "nginx did not take it" in r.stderr and "do not match" in r.stderr, r.stderr
    assert "keeps serving the previous certificate" in r.stderr, r.stderr
    assert served(machine)["serial"] == before
    assert machine.path(f"/etc/aipbx-tls/{current}/fullchain.pem").read_bytes() == chain
    st = aipbxctl_json(machine, "cert", "status")[1]
    assert "do not match" in st["renewal"]["problem"]
    # the real lineage again: served, and the problem is cleared
    machine.run(["aipbxctl", "cert", "deploy-hook"], env={"RENEWED_LINEAGE": LIVE})
    st = aipbxctl_json(machine, "cert", "status")[1]
    assert st["renewal"]["problem"] is None


def test_a_renewal_with_a_new_key_switches_directory_with_a_reload(machine: Machine) -> None:
    """`certbot renew --new-key` (a key rotation): a certificate and its key cannot be
    renamed into place together, so the hook puts them in a new directory, renders the site
    with it and reloads nginx (after nginx -t). The previous directory stays for the
    handshakes old workers still do."""
    before = served(machine)["serial"]
    old_dir = machine.run(["readlink", "/etc/aipbx-tls/current"]).stdout.strip()
    workers = nginx_workers(machine)
    machine.run(
        [
            "certbot", "renew", "--force-renewal", "--new-key", "--no-random-sleep-on-renew",
            "-q",
        ],
        env=CA_ENV,
    )  # fmt: skip
    after = served(machine)["serial"]
    new_dir = machine.run(["readlink", "/etc/aipbx-tls/current"]).stdout.strip()
    assert after != before and new_dir != old_dir
    assert machine.path(f"/etc/aipbx-tls/{old_dir}/privkey.pem").exists()
    assert wait_until(lambda: nginx_workers(machine).isdisjoint(workers), 30, "the reload")
    doc = json.loads(machine.path(STATUS).read_text())
    assert doc["last_renewal"]["serial"] == after and doc["last_renewal"]["nginx_reloaded"]
    st = aipbxctl_json(machine, "cert", "status")[1]
    assert st["serving"] == f"/etc/aipbx-tls/{new_dir}/fullchain.pem"
    assert st["rendered_as_configured"] is True and st["renewal"]["problem"] is None
    say(f"new key: {old_dir} -> {new_dir}, serial {before} -> {after}, nginx reloaded")


def test_failed_renewal_keeps_the_old_certificate_and_alerts(machine: Machine) -> None:
    before = served(machine)["serial"]
    machine.run(["systemctl", "stop", "pebble-test.service"])
    r = machine.run(["systemctl", "start", "certbot.service"], check=False, timeout=300)
    assert r.returncode != 0
    assert served(machine)["serial"] == before  # the old certificate still serves
    st = aipbxctl_json(machine, "cert", "status")[1]
    problem = st["renewal"]["problem"]
    assert problem and problem.startswith("certbot.service failed"), problem
    assert "could not renew pbx.aipbx.test" in problem and "Connection refused" in problem
    assert st["renewal"]["certbot_service"]["result"] == "exit-code"
    assert re.search(
        r"^renewal\s+FAILING: ", machine.run(["aipbxctl", "cert", "status"]).stdout, re.M
    )
    # doctor reports it too (a finding, exit 5)
    code, report = aipbxctl_json(machine, "doctor", check=False)
    found = [f for f in report["findings"] if f["check"] == "certificate renewal"]
    assert code == 5 and found and "Connection refused" in found[0]["message"], report

    def renewal_check() -> dict[str, Any] | None:
        h = health(machine)
        c = h["checks"].get("cert_renewal") if h else None
        return c if c and c["state"] == "warning" else None

    check = wait_until(renewal_check, 30, "the watchdog's cert_renewal check to warn")
    assert "Connection refused" in check["error"], check
    h = health(machine)
    assert h is not None and h["checks"]["cert"]["state"] == "ok"  # 24 days left: not yet
    failed = machine.run(
        [
            "journalctl",
            "-o",
            "json",
            "--no-pager",
            "AIPBX_ACTION=cert_renew",
            "AIPBX_OUTCOME=failed",
        ]
    ).stdout
    assert "Connection refused" in failed
    say(
        f"pebble stopped: certbot.service failed, still serving {before}; watchdog: "
        f"{check['state']}: {check['error']}"
    )


@pytest.mark.parametrize(
    ("days", "state"), [(10, "warning"), (2, "critical")], ids=["10-days", "2-days"]
)
def test_a_certificate_near_its_end_is_warning_then_critical(
    machine: Machine, days: int, state: str
) -> None:
    """A CA issuing short certificates (a second Pebble), through `cert issue --server`:
    the served certificate's end date drives the watchdog's `cert` check, WARNING at 14
    days left or fewer, CRITICAL at 3 or fewer (the defaults)."""
    unit = f"pebble-{days}d"
    url = start_pebble(machine, unit, 14000 + days, days * 86400)
    try:
        done = aipbxctl_json(machine, "cert", "issue", "--server", url, env=CA_ENV)[1]
    finally:
        machine.run(["systemctl", "stop", unit], check=False)
    assert done["issued"] is True, done
    assert served(machine)["serial"] == done["certificate"]["serial"]
    left = done["certificate"]["days_left"]
    assert left == days - 1, done

    def cert_check() -> dict[str, Any] | None:
        h = health(machine)
        c = h["checks"].get("cert") if h else None
        return c if c and c["state"] == state else None

    check = wait_until(cert_check, 30, f"the watchdog's cert check to be {state}")
    assert f"expires in {left} days" in check["error"], check
    say(f"a {days}-day certificate: {left} days left, watchdog cert check {state}")
