"""`make bench-watchdog` (issue 4): what the watchdog does for the live backend, measured in a
booted Debian 12 with the appliance installed, the watchdog checking every second and its
alerts going to a webhook receiver inside the machine. Writes build/bench/watchdog.json.

- app_start_s: `systemctl restart` of the live color until GET :5005/api (nginx) answers 200.
- hang_recovery_s: the live backend SIGSTOPped (the whole cgroup) until /api answers again:
  the watchdog must see it hang and restart it.
- crash_recovery_s: its main process SIGKILLed until /api answers again (systemd's
  Restart=on-failure).
- crashloop_cpu_pct, crashloop_alerts: a release that exits at every start
  (SAMPLE_FAIL=start), for --crashloop-duration seconds: the CPU it costs, the CRITICAL
  alerts the webhook receives.
- rss_mb, cpu_pct: the watchdog's own memory and CPU at a 1 s interval, every check on.

All times are epoch seconds taken inside the machine (it shares the host's clock). A
benchmark reports and does not gate: it exits 0 when a target is missed, and says MISSED."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import bluegreen
from tests.system.harness import harness_problem
from tests.system.machine import Machine
from tests.system.rootfs import ensure_rootfs

TOP = Path(__file__).resolve().parents[1]
CONF = "/etc/aipbx/aipbx.toml"
BACKEND_ENV = "/etc/aipbx/backend.env"
WATCHDOG = "aipbx-watchdog.service"
# The template's instances live in this slice: its CPU time keeps what instances that
# stopped (or crashed) used, where an instance's own CPUUsageNSec restarts at each start.
BACKEND_SLICE = "system-aipbx\\x2dbackend.slice"
API = "http://127.0.0.1:5005/api"  # nginx's host service port -> the live color
HEALTH = "http://127.0.0.1:6030/system-health"
HELPER = "/root/aipbx-wdbench.py"
ALERTS = "/root/aipbx-wdbench-alerts.jsonl"
WEBHOOK_PORT = 18099
WEBHOOK_UNIT = "wdbench-webhook"
BACKEND_CHECKS = ("backend_http", "backend_ws")
SEED_HANG_PROMISE_S = 30.0

# Runs inside the machine (its python3, stdlib only): the webhook receiver, the probe that
# does a fault and polls /api until it answers again, and a CPU snapshot of every process.
HELPER_CODE = r'''
import argparse, http.server, json, os, subprocess, sys, time, urllib.error, urllib.request

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url, timeout):
    try:
        with OPENER.open(url, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:
        return type(e).__name__


def webhook(a):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            line = {"received": time.time(), "path": self.path,
                    "body": body.decode("utf-8", "replace")}
            with open(a.out, "a") as f:
                f.write(json.dumps(line) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


def recover(a):
    """Wait for /api to answer, do the action, poll every `poll` s until it answers 200
    again (after a failure first, with --need-fail)."""
    deadline = time.time() + a.timeout
    while a.precheck and get(a.url, a.req_timeout) != 200:
        if time.time() > deadline:
            print(json.dumps({"error": "not serving before the action"}))
            return 0
        time.sleep(a.poll)
    t0 = time.time()
    proc = subprocess.run(a.action, capture_output=True, text=True)
    t1 = time.time()
    first_fail = ok = None
    seen = {}
    attempts = 0
    while time.time() < deadline:
        start = time.time()
        status = get(a.url, a.req_timeout)
        attempts += 1
        seen[str(status)] = seen.get(str(status), 0) + 1
        if status == 200:
            if first_fail is not None or not a.need_fail:
                ok = time.time()
                break
        elif first_fail is None:
            first_fail = start
        time.sleep(a.poll)
    # Serving for good? Keep polling for `settle` s (longer while down): a restart that
    # follows the recovery (a second one by the watchdog) is an outage too.
    relapses, relapse_at, stable, down = 0, None, ok, False
    if ok is not None:
        while time.time() < deadline and (down or time.time() < ok + a.settle):
            start = time.time()
            status = get(a.url, a.req_timeout)
            if status == 200 and down:
                down, stable = False, time.time()
            elif status != 200 and not down:
                down, stable = True, None
                relapses += 1
                if relapse_at is None:
                    relapse_at = start
            time.sleep(a.poll)
    print(json.dumps({
        "t_action": t0,
        "action_s": round(t1 - t0, 3),
        "action_rc": proc.returncode,
        "action_err": proc.stderr.strip()[-500:],
        "first_fail_s": None if first_fail is None else round(first_fail - t0, 3),
        "recovery_s": None if ok is None else round(ok - t0, 3),
        "attempts": attempts,
        "seen": seen,
        "relapses": relapses,
        "relapse_s": None if relapse_at is None else round(relapse_at - t0, 3),
        "stable_s": None if stable is None else round(stable - t0, 3),
    }))
    return 0


def cpu(a):
    """CPU ticks of every process in this machine (own + reaped children's), by cgroup.
    A process that ended was reaped by its parent: its time is in the parent's
    cutime/cstime (systemd's, for a service's main process), so the sum over what is
    alive now counts everything the machine ever used, each tick once."""
    me = os.getpid()
    total = 0
    units = {}
    init_children = 0
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cgroup") as f:
                cg = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])
        kids = int(fields[13]) + int(fields[14])
        if d == "1":
            init_children = kids
        path = next((l[3:] for l in cg.splitlines() if l.startswith("0::")), "?")
        unit = path.rstrip("/").rsplit("/", 1)[-1] or "/"
        units[unit] = units.get(unit, 0) + own + kids
        total += own + kids
        n += 1
    print(json.dumps({"t": time.time(), "ticks_per_s": os.sysconf("SC_CLK_TCK"),
                      "total": total, "units": units, "init_children": init_children,
                      "processes": n}))
    return 0


p = argparse.ArgumentParser()
sub = p.add_subparsers(dest="cmd", required=True)
w = sub.add_parser("webhook")
w.add_argument("--port", type=int, required=True)
w.add_argument("--out", required=True)
r = sub.add_parser("recover")
r.add_argument("--url", required=True)
r.add_argument("--timeout", type=float, default=180)
r.add_argument("--poll", type=float, default=0.05)
r.add_argument("--req-timeout", type=float, default=0.5)
r.add_argument("--need-fail", action="store_true")
r.add_argument("--settle", type=float, default=10)
r.add_argument("--no-precheck", dest="precheck", action="store_false")
r.add_argument("action", nargs="+")
sub.add_parser("cpu")
a = p.parse_args()
sys.exit({"webhook": webhook, "recover": recover, "cpu": cpu}[a.cmd](a))
'''


def log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


# ----------------------------------------------------------------------------- in the machine


def health(m: Machine) -> dict[str, Any] | None:
    r = m.run(["curl", "-s", "--max-time", "2", HEALTH], check=False)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def backend_ok(m: Machine) -> bool:
    h = health(m)
    return h is not None and all(
        h["checks"][c]["state"] == "ok" and h["checks"][c]["breaker"] == "closed"
        for c in BACKEND_CHECKS
    )


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    log(f"timed out after {timeout:.0f} s waiting for {what}")
    return False


def wait_backend_ok(m: Machine, timeout: float = 180) -> bool:
    return wait_until(lambda: backend_ok(m), timeout, "the backend checks ok, breakers closed")


def journal(m: Machine, since: float, *matches: str) -> list[dict[str, Any]]:
    r = m.run(["journalctl", "-o", "json", "--no-pager", *matches], check=False, timeout=60)
    out = []
    for line in r.stdout.splitlines():
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        if int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= since:
            out.append(e)
    return out


def at(e: dict[str, Any], t0: float) -> float:
    return round(int(e["__REALTIME_TIMESTAMP"]) / 1e6 - t0, 3)


def message(e: dict[str, Any]) -> str:
    msg = e.get("MESSAGE", "")
    # journald gives a message with non-UTF-8 bytes as a list of byte values
    return bytes(msg).decode(errors="replace") if isinstance(msg, list) else str(msg)


def unit_log(m: Machine, unit: str, t0: float, limit: int = 40) -> list[list[Any]]:
    """What systemd and the unit said since t0: [seconds after t0, message]."""
    entries = journal(m, t0, "-u", unit)
    return [[at(e, t0), message(e)[:200]] for e in entries[:limit]]


def watchdog_actions(m: Machine, t0: float) -> list[dict[str, Any]]:
    return [
        {
            "at_s": at(e, t0),
            "action": e.get("AIPBX_ACTION"),
            "unit": e.get("AIPBX_UNIT"),
            "outcome": e.get("AIPBX_OUTCOME"),
            "message": message(e)[:200],
        }
        for e in journal(m, t0, "-u", WATCHDOG)
        if e.get("AIPBX_ACTION") not in (None, "start", "stop")
    ]


def recover(
    m: Machine, action: list[str], *, need_fail: bool, timeout: float, precheck: bool = True
) -> dict[str, Any]:
    """Do `action` (once /api answers, with `precheck`), then poll /api until it answers."""
    argv = ["python3", HELPER, "recover", "--url", API, "--timeout", str(timeout)]
    if need_fail:
        argv.append("--need-fail")
    if not precheck:
        argv.append("--no-precheck")
    r = m.run([*argv, "--", *action], timeout=timeout + 60)
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def restart_watchdog(m: Machine) -> None:
    """A fresh watchdog (breakers, backoff and restart budget) for the next phase: the
    budget (5 restarts per 10 min) would otherwise run out across the phases."""
    m.run(["systemctl", "restart", WATCHDOG])
    wait_backend_ok(m)


def live_unit(m: Machine) -> str:
    return f"aipbx-backend@{bluegreen.live_color(m) or 'blue'}.service"


def unstick(m: Machine, unit: str) -> None:
    """After a run that did not recover: whatever state the unit is in, serve again."""
    m.run(["systemctl", "kill", "-s", "SIGCONT", unit], check=False)
    m.run(["systemctl", "reset-failed", unit], check=False)
    m.run(["systemctl", "restart", unit], check=False, timeout=120)
    wait_backend_ok(m)


# ----------------------------------------------------------------------------- setup


def setup(m: Machine, deb: Path, sample: Path) -> None:
    log("installing the .deb and running aipbxctl setup")
    bluegreen.prepare(m, deb, sample)
    m.path(HELPER).write_text(HELPER_CODE)
    m.run(["rm", "-f", ALERTS])
    m.run(
        [
            "systemd-run",
            "--unit",
            WEBHOOK_UNIT,
            "--collect",
            "python3",
            HELPER,
            "webhook",
            "--port",
            str(WEBHOOK_PORT),
            "--out",
            ALERTS,
        ]
    )
    url = f"http://127.0.0.1:{WEBHOOK_PORT}/alerts"
    wait_until(
        lambda: m.run(["curl", "-s", "-o", "/dev/null", url], check=False).returncode == 0,
        30,
        "the webhook receiver",
    )
    conf = m.path(CONF)
    text = conf.read_text()
    for old, new in (
        ('# interval = "2s"', 'interval = "1s"'),
        ('# webhook_url = ""', f'webhook_url = "{url}"'),
    ):
        if old not in text:
            raise RuntimeError(f"{CONF} has no line {old!r} to edit")
        text = text.replace(old, new, 1)
    conf.write_text(text)
    m.run(["aipbxctl", "config", "check"])
    m.run(["systemctl", "restart", WATCHDOG])
    log("deploying the sample release v1")
    bluegreen.deploy_first(m)
    if not wait_backend_ok(m):
        raise RuntimeError(f"the watchdog does not see the backend healthy: {health(m)}")


# ----------------------------------------------------------------------------- phases


def app_start(m: Machine, runs: int) -> list[dict[str, Any]]:
    out = []
    for i in range(runs):
        unit = live_unit(m)
        r = recover(m, ["systemctl", "restart", unit], need_fail=False, timeout=120)
        time.sleep(1)
        if "t_action" in r:
            r["watchdog_actions"] = watchdog_actions(m, r["t_action"])
        if r.get("recovery_s") is not None:
            # `systemctl restart` returns once the old process stopped and the new one ran
            r["after_restart_returned_s"] = round(r["recovery_s"] - r["action_s"], 3)
        out.append(r)
        log(f"app start {i + 1}/{runs}: {r.get('recovery_s')} s")
        wait_backend_ok(m)
    return out


def hang(m: Machine, runs: int) -> list[dict[str, Any]]:
    restart_watchdog(m)
    out = []
    for i in range(runs):
        unit = live_unit(m)
        r = recover(m, ["systemctl", "kill", "-s", "SIGSTOP", unit], need_fail=True, timeout=240)
        time.sleep(1)
        actions: list[dict[str, Any]] = []
        if "t_action" in r:
            t0 = r["t_action"]
            actions = watchdog_actions(m, t0)
            restarts = [a for a in actions if a["action"] == "restart" and a["unit"] == unit]
            r["watchdog_actions"] = actions
            r["watchdog_restart_s"] = next(
                (a["at_s"] for a in restarts if a["outcome"] is None), None
            )
            r["watchdog_restarted_s"] = next(
                (a["at_s"] for a in restarts if a["outcome"] == "ok"), None
            )
            r["unit_log"] = unit_log(m, unit, t0)
        out.append(r)
        restarts = sum(a["action"] == "restart" and a["outcome"] is None for a in actions)
        log(
            f"hang {i + 1}/{runs}: serving again after {r.get('recovery_s')} s, for good "
            f"after {r.get('stable_s')} s (the watchdog restarted it {restarts}×, first at "
            f"{r.get('watchdog_restart_s')} s, done at {r.get('watchdog_restarted_s')} s)"
        )
        if r.get("recovery_s") is None:
            unstick(m, unit)
        if not wait_backend_ok(m):
            unstick(m, unit)
    return out


def crash(m: Machine, runs: int) -> list[dict[str, Any]]:
    restart_watchdog(m)
    out = []
    for i in range(runs):
        unit = live_unit(m)
        action = ["systemctl", "kill", "-s", "SIGKILL", "--kill-whom=main", unit]
        r = recover(m, action, need_fail=True, timeout=120)
        time.sleep(1)
        if "t_action" in r:
            r["watchdog_actions"] = watchdog_actions(m, r["t_action"])
            r["unit_log"] = unit_log(m, unit, r["t_action"])
        out.append(r)
        restarts = sum(
            a["action"] == "restart" and a["outcome"] is None for a in r.get("watchdog_actions", [])
        )
        log(
            f"crash {i + 1}/{runs}: serving again after {r.get('recovery_s')} s, for good "
            f"after {r.get('stable_s')} s (the watchdog restarted it {restarts}× on top)"
        )
        if r.get("recovery_s") is None:
            unstick(m, unit)
        wait_backend_ok(m)
    return out


def cgroup_host_dir(m: Machine, rel: str) -> Path | None:
    """The host directory of one of the machine's cgroups (rel: as seen inside)."""
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            mount = left.split()[4]
            break
    root = None
    for line in Path(f"/proc/{m.pid1}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            root = os.path.dirname(line[3:])  # the init's own cgroup is <root>/init.scope
    if mount is None or root is None:
        return None
    return Path(mount + root.rstrip("/")) / rel


def foreign_processes(m: Machine, rels: list[str]) -> dict[str, Any]:
    """Processes of other PID namespaces (other machines) in the host directories of these
    cgroups. On a host without systemd, machines booted side by side share them."""
    mine = os.readlink(f"/proc/{m.pid1}/ns/pid")
    seen, foreign = 0, 0
    dirs = []
    for rel in rels:
        top = cgroup_host_dir(m, rel)
        if top is None or not top.is_dir():
            continue
        dirs.append(str(top))
        for d, _, _ in os.walk(top):
            try:
                pids = (Path(d) / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    ns = os.readlink(f"/proc/{pid}/ns/pid")
                except OSError:
                    continue
                seen += 1
                foreign += ns != mine
    return {"host_dirs": dirs, "processes": seen, "foreign": foreign}


def usage_ns(m: Machine, unit: str) -> int | None:
    r = m.run(["systemctl", "show", "-p", "CPUUsageNSec", "--value", unit], check=False)
    value = r.stdout.strip()
    return int(value) if value.isdigit() else None


def snapshot(m: Machine) -> dict[str, Any]:
    proc: dict[str, Any] = json.loads(m.run(["python3", HELPER, "cpu"]).stdout)
    cg = {u: usage_ns(m, u) for u in (BACKEND_SLICE, WATCHDOG)}
    rels = ["system.slice/" + BACKEND_SLICE, "system.slice/" + WATCHDOG]
    return {"proc": proc, "cgroup_ns": cg, "shared": foreign_processes(m, rels)}


def aipbx_ticks(proc: dict[str, Any]) -> int:
    """The backend instances' and the watchdog's processes alive now, plus all that systemd
    reaped (the crashed backends' main processes)."""
    units = proc["units"]
    ours = sum(
        v
        for u, v in units.items()
        if u.startswith("aipbx-backend@") or u == "aipbx-watchdog.service"
    )
    return int(ours) + int(proc["init_children"])


def cpu_between(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    pa, pb = a["proc"], b["proc"]
    wall = pb["t"] - pa["t"]
    ticks = pb["ticks_per_s"]
    machine = 100.0 * (pb["total"] - pa["total"]) / ticks / wall
    ours = 100.0 * (aipbx_ticks(pb) - aipbx_ticks(pa)) / ticks / wall
    cg: float | None = None
    if all(a["cgroup_ns"][u] is not None and b["cgroup_ns"][u] is not None for u in a["cgroup_ns"]):
        used = sum(b["cgroup_ns"][u] - a["cgroup_ns"][u] for u in a["cgroup_ns"])
        cg = 100.0 * used / 1e9 / wall
    by_unit = Counter(pb["units"])
    by_unit.subtract(Counter(pa["units"]))
    top = {u: round(100.0 * v / ticks / wall, 3) for u, v in by_unit.most_common(8) if v > 0}
    return {
        "wall_s": round(wall, 1),
        "proc_machine_pct": round(machine, 3),
        "proc_aipbx_pct": round(ours, 3),
        "cgroup_aipbx_pct": None if cg is None else round(cg, 3),
        "init_reaped_pct": round(
            100.0 * (pb["init_children"] - pa["init_children"]) / ticks / wall, 3
        ),
        "top_live_units_pct": top,
    }


def read_alerts(m: Machine) -> list[dict[str, Any]]:
    p = m.path(ALERTS)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        rec = json.loads(line)
        try:
            body = json.loads(rec["body"])
        except ValueError:
            body = {"raw": rec["body"]}
        out.append({"received": rec["received"], **body})
    return out


def write_backend_env(m: Machine, text: str | None) -> None:
    """/etc/aipbx/backend.env as 0640 root:_aipbx (None: remove it)."""
    if text is None:
        m.run(["rm", "-f", BACKEND_ENV])
        return
    m.path("/root/backend.env.new").write_text(text)
    m.run(
        [
            "install",
            "-m",
            "0640",
            "-o",
            "root",
            "-g",
            "_aipbx",
            "/root/backend.env.new",
            BACKEND_ENV,
        ]
    )
    m.run(["rm", "-f", "/root/backend.env.new"])


def crashloop(m: Machine, duration: float) -> dict[str, Any]:
    restart_watchdog(m)
    unit = live_unit(m)
    env_path = m.path(BACKEND_ENV)
    original = env_path.read_text() if env_path.exists() else None
    knob = (original or "") + ("" if not original or original.endswith("\n") else "\n")
    write_backend_env(m, knob + "SAMPLE_FAIL=start\n")
    first = snapshot(m)
    t0 = first["proc"]["t"]
    m.run(["systemctl", "restart", unit], check=False)
    series = [first]
    end = time.monotonic() + duration
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(10.0, left))
        series.append(snapshot(m))
        if len(series) % 6 == 0:
            done = series[-1]["proc"]["t"] - t0
            log(f"crash loop: {done:.0f}/{duration:.0f} s, {cpu_between(first, series[-1])}")
    last = series[-1]
    t1 = last["proc"]["t"]
    window = cpu_between(first, last)
    alerts = [a for a in read_alerts(m) if t0 <= a["received"] <= t1]
    critical = [a for a in alerts if a.get("severity") == "CRITICAL"]
    actions = watchdog_actions(m, t0)
    actions = [a for a in actions if a["at_s"] <= t1 - t0]
    ulog = journal(m, t0, "-u", unit)
    ulog = [e for e in ulog if int(e["__REALTIME_TIMESTAMP"]) / 1e6 <= t1]
    starts = sum("SAMPLE_FAIL=start: failing at start" in message(e) for e in ulog)
    limit_hits = sum("Start request repeated too quickly" in message(e) for e in ulog)
    # systemd's own lines about the unit (starts, restarts, results), not the app's
    systemd_log = [[at(e, t0), message(e)[:160]] for e in ulog if e.get("_PID") == "1"]
    state_end = m.run(
        ["systemctl", "show", "-p", "ActiveState,SubState,Result,NRestarts", unit]
    ).stdout.split()
    shared = [s["shared"] for s in series]
    foreign = max(s["foreign"] for s in shared)
    cg, pr = window["cgroup_aipbx_pct"], window["proc_aipbx_pct"]
    suspect_why = []
    if foreign:
        suspect_why.append(f"{foreign} processes of other machines in the same cgroup dirs")
    if cg is None:
        suspect_why.append("no CPUUsageNSec")
    elif cg > pr + max(0.5, 0.25 * pr):
        suspect_why.append(f"cgroup {cg:.2f} % is well above /proc's {pr:.2f} % for the same units")
    for u in first["cgroup_ns"]:
        values = [s["cgroup_ns"][u] for s in series if s["cgroup_ns"][u] is not None]
        if any(b < a for a, b in itertools.pairwise(values)):
            suspect_why.append(f"CPUUsageNSec of {u} went backwards (its cgroup was re-created)")
    # Back to a release that starts.
    write_backend_env(m, original)
    m.run(["systemctl", "reset-failed", unit], check=False)
    back = recover(m, ["systemctl", "restart", unit], need_fail=False, timeout=120, precheck=False)
    healthy = wait_backend_ok(m)
    series_pct = [
        {"t_s": round(s["proc"]["t"] - t0, 1), **cpu_between(first, s)} for s in series[1:]
    ]
    return {
        "duration_s": round(t1 - t0, 1),
        "unit": unit,
        **window,
        "cgroup_suspect": bool(suspect_why),
        "cgroup_suspect_why": suspect_why,
        "shared_cgroup_samples": shared,
        "critical_alerts": len(critical),
        "alerts": alerts,
        "app_starts": starts,
        "unit_state_end": state_end,
        "systemd_log": systemd_log,
        "start_limit_hits": limit_hits,
        "watchdog_actions": Counter(str(a["action"]) for a in actions),
        "watchdog_log": actions,
        "cumulative": series_pct,
        "serving_after_fix_s": back.get("recovery_s"),
        "watchdog_ok_after_fix": healthy,
    }


def proc_stat(m: Machine, pid: int) -> tuple[int, int]:
    fields = m.run(["cat", f"/proc/{pid}/stat"]).stdout.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def kib(text: str, key: str) -> int | None:
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found[1]) if found else None


def mib(kib_value: int | None) -> float | None:
    return None if kib_value is None else round(kib_value / 1024, 1)


def show(m: Machine, prop: str) -> str:
    return m.run(["systemctl", "show", "-p", prop, "--value", WATCHDOG]).stdout.strip()


def resources(m: Machine, window: float) -> dict[str, Any]:
    if not wait_backend_ok(m):
        log("the backend checks are not ok: measuring anyway")
    time.sleep(5)
    pid = int(show(m, "MainPID"))
    restarts0 = show(m, "NRestarts")
    h0 = health(m) or {}
    ticks = int(m.run(["getconf", "CLK_TCK"]).stdout)
    machine0 = snapshot(m)
    t0, (own0, kids0) = time.monotonic(), proc_stat(m, pid)
    time.sleep(window)
    t1, (own1, kids1) = time.monotonic(), proc_stat(m, pid)
    machine1 = snapshot(m)
    h1 = health(m) or {}
    status = m.run(["cat", f"/proc/{pid}/status"]).stdout
    rollup = m.run(["cat", f"/proc/{pid}/smaps_rollup"], check=False).stdout
    wall = t1 - t0
    own = 100.0 * (own1 - own0) / ticks / wall
    kids = 100.0 * (kids1 - kids0) / ticks / wall
    states = {c: v["state"] for c, v in h1.get("checks", {}).items()}
    return {
        "pid": pid,
        "same_process": int(show(m, "MainPID")) == pid and show(m, "NRestarts") == restarts0,
        "window_s": round(wall, 1),
        "rounds": h1.get("rounds", 0) - h0.get("rounds", 0),
        "checks": states,
        "every_check_on": all(states.get(c) not in (None, "idle") for c in BACKEND_CHECKS),
        "cpu_pct": round(own + kids, 3),
        "cpu_daemon_pct": round(own, 3),
        "cpu_children_pct": round(kids, 3),
        "rss_mb": mib(kib(status, "VmRSS")),
        "hwm_mb": mib(kib(status, "VmHWM")),
        "pss_mb": mib(kib(rollup, "Pss")),
        "machine_idle": cpu_between(machine0, machine1),
    }


# ----------------------------------------------------------------------------- report


def figure(values: list[float | None], how: Callable[[list[float]], float]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return round(how([v for v in values if v is not None]), 3)


def verdict(value: float | None, limit: float | None, exact: bool = False) -> str:
    if value is None:
        return "MISSED (no figure)"
    if limit is None:
        return ""
    ok = value == limit if exact else value <= limit
    return "met" if ok else "MISSED"


def restarts_of(run: dict[str, Any]) -> int:
    """Restarts the watchdog began during a run."""
    return sum(
        a["action"] == "restart" and a["outcome"] is None for a in run.get("watchdog_actions", [])
    )


def report(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    interval = float(raw.get("interval_s") or 1.0)
    starts = [r.get("recovery_s") for r in raw["app_start"]]
    hangs = [r.get("recovery_s") for r in raw["hang"]]
    crashes = [r.get("recovery_s") for r in raw["crash"]]
    hangs_stable = [r.get("stable_s") for r in raw["hang"]]
    crashes_stable = [r.get("stable_s") for r in raw["crash"]]
    app = figure(starts, statistics.median)
    loop, res = raw["crashloop"], raw["resources"]
    loop_pct = loop["proc_machine_pct"] if loop["cgroup_suspect"] else loop["cgroup_aipbx_pct"]
    doc: dict[str, Any] = {
        "check_interval_s": interval,
        "app_start_s": app,
        "app_start_after_stop_s": figure(
            [r.get("after_restart_returned_s") for r in raw["app_start"]], statistics.median
        ),
        "hang_recovery_s": figure(hangs, max),
        "hang_recovery_median_s": figure(hangs, statistics.median),
        "hang_stable_s": figure(hangs_stable, max),
        "hang_relapses": sum(int(r.get("relapses", 0)) for r in raw["hang"]),
        "hang_watchdog_restarts": [restarts_of(r) for r in raw["hang"]],
        "crash_recovery_s": figure(crashes, statistics.median),
        "crash_recovery_worst_s": figure(crashes, max),
        "crash_stable_s": figure(crashes_stable, statistics.median),
        "crash_relapses": sum(int(r.get("relapses", 0)) for r in raw["crash"]),
        "crash_watchdog_restarts": [restarts_of(r) for r in raw["crash"]],
        "crashloop_cpu_pct": loop_pct,
        "crashloop_cpu_source": (
            "/proc, whole machine (the cgroup figure is suspect)"
            if loop["cgroup_suspect"]
            else "cgroup: system-aipbx\\x2dbackend.slice + aipbx-watchdog.service"
        ),
        "crashloop_alerts": loop["critical_alerts"],
        "crashloop_alert_checks": [f"{a.get('severity')} {a.get('check')}" for a in loop["alerts"]],
        "crashloop_app_starts": loop["app_starts"],
        "crashloop_start_limit_hits": loop["start_limit_hits"],
        "crashloop_watchdog_restarts": restarts_of({"watchdog_actions": loop["watchdog_log"]}),
        "crashloop_watchdog_give_ups": loop["watchdog_actions"].get("give_up", 0),
        "rss_mb": res["rss_mb"],
        "cpu_pct": res["cpu_pct"],
    }
    targets: dict[str, float | None] = {
        "hang_recovery_s": None if app is None else round(3 * interval + app, 3),
        "hang_stable_s": None if app is None else round(3 * interval + app, 3),
        "crash_recovery_s": None if app is None else round(1.0 + app, 3),
        "crashloop_cpu_pct": 5.0,
        "crashloop_alerts": 1,
        "rss_mb": 30.0,
        "cpu_pct": 0.5,
    }
    doc["targets"] = targets
    doc["verdicts"] = {
        k: verdict(doc[k], t, exact=k == "crashloop_alerts") for k, t in targets.items()
    }
    doc["verdicts"]["hang_recovery_s (seed 000: 30 s)"] = verdict(
        doc["hang_recovery_s"], SEED_HANG_PROMISE_S
    )
    doc["raw"] = raw
    out.mkdir(parents=True, exist_ok=True)
    (out / "watchdog.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "—"
    return f"{v:g}{unit}" if isinstance(v, float | int) else str(v)


def table(doc: dict[str, Any]) -> str:
    t, v = doc["targets"], doc["verdicts"]
    loop, res = doc["raw"]["crashloop"], doc["raw"]["resources"]
    rows = [
        ("check_interval_s", fmt(doc["check_interval_s"], " s"), "", ""),
        (
            "app_start_s (median)",
            f"{fmt(doc['app_start_s'], ' s')} (once the restart job returned: "
            f"{fmt(doc['app_start_after_stop_s'], ' s')})",
            "",
            "",
        ),
        (
            "hang_recovery_s (worst)",
            f"{fmt(doc['hang_recovery_s'], ' s')} (median {fmt(doc['hang_recovery_median_s'])})",
            f"≤ {fmt(t['hang_recovery_s'], ' s')} (3 intervals + start)",
            v["hang_recovery_s"],
        ),
        (
            "",
            "",
            f"≤ {SEED_HANG_PROMISE_S:g} s (seed 000)",
            v["hang_recovery_s (seed 000: 30 s)"],
        ),
        (
            "  serving for good (worst)",
            f"{fmt(doc['hang_stable_s'], ' s')} ({doc['hang_relapses']} relapses, "
            f"watchdog restarts {doc['hang_watchdog_restarts']})",
            f"≤ {fmt(t['hang_stable_s'], ' s')}",
            v["hang_stable_s"],
        ),
        (
            "crash_recovery_s (median)",
            f"{fmt(doc['crash_recovery_s'], ' s')} (worst {fmt(doc['crash_recovery_worst_s'])})",
            f"≤ {fmt(t['crash_recovery_s'], ' s')} (1 s + start)",
            v["crash_recovery_s"],
        ),
        (
            "  serving for good (median)",
            f"{fmt(doc['crash_stable_s'], ' s')} ({doc['crash_relapses']} relapses, "
            f"watchdog restarts {doc['crash_watchdog_restarts']})",
            "",
            "",
        ),
        (
            "crashloop_cpu_pct",
            f"{fmt(doc['crashloop_cpu_pct'], ' %')} over {fmt(loop['duration_s'], ' s')}",
            "≤ 5 %",
            v["crashloop_cpu_pct"],
        ),
        (
            "  cgroup / proc aipbx / proc machine",
            f"{fmt(loop['cgroup_aipbx_pct'])} / {fmt(loop['proc_aipbx_pct'])} / "
            f"{fmt(loop['proc_machine_pct'])} %",
            "",
            "cgroup suspect" if loop["cgroup_suspect"] else "",
        ),
        (
            "  machine idle (healthy, same /proc sum)",
            f"{fmt(res['machine_idle']['proc_machine_pct'], ' %')}",
            "",
            "",
        ),
        (
            "  app starts / start limits / wd restarts / give-ups",
            f"{doc['crashloop_app_starts']} / {doc['crashloop_start_limit_hits']} / "
            f"{doc['crashloop_watchdog_restarts']} / {doc['crashloop_watchdog_give_ups']}",
            "",
            "",
        ),
        ("crashloop_alerts (CRITICAL)", fmt(doc["crashloop_alerts"]), "= 1", v["crashloop_alerts"]),
        ("  all alerts in the window", ", ".join(doc["crashloop_alert_checks"]) or "—", "", ""),
        ("rss_mb (watchdog VmRSS)", fmt(doc["rss_mb"], " MiB"), "≤ 30 MiB", v["rss_mb"]),
        (
            "cpu_pct (watchdog, 1 s interval)",
            f"{fmt(doc['cpu_pct'], ' %')} ({res['rounds']} rounds)",
            "≤ 0.5 %",
            v["cpu_pct"],
        ),
    ]
    # rows without a target (details) do not widen the columns
    widths = [max(len(r[i]) for r in rows if r[2] or i == 0) for i in range(3)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
        if r[2]
        else f"{r[0]:<{widths[0]}}  {r[1]}  {r[3]}".rstrip()
        for r in rows
    )


def built(deb: Path) -> dict[str, Any]:
    """What was measured: the .deb and the tree it was built from."""
    head = subprocess.run(
        ["git", "-C", str(TOP), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "deb": deb.name,
        "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
        "deb_mtime": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(deb.stat().st_mtime)),
        "git_head": head,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3, help="runs of each restart scenario")
    p.add_argument(
        "--crashloop-duration", type=float, default=300, help="seconds of the crash loop"
    )
    p.add_argument("--resource-window", type=float, default=60, help="seconds of the CPU figure")
    p.add_argument("--out", type=Path, default=TOP / "build" / "bench")
    args = p.parse_args(argv)
    problem = harness_problem()
    if problem:
        print(f"bench: cannot boot a machine: {problem}", file=sys.stderr)
        return 1
    deb = Path(os.environ["AIPBX_DEB"])
    sample = Path(os.environ.get("AIPBX_SAMPLE_DIR", TOP / "build" / "sample"))
    raw: dict[str, Any] = {"params": vars(args) | {"out": str(args.out)}, "measured": built(deb)}
    with Machine(ensure_rootfs(TOP / "build" / "cache")) as m:
        setup(m, deb, sample)
        raw["interval_s"] = (health(m) or {}).get("interval_s")
        log(f"app start: {args.runs} restarts of the live color")
        raw["app_start"] = app_start(m, args.runs)
        log(f"hang: {args.runs} SIGSTOPs of the live color")
        raw["hang"] = hang(m, args.runs)
        log(f"crash: {args.runs} SIGKILLs of the live color's main process")
        raw["crash"] = crash(m, args.runs)
        log(f"crash loop: SAMPLE_FAIL=start for {args.crashloop_duration:.0f} s")
        raw["crashloop"] = crashloop(m, args.crashloop_duration)
        log(f"watchdog resources over {args.resource_window:.0f} s")
        raw["resources"] = resources(m, args.resource_window)
        raw["all_alerts"] = read_alerts(m)
    doc = report(raw, args.out)
    print(table(doc))
    print(f"bench: wrote {args.out / 'watchdog.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
