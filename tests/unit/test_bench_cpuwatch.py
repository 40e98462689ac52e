"""bench/cpuwatch.py: parsing /proc, the upgrade's CPU by step and as a share of the run, and
`run` passing its command through."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import cpuwatch as cw

# /proc/<pid>/stat with a command name that has ") " in it: fields after the last ")"
STAT = "4242 (aipbx) (ctl) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 30 12 8 20 0 1 0 9 0 0"


def test_stat_ticks_reads_own_and_reaped_children() -> None:
    assert cw.stat_ticks(STAT) == (180, 20)


def test_unit_of_a_process() -> None:
    unified = "0::/system.slice/system-aipbx\\x2dbackend.slice/aipbx-backend@green.service\n"
    assert cw.unit_of(unified) == "aipbx-backend@green.service"
    hybrid = (
        "1:name=systemd:/system.slice/system-aipbx\\x2dbackend.slice/aipbx-backend@blue.service\n"
        "0::/\n"
    )
    assert cw.unit_of(hybrid) == "aipbx-backend@blue.service"
    assert cw.unit_of("0::/\n") == "/"


def test_host_ticks() -> None:
    busy, total = cw.host_ticks("cpu  100 5 50 800 40 0 5 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n")
    assert (busy, total) == (160, 1000)


def cpu_doc() -> dict[str, object]:
    # aipbxctl started at 100.0, exited at 110.0 (2.5 s of CPU in all); the new color's
    # processes used 0.8 s until the switch at 106.0 and more after it
    return {
        "started_at": 100.0,
        "ended_at": 110.0,
        "cpu_user_s": 2.0,
        "cpu_system_s": 0.5,
        "samples": [
            {"at": 101.0, "tree_s": 0.3, "units_s": {"u": 0.0}},
            {"at": 103.0, "tree_s": 1.1, "units_s": {"u": 0.2}},
            {"at": 105.0, "tree_s": 1.5, "units_s": {"u": 0.6}},
            {"at": 107.0, "tree_s": 1.9, "units_s": {"u": 1.0}},
            {"at": 109.0, "tree_s": 2.3, "units_s": {"u": 1.4}},
        ],
    }


STEPS = [
    {"step": "verify", "at": 101.0},
    {"step": "unpack", "at": 103.0},
    {"step": "start", "at": 104.0},
    {"step": "health", "at": 105.0},
    {"step": "switch", "at": 106.0},
    {"step": "probation", "at": 107.0},
    {"step": "drain", "at": 108.0},
    {"step": "drain", "at": 109.0},  # a repeated step is one mark, its first
]


def test_upgrade_cost_by_step() -> None:
    cost = cw.upgrade_cost(cpu_doc(), STEPS, "u")
    assert cost["aipbxctl_cpu_s"] == 2.5
    phases = {(p["from"], p["to"]): p for p in cost["phases"]}
    order = list(phases)
    assert (order[0], order[-1]) == (("start", "verify"), ("drain", "exit"))
    assert phases[("verify", "unpack")]["cpu_s"] == 0.8
    assert phases[("verify", "unpack")]["wall_s"] == 2.0
    # the phases add up to the total: nothing counted twice or left out
    assert round(sum(p["cpu_s"] for p in cost["phases"]), 3) == 2.5
    assert cost["aipbxctl_cpu_until_switch_s"] == 1.7
    assert cost["new_color_cpu_until_switch_s"] == 0.8
    assert cost["until_switch_cpu_s"] == 2.5
    # from probation (107.0: 1.9 s) to the exit (110.0: 2.5 s) the old color drained
    assert (cost["drain_cpu_s"], cost["drain_wall_s"]) == (0.6, 3.0)
    assert cost["drain_cpu_per_s"] == 0.2


def test_upgrade_cost_without_a_switch() -> None:
    cost = cw.upgrade_cost(cpu_doc(), STEPS[:2], None)
    assert cost["aipbxctl_cpu_until_switch_s"] is None
    assert cost["new_color_cpu_until_switch_s"] is None


def test_share_of_the_run() -> None:
    a = {
        "at": 0.0,
        "ticks_per_s": 100,
        "cpus": 2,
        "machine_ticks": 1000,
        "host_busy_ticks": 0,
        "host_total_ticks": 0,
    }
    b = {**a, "at": 40.0, "machine_ticks": 5000, "host_busy_ticks": 6000, "host_total_ticks": 8000}
    win = cw.window(a, b)
    assert win == {
        "wall_s": 40.0,
        "cpus": 2,
        "capacity_cpu_s": 80.0,
        "machine_cpu_s": 40.0,
        "host_busy_cpu_s": 60.0,
        "host_busy_pct": 75.0,
    }
    share = cw.share_of_run(cw.upgrade_cost(cpu_doc(), STEPS, "u"), win)
    assert share["upgrade_cpu_s"] == 3.3  # aipbxctl 2.5 + the new color 0.8
    assert share["share_of_capacity_pct"] == round(100 * 3.3 / 80, 2)
    assert share["share_of_machine_cpu_pct"] == round(100 * 3.3 / 42.5, 2)


def test_run_passes_the_command_through(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    code = cw.main(
        ["run", "--out", str(out), "--interval", "0.05", "--", sys.executable, "-c", "exit(3)"]
    )
    assert code == 3
    doc = json.loads(out.read_text())
    assert doc["schema"] == cw.SCHEMA and doc["exit_code"] == 3
    assert doc["argv"][-1] == "exit(3)"
    assert doc["started_at"] <= doc["ended_at"]
    assert not list(tmp_path.glob(".*"))  # written whole, then renamed


def test_the_figures_upgrade_cpu_keys() -> None:
    from bench.bluegreen import upgrade_cpu

    snap = {
        "at": 0.0,
        "ticks_per_s": 100,
        "cpus": 2,
        "machine_ticks": 0,
        "host_busy_ticks": 0,
        "host_total_ticks": 0,
    }
    later = {**snap, "at": 40.0, "machine_ticks": 4000, "host_total_ticks": 8000}
    fig = upgrade_cpu(cpu_doc(), STEPS, "u", snap, later)
    assert (fig["upgrade_cpu_s"], fig["upgrade_cpu_pct"]) == (3.3, 4.12)
    assert fig["upgrade_cpu"]["run"]["capacity_cpu_s"] == 80.0
    # cpuwatch left no report (aipbxctl could not start): no figure is made up
    assert upgrade_cpu({}, [], "u", snap, later) == {
        "upgrade_cpu_s": None,
        "upgrade_cpu_pct": None,
        "upgrade_cpu": None,
    }
