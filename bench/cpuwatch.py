#!/usr/bin/python3
"""What an upgrade costs in CPU on the live host (issue 11, item 14): run inside the booted
machine with Debian's python3 (stdlib only), and imported by the orchestrator for the pure
parts.

    python3 cpuwatch.py run --out F [--unit U]... [--interval S] -- aipbxctl upgrade ...
    python3 cpuwatch.py snapshot

`run` runs the command as its child (stdin, stdout, stderr passed through; exits with its
code) and samples, every --interval seconds, the CPU time of the command's process tree
(/proc/<pid>/stat: its own user+system time and that of the children it has reaped: hashing,
unpacking, systemctl, conntrack, pg_dump...) and of the processes of each --unit (found by
/proc/<pid>/cgroup, e.g. the color the upgrade starts). At the end the tree's total comes
from getrusage(RUSAGE_CHILDREN), exact to the microsecond. Times are epoch seconds, like
aipbxctl's steps, so the two line up.

`snapshot` prints the CPU the machine has used so far (every process of its PID namespace,
own + reaped children's, so a process that ended still counts through its parent; bench/
watchdog.py counts the same way: cgroups are shared between machines on a host without
systemd) and the host's busy and total CPU from /proc/stat (all of the host, other machines
included: how busy the box was)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "aipbx-bench-cpu/1"


# -- pure parsing


def stat_ticks(text: str) -> tuple[int, int]:
    """(own user+system, reaped children's user+system) clock ticks from /proc/<pid>/stat."""
    fields = text.rsplit(")", 1)[1].split()
    # after the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def unit_of(cgroup: str) -> str:
    """The unit (last path element) of a process from /proc/<pid>/cgroup: the unified
    hierarchy's line (0::), else systemd's named one."""
    lines = cgroup.splitlines()
    path = next((ln[3:] for ln in lines if ln.startswith("0::")), "")
    if path in ("", "/"):
        path = next((ln.split(":", 2)[2] for ln in lines if ":name=systemd:" in ln), path)
    return path.rstrip("/").rsplit("/", 1)[-1] or "/"


def host_ticks(proc_stat: str) -> tuple[int, int]:
    """(busy, total) ticks of all CPUs from /proc/stat's first line (idle and iowait are
    not busy; guest time is already in user)."""
    first = proc_stat.splitlines()[0].split()
    values = [int(x) for x in first[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# -- reading /proc


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def units_ticks(units: Sequence[str], skip: int) -> dict[str, int]:
    """Ticks (own + reaped children's) of the live processes of each unit."""
    out = dict.fromkeys(units, 0)
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == skip:
            continue
        cg = _read(f"/proc/{d}/cgroup")
        if cg is None:
            continue
        unit = unit_of(cg)
        if unit in out:
            st = _read(f"/proc/{d}/stat")
            if st is not None:
                out[unit] += sum(stat_ticks(st))
    return out


def snapshot() -> dict[str, Any]:
    me = os.getpid()
    total = 0
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            st = _read(f"/proc/{d}/stat")
            if st is not None:
                total += sum(stat_ticks(st))
    busy, all_ticks = host_ticks(_read("/proc/stat") or "cpu 0 0 0 0 0 0 0 0")
    return {
        "at": time.time(),
        "ticks_per_s": os.sysconf("SC_CLK_TCK"),
        "cpus": os.cpu_count(),
        "machine_ticks": total,
        "host_busy_ticks": busy,
        "host_total_ticks": all_ticks,
    }


def run(argv: Sequence[str], out: Path, units: Sequence[str], interval: float) -> int:
    tck = os.sysconf("SC_CLK_TCK")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    child = subprocess.Popen(list(argv))
    samples: list[dict[str, Any]] = []
    while child.poll() is None:
        st = _read(f"/proc/{child.pid}/stat")
        if st is not None:
            sample: dict[str, Any] = {"at": round(time.time(), 3)}
            sample["tree_s"] = round(sum(stat_ticks(st)) / tck, 3)
            if units:
                by_unit = units_ticks(units, os.getpid())
                sample["units_s"] = {u: round(v / tck, 3) for u, v in by_unit.items()}
            samples.append(sample)
        time.sleep(interval)
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = {
        "schema": SCHEMA,
        "argv": list(argv),
        "exit_code": child.returncode,
        "started_at": round(started, 3),
        "ended_at": round(ended, 3),
        "cpu_user_s": round(after.ru_utime - before.ru_utime, 3),
        "cpu_system_s": round(after.ru_stime - before.ru_stime, 3),
        "interval_s": interval,
        "units": list(units),
        "samples": samples,
    }
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, out)
    return int(child.returncode)


# -- pure analysis (on the orchestrator's side)


def _at(points: Sequence[tuple[float, float]], t: float) -> float:
    """A cumulative counter at time t, linear between the points around it (the first
    value before them, the last after)."""
    if not points:
        return 0.0
    if t <= points[0][0]:
        return points[0][1]
    for (a, va), (b, vb) in itertools.pairwise(points):
        if a <= t <= b:
            return va if b == a else va + (vb - va) * (t - a) / (b - a)
    return points[-1][1]


def marks(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """(step, at) for the first occurrence of each of aipbxctl's steps, in time order."""
    seen: dict[str, float] = {}
    for s in steps:
        seen.setdefault(str(s["step"]), float(s["at"]))
    return sorted(seen.items(), key=lambda kv: kv[1])


def upgrade_cost(
    doc: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], unit: str | None
) -> dict[str, Any]:
    """Pure: CPU seconds of the aipbxctl tree in total, by phase (between its steps), and
    what `unit` (the color it started) used until the switch, from a `run` report and the
    command's JSON steps."""
    started, ended = float(doc["started_at"]), float(doc["ended_at"])
    total = float(doc["cpu_user_s"]) + float(doc["cpu_system_s"])
    tree = [(started, 0.0)] + [(float(s["at"]), float(s["tree_s"])) for s in doc["samples"]]
    tree.append((ended, max(total, tree[-1][1])))
    unit_pts = [
        (float(s["at"]), float(s.get("units_s", {}).get(unit, 0.0)))
        for s in doc["samples"]
        if unit is not None
    ]
    points = [("start", started), *marks(steps), ("exit", ended)]
    phases = []
    for (a, ta), (b, tb) in itertools.pairwise(points):
        phases.append(
            {
                "from": a,
                "to": b,
                "wall_s": round(tb - ta, 3),
                "cpu_s": round(_at(tree, tb) - _at(tree, ta), 3),
            }
        )
    switch_at = next((t for name, t in points if name == "switch"), None)
    # after probation the old color drains: what polling it costs, per second of drain
    probation_at = next((t for name, t in points if name == "probation"), None)
    drain_cpu = None if probation_at is None else _at(tree, ended) - _at(tree, probation_at)
    drain_wall = None if probation_at is None else ended - probation_at
    tree_switch = None if switch_at is None else round(_at(tree, switch_at), 3)
    unit_switch = None
    if unit is not None and switch_at is not None:
        unit_switch = round(_at(unit_pts, switch_at) - _at(unit_pts, started), 3)
    return {
        "aipbxctl_cpu_s": round(total, 3),
        "aipbxctl_user_s": float(doc["cpu_user_s"]),
        "aipbxctl_system_s": float(doc["cpu_system_s"]),
        "aipbxctl_wall_s": round(ended - started, 3),
        "aipbxctl_cpu_until_switch_s": tree_switch,
        "new_color_unit": unit,
        "new_color_cpu_until_switch_s": unit_switch,
        "until_switch_cpu_s": None
        if tree_switch is None
        else round(tree_switch + (unit_switch or 0.0), 3),
        "drain_cpu_s": None if drain_cpu is None else round(drain_cpu, 3),
        "drain_wall_s": None if drain_wall is None else round(drain_wall, 3),
        "drain_cpu_per_s": round(drain_cpu / drain_wall, 4)
        if drain_cpu is not None and drain_wall
        else None,
        "phases": phases,
    }


def window(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the CPU used between two snapshots: the machine's, the host's, and the
    capacity (CPUs x seconds)."""
    tck = float(b["ticks_per_s"])
    wall = float(b["at"]) - float(a["at"])
    host_total = (int(b["host_total_ticks"]) - int(a["host_total_ticks"])) / tck
    host_busy = (int(b["host_busy_ticks"]) - int(a["host_busy_ticks"])) / tck
    return {
        "wall_s": round(wall, 2),
        "cpus": b["cpus"],
        "capacity_cpu_s": round(wall * int(b["cpus"]), 2),
        "machine_cpu_s": round((int(b["machine_ticks"]) - int(a["machine_ticks"])) / tck, 2),
        "host_busy_cpu_s": round(host_busy, 2),
        "host_busy_pct": round(100 * host_busy / host_total, 1) if host_total > 0 else None,
    }


def share_of_run(cost: Mapping[str, Any], win: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the upgrade's CPU (aipbxctl's tree + the new color until the switch, and the
    tree alone through the drain) as a share of the run's capacity and of the CPU the
    machine used in it. aipbxctl runs outside the machine's own accounting (entered with
    nsenter), so it is added to the machine's CPU for the second share."""
    tree = float(cost["aipbxctl_cpu_s"])
    upgrade = tree + float(cost.get("new_color_cpu_until_switch_s") or 0.0)
    capacity = float(win["capacity_cpu_s"])
    used = float(win["machine_cpu_s"]) + tree
    return {
        "upgrade_cpu_s": round(upgrade, 3),
        "share_of_capacity_pct": round(100 * upgrade / capacity, 2) if capacity else None,
        "share_of_machine_cpu_pct": round(100 * upgrade / used, 2) if used else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--unit", action="append", default=[])
    r.add_argument("--interval", type=float, default=0.5)
    r.add_argument("argv", nargs="+")
    sub.add_parser("snapshot")
    a = p.parse_args(argv)
    if a.cmd == "snapshot":
        print(json.dumps(snapshot()))
        return 0
    return run(a.argv, a.out, a.unit, a.interval)


if __name__ == "__main__":
    sys.exit(main())
