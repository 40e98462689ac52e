"""Issue 4 in a booted Debian 12: the installed watchdog restarts PostgreSQL and PgBouncer
when they are stopped (the journal says so with AIPBX_ACTION=restart) and reports health
again, is itself killed and restarted by systemd when its loop is stuck (SIGSTOP and
WatchdogSec=), and its own CPU and memory are measured with every check on (the sample
backend deployed, so the live color's HTTP and WebSocket checks run too).

The tests run in order on one machine. Backend faults of the live color are tested in
tests/integration/test_watchdog_loop.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.appliance import aipbxctl_json, health, install, wait_until
from tests.system.machine import Machine

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
SAMPLE_DIR = Path(os.environ.get("AIPBX_SAMPLE_DIR", HERE.parents[1] / "build" / "sample"))
SAMPLE = "aipbx-sample-1.0.0.tar.gz"
UNIT = "aipbx-watchdog.service"
CONF = "/etc/aipbx/aipbx.toml"


def check_state(machine: Machine, check: str) -> tuple[str, str] | None:
    h = health(machine)
    if h is None:
        return None
    c = h["checks"][check]
    return c["state"], c["breaker"]


def journal(machine: Machine, *matches: str) -> list[dict[str, Any]]:
    r = machine.run(["journalctl", "-o", "json", "--no-pager", *matches], check=False)
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def show(machine: Machine, prop: str) -> str:
    return machine.run(["systemctl", "show", "-p", prop, "--value", UNIT]).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path) -> None:
    for suffix in ("", ".sha256"):
        src = SAMPLE_DIR / f"{SAMPLE}{suffix}"
        if not src.is_file():
            pytest.fail(f"{src} is missing: run `make sample`", pytrace=False)
        shutil.copy(src, machine.path("/root") / src.name)
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)
    # Check every second: the interval the resource figures are measured at.
    conf = machine.path(CONF)
    text = conf.read_text()
    assert '# interval = "2s"' in text
    conf.write_text(text.replace('# interval = "2s"', 'interval = "1s"', 1))
    machine.run(["aipbxctl", "config", "check"])
    machine.run(["systemctl", "restart", UNIT])


def test_health_after_setup(machine: Machine) -> None:
    def settled() -> dict[str, Any] | None:
        h = health(machine)
        ok = h is not None and all(
            h["checks"][c]["state"] == "ok" for c in ("postgresql", "pgbouncer", "nginx", "cert")
        )
        return h if ok else None

    h = wait_until(settled, 30, "PostgreSQL, PgBouncer, nginx and the certificate ok")
    assert h["interval_s"] == 1.0
    assert h["live_color"] is None
    for c in ("backend_http", "backend_ws"):
        assert h["checks"][c]["state"] == "idle", h["checks"][c]
    assert h["checks"]["disk"]["state"] in ("ok", "warning")
    assert h["checks"]["memory"]["state"] in ("ok", "warning")
    assert "expires in" in h["checks"]["cert"]["detail"]
    for name, ch in h["alerts"].items():
        assert ch["enabled"] is False and ch["reason"], name
    assert set(h["restarts"]) == {"nginx.service", "postgresql.service", "aipbx-pgbouncer.service"}
    metrics = machine.run(["curl", "-s", "--max-time", "2", "http://127.0.0.1:6030/metrics"])
    assert 'aipbx_check_up{check="postgresql"} 1' in metrics.stdout
    assert 'aipbx_breaker_state{check="nginx",state="closed"} 1' in metrics.stdout
    # only loopback: nothing listens on 6030 elsewhere
    listen = machine.run(["ss", "-Htln", "sport = :6030"]).stdout.split()
    assert "127.0.0.1:6030" in listen
    status = machine.run(["aipbxctl", "status"]).stdout
    assert re.search(r"^postgresql\s+ok\s+closed", status, re.MULTILINE), status
    _, st = aipbxctl_json(machine, "status")
    assert st["health"]["checks"]["pgbouncer"]["state"] == "ok"
    started = journal(machine, "-u", UNIT, "AIPBX_ACTION=start")
    assert started and started[-1]["PRIORITY"] == "6"


def restarted_by_watchdog(machine: Machine, unit: str, after: float) -> list[dict[str, Any]]:
    entries = journal(machine, "-u", UNIT, "AIPBX_ACTION=restart", f"AIPBX_UNIT={unit}")
    return [e for e in entries if int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= after]


def machine_time(machine: Machine) -> float:
    return float(machine.run(["date", "+%s.%N"]).stdout)


@pytest.mark.parametrize(
    ("unit", "check"),
    [("postgresql.service", "postgresql"), ("aipbx-pgbouncer.service", "pgbouncer")],
)
def test_a_stopped_service_is_restarted(machine: Machine, unit: str, check: str) -> None:
    wait_until(lambda: check_state(machine, check) == ("ok", "closed"), 60, f"{check} ok")
    since = machine_time(machine)
    machine.run(["systemctl", "stop", unit])
    entries = wait_until(
        lambda: restarted_by_watchdog(machine, unit, since), 30, f"the watchdog to restart {unit}"
    )
    first = entries[0]
    assert first["PRIORITY"] == "4" and first["AIPBX_CHECK"] == check
    assert first["MESSAGE"].startswith(f"restarting {unit} ({check}: ")
    wait_until(lambda: check_state(machine, check) == ("ok", "closed"), 60, f"{check} ok again")
    active = machine.run(["systemctl", "is-active", unit], check=False).stdout.strip()
    if active != "active":
        log = machine.run(["journalctl", "--no-pager", "-n", "80"]).stdout
        raise AssertionError(f"{unit} is {active} though {check} answers\n{log}")
    h = health(machine)
    assert h is not None and h["restarts"][unit]["total"] == 1
    # every transition on the way is in the journal, with the check and its state
    states = [
        (e["AIPBX_STATE"], e.get("AIPBX_BREAKER", ""))
        for e in journal(machine, "-u", UNIT, f"AIPBX_CHECK={check}")
        if int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= since and "AIPBX_ACTION" not in e
    ]
    assert ("critical", "") in states and ("critical", "open") in states, states
    assert ("critical", "half_open") in states and ("ok", "closed") in states, states
    assert states[-1][0] == "ok", states
    outcome = journal(machine, "-u", UNIT, "AIPBX_ACTION=restart", "AIPBX_OUTCOME=ok")
    assert any(e["AIPBX_UNIT"] == unit for e in outcome)


def test_a_stuck_watchdog_is_killed_and_restarted_by_systemd(machine: Machine) -> None:
    pid = int(show(machine, "MainPID"))
    restarts = int(show(machine, "NRestarts"))
    assert pid > 0
    assert show(machine, "WatchdogUSec") == "30s"
    machine.run(["kill", "-STOP", str(pid)])
    wait_until(
        lambda: int(show(machine, "NRestarts")) == restarts + 1
        and int(show(machine, "MainPID")) not in (0, pid)
        and show(machine, "ActiveState") == "active",
        90,
        "systemd to kill the stuck watchdog and start a new one",
    )
    text = machine.run(["journalctl", "-u", UNIT, "--no-pager", "-n", "200"]).stdout
    assert "Watchdog timeout" in text, text[-3000:]
    wait_until(lambda: health(machine), 30, "the new watchdog's /system-health")


def cpu_ticks(machine: Machine, pid: int) -> tuple[int, int]:
    """CPU time of the daemon (all its threads) and of its children that ended (the
    systemctl it runs), in clock ticks. Not the unit's cgroup: on a host without systemd,
    machines booted side by side share their cgroup directories, and another machine's
    watchdog would be counted too."""
    fields = machine.run(["cat", f"/proc/{pid}/stat"]).stdout.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def test_resource_use_with_every_check_on(machine: Machine) -> None:
    _, out = aipbxctl_json(machine, "upgrade", f"/root/{SAMPLE}", "--probation", "2", "--yes")
    assert out["ok"] and out["color"] == "blue", out

    def backend_on() -> bool:
        h = health(machine)
        return h is not None and all(
            h["checks"][c]["state"] != "idle" for c in ("backend_http", "backend_ws")
        )

    wait_until(backend_on, 60, "every check on (the backend checks see the live color)")
    h = health(machine)
    assert h is not None
    for c in ("backend_http", "backend_ws"):
        assert h["checks"][c]["state"] == "ok", h["checks"][c]
    pid = int(show(machine, "MainPID"))
    time.sleep(5)  # past start-up
    before = health(machine)
    assert before is not None
    t0, (own0, kids0) = time.monotonic(), cpu_ticks(machine, pid)
    time.sleep(60)
    t1, (own1, kids1) = time.monotonic(), cpu_ticks(machine, pid)
    h = health(machine)
    assert h is not None
    rounds = h["rounds"] - before["rounds"]
    ticks = int(machine.run(["getconf", "CLK_TCK"]).stdout)
    status = machine.run(["cat", f"/proc/{pid}/status"]).stdout
    rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1])  # type: ignore[index]
    rollup = machine.run(["cat", f"/proc/{pid}/smaps_rollup"]).stdout
    pss_kib = int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)[1])  # type: ignore[index]
    own_pct = 100.0 * (own1 - own0) / ticks / (t1 - t0)
    kids_pct = 100.0 * (kids1 - kids0) / ticks / (t1 - t0)
    cpu_pct = own_pct + kids_pct
    figures = (
        f"watchdog over {t1 - t0:.0f} s at a 1 s interval, {rounds} rounds of "
        f"{len(h['checks'])} checks: CPU {cpu_pct:.2f} % of a core (daemon {own_pct:.2f} %, "
        f"systemctl {kids_pct:.2f} %), VmRSS {rss_kib / 1024:.1f} MiB, "
        f"PSS {pss_kib / 1024:.1f} MiB"
    )
    print(figures)
    Path(os.environ.get("AIPBX_WATCHDOG_FIGURES", "/dev/null")).write_text(figures + "\n")
    assert 55 <= rounds <= 62, figures
    # A guard only a defect breaks (a busy loop, work per round gone wild), not the target:
    # a CPU share moves with the load on the host. The 0.5 % target is `make bench-watchdog`'s.
    assert cpu_pct <= 3.0, figures
    # The target is 30 MiB; aiohttp (the API) alone takes ~9 MiB of this. A guard against
    # growth, not the target.
    assert rss_kib <= 40 * 1024, figures


def api_ok(machine: Machine) -> bool:
    r = machine.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "1",
            "http://127.0.0.1:5005/api",
        ],
        check=False,
    )
    return r.stdout.strip() == "200"


def test_a_hung_backend_is_restarted(machine: Machine) -> None:
    """Alive but not answering (SIGSTOP): systemd sees nothing wrong, the watchdog does."""
    backend = "aipbx-backend@blue.service"
    wait_until(
        lambda: check_state(machine, "backend_http") == ("ok", "closed"), 60, "backend_http ok"
    )
    since = machine_time(machine)
    t0 = time.monotonic()
    # every process of the unit, by PID (systemctl kill -s SIGSTOP fails here with EIO)
    machine.sh(
        f"cg=$(systemctl show -p ControlGroup --value {backend}); "
        'kill -STOP $(cat "/sys/fs/cgroup$cg/cgroup.procs")'
    )
    wait_until(lambda: not api_ok(machine), 10, "the backend to stop answering")
    wait_until(
        lambda: restarted_by_watchdog(machine, backend, since),
        45,
        "the watchdog to restart the hung backend",
    )
    wait_until(lambda: api_ok(machine), 45, "the backend to serve again")
    recovered = time.monotonic() - t0
    print(f"hang -> serving again in {recovered:.1f} s at a 1 s interval")
    # 3 failed checks at a 1 s interval open the breaker, then a kill and a start (~1 s):
    # well inside seed 000's 30 s
    assert recovered < 15, recovered
    wait_until(
        lambda: check_state(machine, "backend_http") == ("ok", "closed"),
        60,
        "backend_http ok again",
    )


def test_a_crashed_backend_serves_again(machine: Machine) -> None:
    backend = "aipbx-backend@blue.service"
    pid = machine.run(["systemctl", "show", "-p", "MainPID", "--value", backend]).stdout.strip()
    t0 = time.monotonic()
    machine.run(["systemctl", "kill", "-s", "SIGKILL", "--kill-whom=main", backend])
    wait_until(
        lambda: machine.run(
            ["systemctl", "show", "-p", "MainPID", "--value", backend]
        ).stdout.strip()
        not in (pid, "0"),
        30,
        "a new main process",
    )
    wait_until(lambda: api_ok(machine), 30, "the backend to serve again")
    print(f"crash -> serving again in {time.monotonic() - t0:.1f} s")
    assert machine.run(["systemctl", "is-active", backend]).stdout.strip() == "active"


def test_a_flushed_ruleset_is_noticed_and_the_switch_table_restored(machine: Machine) -> None:
    """`nft flush ruleset` (what Debian's /etc/nftables.conf does when nftables.service
    restarts) takes the switch table away: nginx gets connection refused from 127.203.0.1
    while the backend, checked directly, is fine. The watchdog's switch check sees it and
    applies the table again from state.json."""
    wait_until(lambda: api_ok(machine), 30, "the API through nginx")
    wait_until(lambda: check_state(machine, "switch") == ("ok", "closed"), 30, "switch ok")
    since = machine_time(machine)
    t0 = time.monotonic()
    machine.run(["nft", "flush", "ruleset"])  # the machine's own network namespace
    assert not api_ok(machine)
    wait_until(
        lambda: restarted_by_watchdog(machine, "nft table inet aipbx", since),
        30,
        "the watchdog to restore the switch table",
    )
    wait_until(lambda: api_ok(machine), 10, "the API through nginx again")
    took = time.monotonic() - t0
    print(f"flushed ruleset -> serving through the switch again in {took:.1f} s")
    assert took < 15, took  # 3 failed rounds at a 1 s interval open the breaker
    table = machine.run(["nft", "list", "table", "inet", "aipbx"]).stdout
    live = json.loads(machine.path("/var/lib/aipbx/state.json").read_text())["live_color"]
    assert "dnat ip to" in table and live in ("blue", "green"), table
    entry = restarted_by_watchdog(machine, "nft table inet aipbx", since)[0]
    assert "switch table inet aipbx is missing" in entry["MESSAGE"], entry
    wait_until(lambda: check_state(machine, "switch") == ("ok", "closed"), 30, "switch ok again")


def test_a_hung_backend_alerts_once_to_telegram_and_the_webhook(machine: Machine) -> None:
    """CRITICAL then INFO, once each, on a fake Telegram API and a webhook receiver."""
    shutil.copy(HERE / "fake_alert_receiver.py", machine.path("/root") / "receiver.py")
    machine.run(["rm", "-f", "/root/alerts.jsonl"])
    machine.run(
        [
            "systemd-run",
            "--unit",
            "fake-alerts",
            "python3",
            "/root/receiver.py",
            "18088",
            "/root/alerts.jsonl",
        ]
    )
    conf = machine.path(CONF)
    original = conf.read_text()
    edited = original
    for old, new in (
        ('# critical_after = "60s"', 'critical_after = "2s"'),
        (
            '# telegram_base_url = "https://api.telegram.org"',
            'telegram_base_url = "http://127.0.0.1:18088"',
        ),
        ('# webhook_url = ""', 'webhook_url = "http://127.0.0.1:18088/hook"'),
    ):
        assert old in edited, old
        edited = edited.replace(old, new, 1)
    # the watchdog's credentials: alerts.env, root's only (secrets.env is the app's)
    secrets = machine.path("/etc/aipbx/alerts.env")
    secrets_before = secrets.read_text()
    try:
        conf.write_text(edited)
        secrets.write_text(
            secrets_before + "TELEGRAM_BOT_TOKEN=123:test\n" "TELEGRAM_ADMIN_CHATID=42\n"
        )
        machine.run(["aipbxctl", "config", "check"])
        machine.run(["systemctl", "restart", UNIT])
        wait_until(
            lambda: check_state(machine, "backend_http") == ("ok", "closed"), 60, "backend_http ok"
        )
        h = health(machine)
        assert h is not None
        assert h["alerts"]["telegram"]["enabled"] and h["alerts"]["webhook"]["enabled"]
        backend = "aipbx-backend@blue.service"
        machine.sh(
            f"cg=$(systemctl show -p ControlGroup --value {backend}); "
            'kill -STOP $(cat "/sys/fs/cgroup$cg/cgroup.procs")'
        )
        wait_until(lambda: api_ok(machine), 60, "the backend to serve again")

        def alerts() -> list[dict[str, Any]]:
            p = machine.path("/root/alerts.jsonl")
            return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

        wait_until(lambda: len(alerts()) >= 4, 60, "CRITICAL and INFO on both channels")
        time.sleep(3)  # nothing more may follow
        got = alerts()
        telegram = [
            a["body"]["text"].split()[1] for a in got if a["path"] == "/bot123:test/sendMessage"
        ]
        hook = [a["body"]["severity"] for a in got if a["path"] == "/hook"]
        assert telegram == ["CRITICAL", "INFO"], got
        assert hook == ["CRITICAL", "INFO"], got
        assert all(a["body"].get("chat_id", "42") == "42" for a in got)
        # the token never reaches the journal
        assert "123:test" not in machine.run(["journalctl", "--no-pager", "-u", UNIT]).stdout
    finally:
        conf.write_text(original)
        secrets.write_text(secrets_before)
        machine.run(["systemctl", "stop", "fake-alerts.service"], check=False)
        machine.run(["systemctl", "restart", UNIT])
