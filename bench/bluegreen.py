"""The blue/green benchmark (issue 3): in a booted Debian 12 with the appliance installed,
upgrade v1 -> v2 and roll back under load, then do what the seed's `up --force-recreate`
does (an in-place restart of the one live unit) under the same load, and compare.

Load (bench/load.py, run inside the machine): HTTP writes through nginx, WebSocket pings,
UDP flows to port 3032. All times are epoch seconds (time.time()) in both the machine and
here: they share the host's clock."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import analyze
from tests.system.machine import Machine

HERE = Path(__file__).resolve().parent
DB = "aipbx_production"


def prepare(m: Machine, deb: Path, sample_dir: Path) -> None:
    for f in sample_dir.glob("aipbx-sample-*.tar.gz*"):
        shutil.copy(f, m.path("/root") / f.name)
    shutil.copy(HERE / "load.py", m.path("/root") / "load.py")
    shutil.copy(deb, m.path("/root") / deb.name)
    m.run(
        ["apt-get", "install", "-y", f"/root/{deb.name}"],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=600,
    )
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


def start_load(m: Machine, name: str, duration: float, http_rps: float) -> str:
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
            "5",
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


def run_bluegreen(m: Machine, duration: float, http_rps: float) -> dict[str, Any]:
    """v1 live; under load: upgrade to v2, later an instant rollback to v1 (while v1 still
    drains, as an operator would on a bad release)."""
    t0 = time.time()
    doc_path = start_load(m, "bluegreen", duration, http_rps)
    time.sleep(min(10.0, duration * 0.15))
    results: dict[str, dict[str, Any]] = {}

    def run(key: str, *args: str) -> None:
        results[key] = aipbxctl(m, *args)

    up = threading.Thread(
        target=run,
        args=(
            "upgrade",
            "upgrade",
            "/root/aipbx-sample-2.0.0.tar.gz",
            "--probation",
            "5",
            "--drain",
            str(int(duration * 3)),
        ),
    )
    up.start()
    deadline = time.monotonic() + 120
    while live_color(m) != "green" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(max(0.0, t0 + duration * 0.6 - time.time()))
    run("rollback", "rollback", "--drain", "30")
    doc = wait_file(m, doc_path, duration + 120)
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


def run_naive(m: Machine, duration: float, http_rps: float) -> dict[str, Any]:
    """What `docker compose up --force-recreate` does to the one live backend: restart it in
    place, under the same load."""
    # wait for the rollback's drain to stop green, so only blue runs
    deadline = time.monotonic() + 120
    while (
        m.run(["systemctl", "is-active", "aipbx-backend@green.service"], check=False).stdout.strip()
        == "active"
        and time.monotonic() < deadline
    ):
        time.sleep(1)
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


def report(
    out_dir: Path, bg: dict[str, Any], naive: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """Write <out_dir>/upgrade.json and the timeline PNGs; return the report."""
    from bench import timeline

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**bg["figures"], "naive_restart": naive["figures"], "load": params}
    (out_dir / "upgrade.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out_dir / "load-bluegreen.json").write_text(json.dumps(bg["doc"]))
    (out_dir / "load-naive.json").write_text(json.dumps(naive["doc"]))
    timeline.render_timeline(
        bg["doc"],
        bg["events"],
        out_dir / "upgrade-timeline.png",
        title="blue/green upgrade and rollback under load",
    )
    timeline.render_timeline(
        naive["doc"],
        naive["events"],
        out_dir / "naive-timeline.png",
        title="naive in-place restart under load",
    )
    return doc
