"""The blue/green benchmark (issue 3): in a booted Debian 12 with the appliance installed,
upgrade v1 -> v2 and roll back under load, then do what the seed's `up --force-recreate`
does (an in-place restart of the one live unit) under the same load, and compare.

Load (bench/load.py, run inside the machine): HTTP writes through nginx, WebSocket pings,
UDP flows to port 3032. All times are epoch seconds (time.time()) in both the machine and
here: they share the host's clock.

The load is sized to the machine (bench/sizing.py): `size` steps the same mix (no switch)
to find the sustainable rate, and each run offers a share of it; `run_baseline` is the same
load for the same time with no upgrade, so the switch's own cost is the difference. The
upgrade runs under bench/cpuwatch.py, which measures its CPU."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import analyze, cpuwatch, sizing
from tests.system.appliance import install
from tests.system.machine import Machine

HERE = Path(__file__).resolve().parent
DB = "aipbx_production"


def prepare(m: Machine, deb: Path, sample_dir: Path) -> None:
    for f in sample_dir.glob("aipbx-sample-*.tar.gz*"):
        shutil.copy(f, m.path("/root") / f.name)
    shutil.copy(HERE / "load.py", m.path("/root") / "load.py")
    shutil.copy(HERE / "cpuwatch.py", m.path("/root") / "cpuwatch.py")
    # without Recommends (ffmpeg): the machine's network is private, its apt cache has
    # only what the package depends on
    install(m, deb)
    m.run(["aipbxctl", "setup"], timeout=300)


def aipbxctl(m: Machine, *args: str, timeout: float = 900) -> dict[str, Any]:
    r = m.run(["aipbxctl", *args, "--yes", "--json"], check=False, timeout=timeout)
    try:
        out: dict[str, Any] = json.loads(r.stdout)
    except json.JSONDecodeError:
        out = {"ok": False, "error": r.stderr.strip()}
    out["exit_code"] = r.returncode
    return out


def step_at(out: dict[str, Any], step: str) -> float | None:
    return next((float(s["at"]) for s in out.get("steps", []) if s["step"] == step), None)


def aipbxctl_watched(
    m: Machine, unit: str, *args: str, timeout: float = 900
) -> tuple[dict[str, Any], dict[str, Any]]:
    """aipbxctl under bench/cpuwatch.py: (its JSON output, the CPU report), `unit` (the
    color it starts) sampled beside it."""
    cpu_out = "/root/cpu-aipbxctl.json"
    m.run(["rm", "-f", cpu_out])
    argv = ["python3", "/root/cpuwatch.py", "run", "--out", cpu_out, "--unit", unit, "--"]
    r = m.run([*argv, "aipbxctl", *args, "--yes", "--json"], check=False, timeout=timeout)
    try:
        out: dict[str, Any] = json.loads(r.stdout)
    except json.JSONDecodeError:
        out = {"ok": False, "error": r.stderr.strip()}
    out["exit_code"] = r.returncode
    p = m.path(cpu_out)
    cpu: dict[str, Any] = json.loads(p.read_text()) if p.exists() else {}
    return out, cpu


def cpu_snapshot(m: Machine) -> dict[str, Any]:
    snap: dict[str, Any] = json.loads(m.run(["python3", "/root/cpuwatch.py", "snapshot"]).stdout)
    return snap


def start_load(
    m: Machine,
    name: str,
    duration: float,
    http_rps: float,
    *,
    new_flow_every: float = 5,
    warmup_s: float = 0,
    http_timeout: float = 5,
) -> str:
    out = f"/root/{name}.json"
    m.run(["rm", "-f", out])
    m.run(
        [
            "systemd-run",
            "--unit",
            f"load-{name}",
            "--collect",
            "python3",
            "/root/load.py",
            "--base-url",
            "https://127.0.0.1",
            "--insecure",
            "--ws-url",
            "wss://127.0.0.1/ws/",
            "--udp-host",
            "127.0.0.1",
            "--udp-port",
            "3032",
            "--http-rps",
            str(http_rps),
            "--ws",
            "50",
            "--udp-flows",
            "20",
            "--udp-pps",
            "50",
            "--udp-size",
            "172",
            "--new-udp-flow-every",
            str(new_flow_every),
            "--warmup-s",
            str(warmup_s),
            "--http-timeout",
            str(http_timeout),
            "--duration",
            str(duration),
            "--out",
            out,
        ]
    )
    return out


def wait_file(m: Machine, path: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = m.path(path)
        if p.exists() and p.stat().st_size > 0:
            time.sleep(0.5)
            doc: dict[str, Any] = json.loads(p.read_text())
            return doc
        time.sleep(1)
    raise TimeoutError(f"{path} did not appear in {timeout}s")


def db_ids(m: Machine) -> list[str]:
    out = m.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-XAt",
            "-d",
            DB,
            "-c",
            "SELECT id FROM writes",
        ],
        timeout=300,
    ).stdout
    return analyze.read_ids(out)


def live_color(m: Machine) -> str | None:
    color = json.loads(m.path("/var/lib/aipbx/state.json").read_text()).get("live_color")
    return str(color) if color else None


def wait_one_color(m: Machine, timeout: float = 120) -> None:
    """Until only the live color runs (an earlier run's drain has stopped the other)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = live_color(m) or "blue"
        other = "green" if live == "blue" else "blue"
        r = m.run(["systemctl", "is-active", f"aipbx-backend@{other}.service"], check=False)
        if r.stdout.strip() != "active":
            return
        time.sleep(1)


def size(
    m: Machine,
    bound: sizing.Bound = sizing.BOUND,
    plan: sizing.Plan = sizing.PLAN,
    log: Any = print,
) -> sizing.Sizing:
    """The sustainable write rate with the run's own mix (50 WebSockets, 20 UDP flows), no
    switch: a step per rate as bench/sizing.py decides."""
    wait_one_color(m)
    count = iter(range(1000))

    def step(rate: float) -> sizing.StepResult:
        seconds = plan.warmup_s + plan.step_s
        path = start_load(
            m,
            f"size-{next(count)}",
            seconds,
            rate,
            new_flow_every=0,
            warmup_s=plan.warmup_s,
            http_timeout=2,
        )
        result = sizing.step_from_load(wait_file(m, path, seconds + 60), rate, plan.step_s)
        if not sizing.held(result, bound):
            time.sleep(3)  # what the server still queues drains before the next step
        return result

    return sizing.search(step, bound, plan, log)


def run_baseline(m: Machine, duration: float, http_rps: float) -> dict[str, Any]:
    """The same load as run_bluegreen, for as long, with no upgrade: what the box does
    without a switch."""
    wait_one_color(m)
    doc_path = start_load(m, "baseline", duration, http_rps)
    doc = wait_file(m, doc_path, duration + 120)
    return {"figures": analyze.no_switch(doc, db_ids(m)), "doc": doc, "events": []}


def run_bluegreen(m: Machine, duration: float, http_rps: float) -> dict[str, Any]:
    """v1 live; under load: upgrade to v2, later an instant rollback to v1 (while v1 still
    drains, as an operator would on a bad release). The upgrade's CPU is measured."""
    wait_one_color(m)
    new_color = "green" if live_color(m) == "blue" else "blue"
    before = cpu_snapshot(m)
    t0 = time.time()
    doc_path = start_load(m, "bluegreen", duration, http_rps)
    time.sleep(min(10.0, duration * 0.15))
    results: dict[str, dict[str, Any]] = {}
    cpu: dict[str, Any] = {}

    def run_upgrade() -> None:
        results["upgrade"], doc = aipbxctl_watched(
            m,
            f"aipbx-backend@{new_color}.service",
            "upgrade",
            "/root/aipbx-sample-2.0.0.tar.gz",
            "--probation",
            "5",
            "--drain",
            str(int(duration * 3)),
        )
        cpu.update(doc)

    up = threading.Thread(target=run_upgrade)
    up.start()
    deadline = time.monotonic() + 120
    while live_color(m) != new_color and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(max(0.0, t0 + duration * 0.6 - time.time()))
    results["rollback"] = aipbxctl(m, "rollback", "--drain", "30")
    doc = wait_file(m, doc_path, duration + 120)
    after = cpu_snapshot(m)
    up.join(600)
    upgrade, rollback = results.get("upgrade", {}), results["rollback"]
    switch_at = step_at(upgrade, "switch")
    probation_at = step_at(upgrade, "probation")
    started_at = upgrade["steps"][0]["at"] if upgrade.get("steps") else None
    events = analyze.Events(
        switch_at=switch_at or time.time(),
        rollback_at=step_at(rollback, "switch"),
        switch_ms=upgrade.get("switch_ms"),
        rollback_ms=rollback.get("rollback_ms"),
        upgrade_s=round(probation_at - started_at, 2) if probation_at and started_at else None,
    )
    fig = asdict(analyze.analyze(doc, db_ids(m), events))
    fig["upgrade_exit_code"] = upgrade.get("exit_code")
    fig["rollback_instant"] = rollback.get("instant")
    fig["rollback_exit_code"] = rollback.get("exit_code")
    fig.update(
        upgrade_cpu(
            cpu, upgrade.get("steps", []), f"aipbx-backend@{new_color}.service", before, after
        )
    )
    return {
        "figures": fig,
        "doc": doc,
        "events": [
            {"at": events.switch_at, "label": "switch to v2"},
            *(
                [{"at": events.rollback_at, "label": "rollback to v1"}]
                if events.rollback_at
                else []
            ),
        ],
    }


def upgrade_cpu(
    cpu: dict[str, Any],
    steps: list[dict[str, Any]],
    unit: str,
    before: dict[str, Any],
    after: dict[str, Any],
) -> dict[str, Any]:
    """Pure: the figures' upgrade_cpu_* keys and the whole account under `upgrade_cpu`."""
    if not cpu.get("samples") and "cpu_user_s" not in cpu:
        return {"upgrade_cpu_s": None, "upgrade_cpu_pct": None, "upgrade_cpu": None}
    cost = cpuwatch.upgrade_cost(cpu, steps, unit)
    win = cpuwatch.window(before, after)
    share = cpuwatch.share_of_run(cost, win)
    return {
        "upgrade_cpu_s": share["upgrade_cpu_s"],
        "upgrade_cpu_pct": share["share_of_capacity_pct"],
        "upgrade_cpu": {**cost, "run": win, **share},
    }


def run_naive(m: Machine, duration: float, http_rps: float) -> dict[str, Any]:
    """What `docker compose up --force-recreate` does to the one live backend: restart it in
    place, under the same load."""
    wait_one_color(m)  # the rollback's drain has stopped the other color
    doc_path = start_load(m, "naive", duration, http_rps)
    time.sleep(min(10.0, duration * 0.25))
    color = live_color(m) or "blue"
    restart_at = time.time()
    m.run(["systemctl", "restart", f"aipbx-backend@{color}.service"])
    code = (
        "import sys,time,urllib.request as u\nt=time.time()\nwhile time.time()-t<120:\n"
        " try:\n  u.urlopen('http://127.0.0.1:5005/api',timeout=1);break\n"
        " except Exception: time.sleep(0.05)\n"
    )
    m.run(["python3", "-c", code], timeout=150)
    healthy_ms = (time.time() - restart_at) * 1000
    doc = wait_file(m, doc_path, duration + 120)
    events = analyze.Events(
        switch_at=restart_at, switch_ms=round(healthy_ms, 1), upgrade_s=round(healthy_ms / 1000, 2)
    )
    fig = asdict(
        analyze.analyze(doc, db_ids(m), events, old_version="1.0.0", new_version="1.0.0-restarted")
    )
    return {"figures": fig, "doc": doc, "events": [{"at": restart_at, "label": "in-place restart"}]}


def deploy_first(m: Machine) -> dict[str, Any]:
    out = aipbxctl(
        m, "upgrade", "/root/aipbx-sample-1.0.0.tar.gz", "--probation", "2", "--drain", "5"
    )
    if not out.get("ok"):
        raise RuntimeError(f"deploying v1 failed: {out}")
    return out
