"""Issue 11 items 2, 8, 9 and 10 in a booted Debian 12 with the sample backend live (blue):

- 2: a local user (`nobody`) flooding the watchdog's API, or holding thousands of connections
  to nginx (443, 5005) or PgBouncer, makes it restart nothing, and the
  watchdog without file descriptors (RLIMIT_NOFILE lowered under it) says so once, as its
  own fault (AIPBX_CHECK=watchdog AIPBX_ACTION=own_fault), restarts nothing, and says when
  it is whole again;
- 8: nginx stopped (SIGSTOP) is seen (nginx answers /aipbx-health itself), killed and
  restarted;
- 9: PostgreSQL stopped (SIGSTOP) serves again through PgBouncer well within the stop
  timeout, with one restart;
- 10: PgBouncer listens on both colors' veth addresses, and one that started without an
  address is restarted by the watchdog.

The tests run in order on one machine; each waits for every check to be ok first and puts
back what it broke (SIGCONT, the descriptor limit, the namespace) even when it fails."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from appliance.colors import Color, color_net
from tests.system.appliance import aipbxctl_json, health, install, wait_until
from tests.system.machine import Machine
from tests.system.test_watchdog import (
    CONF,
    HERE,
    SAMPLE,
    SAMPLE_DIR,
    UNIT,
    check_state,
    journal,
    machine_time,
)

pytestmark = pytest.mark.system

SUBNET = "10.203.0.0/24"  # [network] subnet's default
BLUE = color_net(SUBNET, Color.BLUE).host_addr
GREEN = color_net(SUBNET, Color.GREEN).host_addr
BOUNCER = "aipbx-pgbouncer.service"
CLUSTER = "postgresql@15-main.service"
GREEN_NS = "aipbx-netns@green.service"
ALERTS = "/root/alerts.jsonl"
# the checks that restart something: each ok with its breaker closed before a fault
WATCHED = ("nginx", "postgresql", "pgbouncer", "backend_http", "backend_ws", "switch")

# As `nobody`: 2,500 connections held open to the API for 20 s, and one client sending its
# request a byte a second. Non-blocking connects: past the listen backlog they wait.
FLOOD = """
import os, resource, socket, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(2500):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", 6030))
    held.append(s)
slow, sent, end = None, 0, time.monotonic() + 20
while time.monotonic() < end:
    try:
        if slow is None:
            slow = socket.create_connection(("127.0.0.1", 6030), timeout=1)
        slow.send(b"G")
        sent += 1
    except OSError:
        if slow is not None:
            slow.close()
        slow = None
    time.sleep(1)
print("held", len(held), "sent", sent, "uid", os.getuid())
"""


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path) -> None:
    for suffix in ("", ".sha256"):
        src = SAMPLE_DIR / f"{SAMPLE}{suffix}"
        if not src.is_file():
            pytest.fail(f"{src} is missing: run `make sample`", pytrace=False)
        shutil.copy(src, machine.path("/root") / src.name)
    shutil.copy(HERE / "fake_alert_receiver.py", machine.path("/root") / "receiver.py")
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)
    machine.run(
        ["systemd-run", "--unit", "fake-alerts", "python3", "/root/receiver.py", "18088", ALERTS]
    )
    conf = machine.path(CONF)
    text = conf.read_text()
    for old, new in (
        ('# interval = "2s"', 'interval = "1s"'),
        ('# webhook_url = ""', 'webhook_url = "http://127.0.0.1:18088/hook"'),
    ):
        assert old in text, old
        text = text.replace(old, new, 1)
    conf.write_text(text)
    machine.run(["aipbxctl", "config", "check"])
    machine.run(["systemctl", "restart", UNIT])
    _, out = aipbxctl_json(machine, "upgrade", f"/root/{SAMPLE}", "--probation", "2", "--yes")
    assert out["ok"] and out["color"] == "blue", out
    h = settle(machine)
    assert h["alerts"]["webhook"]["enabled"], h["alerts"]


# --- helpers ----------------------------------------------------------------------------------


def settle(machine: Machine) -> dict[str, Any]:
    """Every check that restarts something ok and closed, no restart running, the watchdog
    not impaired: the state each fault starts from."""

    def settled() -> dict[str, Any] | None:
        h = health(machine)
        if h is None or h["watchdog"]["state"] != "ok":
            return None
        if any(r["restarting"] for r in h["restarts"].values()):
            return None
        checks = h["checks"]
        ok = all((checks[c]["state"], checks[c]["breaker"]) == ("ok", "closed") for c in WATCHED)
        return h if ok else None

    h: dict[str, Any] = wait_until(settled, 120, f"{', '.join(WATCHED)} ok and closed")
    return h


def since(machine: Machine, t: float, *matches: str) -> list[dict[str, Any]]:
    """The watchdog's journal entries from machine time `t` on, matching `matches`."""
    return [
        e
        for e in journal(machine, "-u", UNIT, *matches)
        if int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= t
    ]


def restarts(machine: Machine, t: float, unit: str | None = None) -> list[dict[str, Any]]:
    """Restarts begun since `t` (the `restarting` entries; not their outcome)."""
    matches = ["AIPBX_ACTION=restart", *([f"AIPBX_UNIT={unit}"] if unit else [])]
    return [e for e in since(machine, t, *matches) if "AIPBX_OUTCOME" not in e]


def holds(pred: Callable[[], bool], seconds: float, what: str) -> None:
    """`pred` stays true for `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), f"no longer true within {seconds:.0f} s: {what}"
        time.sleep(0.5)


def prop(machine: Machine, unit: str, name: str) -> str:
    return machine.run(["systemctl", "show", "-p", name, "--value", unit]).stdout.strip()


def main_pid(machine: Machine) -> int:
    return int(prop(machine, UNIT, "MainPID"))


def fds(machine: Machine, pid: int) -> int:
    return int(machine.sh(f"ls /proc/{pid}/fd | wc -l").stdout)


def signal_unit(machine: Machine, unit: str, sig: str, *, check: bool = True) -> None:
    """Every process of the unit, by PID (systemctl kill -s SIGSTOP fails here with EIO)."""
    machine.sh(
        f"cg=$(systemctl show -p ControlGroup --value {unit}); "
        f'kill -{sig} $(cat "/sys/fs/cgroup$cg/cgroup.procs")',
        check=check,
    )


def http_code(machine: Machine, url: str) -> str:
    argv = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url]
    return machine.run(argv, check=False).stdout.strip()


def db_answers(machine: Machine) -> bool:
    """psql as the app, through PgBouncer, within a few seconds."""
    secrets = machine.path("/etc/aipbx/secrets.env").read_text()
    password = re.search(r"^DB_PASS=(.*)$", secrets, re.MULTILINE)
    assert password, "no DB_PASS in secrets.env"
    argv = ["timeout", "4", "psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", "6432"]
    argv += ["-U", "aipbx_user", "-d", "aipbx_production", "-c", "SELECT 1"]
    env = {"PGPASSWORD": password[1], "PGCONNECT_TIMEOUT": "3"}
    r = machine.run(argv, check=False, env=env, timeout=30)
    return r.returncode == 0 and r.stdout.strip() == "1"


def bouncer_listens(machine: Machine) -> set[str]:
    out = machine.run(["ss", "-Hltn", "sport = :6432"]).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def webhook(machine: Machine, incident: str) -> list[str]:
    """The severities the webhook received for one incident, in order."""
    p = machine.path(ALERTS)
    got = [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
    return [
        a["body"]["severity"]
        for a in got
        if a["path"] == "/hook" and a["body"].get("incident") == incident
    ]


# --- item 2: the watchdog's own failure is not a service's ----------------------------------


def test_a_connection_flood_by_a_local_user_restarts_nothing(machine: Machine) -> None:
    h = settle(machine)
    kept = ["nginx.service", CLUSTER, BOUNCER, f"aipbx-backend@{h['live_color']}.service"]
    entered = {u: prop(machine, u, "ActiveEnterTimestamp") for u in kept}
    pid = main_pid(machine)
    baseline = fds(machine, pid)
    t = machine_time(machine)
    argv = ["prlimit", "--nofile=8192:8192", "runuser", "-u", "nobody", "--"]
    with ThreadPoolExecutor(1) as pool:
        flood = pool.submit(machine.run, [*argv, "python3", "-c", FLOOD], timeout=120)
        peak = baseline
        while not flood.done():
            peak = max(peak, fds(machine, pid))
            time.sleep(0.5)
        out = flood.result().stdout
    print(f"flood: {out.strip()}; watchdog descriptors {baseline} before, at most {peak} seen")
    assert "held 2500 " in out and "uid 65534" in out, out
    wait_until(lambda: fds(machine, pid) < 60, 30, "the watchdog's descriptors back under 60")
    wait_until(lambda: health(machine), 30, "/system-health to answer again")
    assert restarts(machine, t) == [], restarts(machine, t)
    # the API's cap kept the descriptors the checks need: never impaired
    impaired = since(machine, t, "AIPBX_CHECK=watchdog", "AIPBX_ACTION=own_fault")
    assert impaired == [], impaired
    assert {u: prop(machine, u, "ActiveEnterTimestamp") for u in kept} == entered
    assert main_pid(machine) == pid


def test_no_descriptor_left_is_the_watchdogs_own_fault(machine: Machine) -> None:
    settle(machine)
    pid = main_pid(machine)
    n_restarts = prop(machine, UNIT, "NRestarts")
    limits = machine.run(["cat", f"/proc/{pid}/limits"]).stdout
    found = re.search(r"^Max open files\s+(\S+)\s+(\S+)", limits, re.MULTILINE)
    assert found, limits
    t = machine_time(machine)
    machine.run(["prlimit", "--pid", str(pid), "--nofile=3:"])
    try:
        wait_until(
            lambda: since(machine, t, "AIPBX_CHECK=watchdog", "AIPBX_ACTION=own_fault"),
            30,
            "the watchdog to say it cannot run its checks",
        )
        # rounds without a descriptor: still one entry, nothing restarted
        holds(
            lambda: len(since(machine, t, "AIPBX_ACTION=own_fault")) == 1
            and not restarts(machine, t),
            8,
            "one own_fault entry and no restart while impaired",
        )
    finally:
        machine.run(["prlimit", "--pid", str(pid), f"--nofile={found[1]}:{found[2]}"])
    over = wait_until(
        lambda: since(machine, t, "AIPBX_CHECK=watchdog", "AIPBX_ACTION=own_fault_over"),
        60,
        "the watchdog to say it runs all its checks again",
    )
    impaired = since(machine, t, "AIPBX_CHECK=watchdog", "AIPBX_ACTION=own_fault")
    assert len(impaired) == 1 and len(over) == 1, (impaired, over)
    assert impaired[0]["PRIORITY"] == "2" and over[0]["PRIORITY"] == "6", (impaired, over)
    assert "EMFILE" in impaired[0]["MESSAGE"], impaired[0]
    incident = impaired[0]["AIPBX_INCIDENT"]
    assert over[0]["AIPBX_INCIDENT"] == incident, over
    assert restarts(machine, t) == [], restarts(machine, t)
    # one CRITICAL and one INFO about the watchdog itself, delivered once it could send
    wait_until(
        lambda: webhook(machine, incident) == ["CRITICAL", "INFO"],
        120,
        f"the webhook to receive CRITICAL and INFO for {incident}",
    )
    holds(lambda: webhook(machine, incident) == ["CRITICAL", "INFO"], 5, "no more alerts")
    h = wait_until(
        lambda: (x := health(machine)) is not None and x["watchdog"]["state"] == "ok" and x,
        30,
        "/system-health: the watchdog ok",
    )
    assert not h["watchdog"]["restarts_held"], h["watchdog"]
    assert all(c["state"] != "unknown" for c in h["checks"].values()), h["checks"]
    metrics = machine.run(["curl", "-s", "--max-time", "2", "http://127.0.0.1:6030/metrics"])
    assert "aipbx_watchdog_impaired 0" in metrics.stdout.splitlines(), metrics.stdout
    assert main_pid(machine) == pid and prop(machine, UNIT, "NRestarts") == n_restarts


# --- item 8: a stopped nginx is seen and restarted -------------------------------------------


def test_a_stopped_nginx_is_killed_and_restarted(machine: Machine) -> None:
    settle(machine)
    assert http_code(machine, "http://127.0.0.1:5005/aipbx-health") == "204"
    t = machine_time(machine)
    signal_unit(machine, "nginx.service", "STOP")
    try:
        wait_until(
            lambda: since(machine, t, "AIPBX_CHECK=nginx", "AIPBX_STATE=critical"),
            60,
            "the nginx check critical",
        )
        entries = wait_until(
            lambda: restarts(machine, t, "nginx.service"), 120, "the watchdog to restart nginx"
        )
        # any answer of the backend through TLS (the sample has no /api/ route: 404)
        wait_until(
            lambda: http_code(machine, "https://127.0.0.1/api/")[:1] in ("2", "4"),
            120,
            "nginx serving https://127.0.0.1/api/ again",
        )
    finally:
        signal_unit(machine, "nginx.service", "CONT", check=False)
    first = entries[0]
    assert first["AIPBX_CHECK"] == "nginx" and first.get("AIPBX_HUNG") == "1", first
    assert "killed first" in first["MESSAGE"], first
    wait_until(lambda: check_state(machine, "nginx") == ("ok", "closed"), 60, "nginx ok again")
    assert http_code(machine, "http://127.0.0.1:5005/aipbx-health") == "204"
    assert len(restarts(machine, t, "nginx.service")) == 1, restarts(machine, t, "nginx.service")


# --- item 9: a hung PostgreSQL is back quickly, with one restart -----------------------------


def test_a_stopped_postgresql_is_back_quickly_with_one_restart(machine: Machine) -> None:
    settle(machine)
    assert db_answers(machine)
    t = machine_time(machine)
    t0 = time.monotonic()
    signal_unit(machine, CLUSTER, "STOP")
    try:
        wait_until(
            lambda: restarts(machine, t, "postgresql.service") and db_answers(machine),
            120,
            "a restart of PostgreSQL and psql through PgBouncer answering",
        )
        took = time.monotonic() - t0
    finally:
        signal_unit(machine, CLUSTER, "CONT", check=False)
    print(f"PostgreSQL SIGSTOP -> psql through PgBouncer answers in {took:.1f} s")
    assert took < 45, took  # the issue wants well under 30 s (it was ~87 s)
    first = restarts(machine, t, "postgresql.service")[0]
    assert first["AIPBX_CHECK"] == "postgresql" and first.get("AIPBX_HUNG") == "1", first
    assert "killed first" in first["MESSAGE"], first
    # one restart for the outage: none follows while PostgreSQL comes back
    holds(
        lambda: len(restarts(machine, t, "postgresql.service")) == 1,
        20,
        "one restart of PostgreSQL",
    )
    wait_until(
        lambda: check_state(machine, "postgresql") == ("ok", "closed"), 60, "postgresql ok again"
    )
    assert len(restarts(machine, t, "postgresql.service")) == 1
    assert prop(machine, CLUSTER, "ActiveState") == "active"


# --- item 10: PgBouncer on every color's address ---------------------------------------------


def test_pgbouncer_restarted_alone_brings_the_namespaces_up(machine: Machine) -> None:
    settle(machine)
    machine.run(["systemctl", "stop", GREEN_NS])
    machine.run(["systemctl", "restart", BOUNCER])
    expected = {"127.0.0.1:6432", f"{BLUE}:6432", f"{GREEN}:6432"}
    wait_until(lambda: bouncer_listens(machine) == expected, 30, f"PgBouncer on {expected}")
    assert prop(machine, GREEN_NS, "ActiveState") == "active"
    wait_until(lambda: check_state(machine, "pgbouncer") == ("ok", "closed"), 60, "pgbouncer ok")


def test_pgbouncer_without_a_colors_address_is_restarted(machine: Machine) -> None:
    settle(machine)
    t = machine_time(machine)
    try:
        machine.run(["systemctl", "stop", GREEN_NS])
        # as if it had started before the veth was up
        machine.run(["systemctl", "restart", "--job-mode=ignore-dependencies", BOUNCER])
        listens = bouncer_listens(machine)
        assert f"{GREEN}:6432" not in listens and f"{BLUE}:6432" in listens, listens
        machine.run(["systemctl", "start", GREEN_NS])
        entries = wait_until(
            lambda: restarts(machine, t, BOUNCER), 120, "the watchdog to restart PgBouncer"
        )
        wait_until(lambda: f"{GREEN}:6432" in bouncer_listens(machine), 60, f"PgBouncer on {GREEN}")
        wait_until(
            lambda: check_state(machine, "pgbouncer") == ("ok", "closed"), 120, "pgbouncer ok"
        )
    finally:
        machine.run(["systemctl", "start", GREEN_NS], check=False)
        if f"{GREEN}:6432" not in bouncer_listens(machine):
            machine.run(["systemctl", "restart", BOUNCER], check=False)
    assert f"{GREEN}:6432" in entries[0]["MESSAGE"], entries[0]
    critical = [
        e
        for e in since(machine, t, "AIPBX_CHECK=pgbouncer", "AIPBX_STATE=critical")
        if "AIPBX_ACTION" not in e
    ]
    assert any(GREEN in e["MESSAGE"] for e in critical), critical
    assert bouncer_listens(machine) == {"127.0.0.1:6432", f"{BLUE}:6432", f"{GREEN}:6432"}


# --- item 2's neighbours: a local user saturating a service makes no restart -----------------

# As `nobody`: N connections held open to one port for S seconds (non-blocking connects:
# past the listen backlog they wait), then closed.
HOLD = """
import os, resource, socket, sys, time
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    held.append(s)
time.sleep(seconds)
print("held", len(held), "uid", os.getuid())
"""


BLUE_BACKEND = color_net(SUBNET, Color.BLUE).ns_addr


@pytest.mark.parametrize(
    ("host", "port", "n", "unit", "check"),
    [
        # Debian's nginx: worker_connections 768 per worker, one worker per CPU
        ("127.0.0.1", 443, 4000, "nginx.service", "nginx"),
        ("127.0.0.1", 5005, 4000, "nginx.service", "nginx"),
        # PgBouncer: max_client_conn = 500
        ("127.0.0.1", 6432, 1500, BOUNCER, "pgbouncer"),
        # the live color's own address (routed from the host to its veth)
        (BLUE_BACKEND, 5005, 4000, "aipbx-backend@blue.service", "backend_http"),
        (BLUE_BACKEND, 3033, 4000, "aipbx-backend@blue.service", "backend_ws"),
    ],
)
def test_a_local_user_holding_connections_restarts_nothing(
    machine: Machine, host: str, port: int, n: int, unit: str, check: str
) -> None:
    """Connections held open by `nobody` fill the service: a restart would drop every call's
    connection and fix nothing (they come back). The watchdog says the service is saturated,
    by whom, and restarts nothing."""
    settle(machine)
    entered = prop(machine, unit, "ActiveEnterTimestamp")
    t = machine_time(machine)
    argv = ["prlimit", "--nofile=16384:16384", "runuser", "-u", "nobody", "--", "python3"]
    out = machine.run([*argv, "-c", HOLD, host, str(port), str(n), "15"], timeout=120).stdout
    print(f"hold {port}: {out.strip()}; check {check}: {check_state(machine, check)}")
    assert f"held {n} " in out, out
    wait_until(lambda: check_state(machine, check) == ("ok", "closed"), 120, f"{check} ok")
    assert restarts(machine, t) == [], restarts(machine, t)
    assert prop(machine, unit, "ActiveEnterTimestamp") == entered
