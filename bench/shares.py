"""Runs sized to the machine (issue 11, item 14), for `make demo`, `make demo APP=real` and
`make bench-upgrade`: first the sustainable rate (bench/sizing.py), then for each share of
it (LOAD_SHARE, the first is the headline) a no-switch baseline, the blue/green upgrade and
rollback, and for the headline share the naive in-place restart, all at that share's rate
and for the same time. A Driver says how each is run for one backend (the sample:
bench/bluegreen.py; the real app: bench/realapp.py). The report and the table are pure."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import sizing, timeline

Run = dict[str, Any]  # {"figures": {...}, "doc": load report, "events": [...]}


@dataclass(frozen=True)
class Driver:
    unit: str  # what the rate counts, e.g. "writes/s"
    size: Callable[[], sizing.Sizing]
    baseline: Callable[[float, float], Run]  # (duration, rate)
    bluegreen: Callable[[float, float], Run]
    naive: Callable[[float, float], Run]


@dataclass
class ShareRun:
    share: float
    rate: float
    baseline: Run
    bluegreen: Run
    naive: Run | None = None


@dataclass
class Outcome:
    sizing: sizing.Sizing
    unit: str
    duration_s: float
    runs: list[ShareRun] = field(default_factory=list)


def run_all(
    driver: Driver,
    shares: Sequence[float],
    duration: float,
    announce: Callable[[str], None] = print,
) -> Outcome:
    """The thin part: size, then run each share (nothing when no rate was sustainable)."""
    announce(
        "measuring the sustainable rate: steps of the same load, no switch; the highest "
        f"rate that holds {sizing.BOUND.describe()}"
    )
    found = driver.size()
    announce(found.describe(driver.unit))
    out = Outcome(found, driver.unit, duration)
    for i, share in enumerate(shares if found.sustainable > 0 else ()):
        rate = sizing.rate_for(found.sustainable, share)
        what = f"{rate:g} {driver.unit}, {sizing.pct(share)} of {found.sustainable:g}"
        announce(f"baseline: the same load with no upgrade ({duration:.0f}s at {what})")
        base = driver.baseline(duration, rate)
        announce(f"upgrade under load, then an instant rollback ({duration:.0f}s at {what})")
        run = ShareRun(share, rate, base, driver.bluegreen(duration, rate))
        if i == 0:
            announce(f"for comparison: a naive in-place restart ({duration / 2:.0f}s at {what})")
            run.naive = driver.naive(duration / 2, rate)
        out.runs.append(run)
    return out


def report_doc(outcome: Outcome, params: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the report. Its top level is the headline share's blue/green figures (the keys
    build/bench/upgrade.json always had), with `naive_restart`, `baseline`, `load` (the
    rate and share used), `sizing`, and every share's figures under `runs`."""
    found = outcome.sizing
    runs = [
        {
            "share": r.share,
            "http_rps": r.rate,
            "baseline": r.baseline["figures"],
            "bluegreen": r.bluegreen["figures"],
            "naive_restart": None if r.naive is None else r.naive["figures"],
        }
        for r in outcome.runs
    ]
    doc: dict[str, Any] = dict(runs[0]["bluegreen"]) if runs else {}
    head = outcome.runs[0] if outcome.runs else None
    doc.update(
        naive_restart=runs[0]["naive_restart"] if runs else None,
        baseline=runs[0]["baseline"] if runs else None,
        load={
            **params,
            "http_rps": head.rate if head else 0.0,
            "share": head.share if head else None,
            "sustainable_rps": found.sustainable,
            "rate_unit": outcome.unit,
            "duration_s": outcome.duration_s,
        },
        sizing=found.as_dict(),
        runs=runs,
    )
    return doc


def columns(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Pure: the table's columns, baseline beside blue/green for each share, then the naive
    restart; each labelled with its share."""
    cols: dict[str, dict[str, Any]] = {}
    for r in doc.get("runs", []):
        tag = sizing.pct(float(r["share"]))
        cols[f"baseline {tag}"] = r["baseline"]
        cols[f"blue/green {tag}"] = r["bluegreen"]
        if r.get("naive_restart"):
            cols[f"naive {tag}"] = r["naive_restart"]
    return cols


def cpu_lines(doc: Mapping[str, Any]) -> list[str]:
    """Pure: what each upgrade cost in CPU, one line a share, and its phases."""
    lines = []
    for r in doc.get("runs", []):
        cpu = r["bluegreen"].get("upgrade_cpu")
        if not cpu:
            continue
        run = cpu["run"]
        lines.append(
            f"upgrade CPU at {sizing.pct(float(r['share']))}: {cpu['upgrade_cpu_s']:.2f} s = "
            f"aipbxctl and what it ran {cpu['aipbxctl_cpu_s']:.2f} s (until the switch "
            f"{_s(cpu['aipbxctl_cpu_until_switch_s'])}) + the new color until the switch "
            f"{_s(cpu['new_color_cpu_until_switch_s'])}; {_pct(cpu['share_of_capacity_pct'])} "
            f"of {run['cpus']} CPUs x {run['wall_s']:.0f} s, "
            f"{_pct(cpu['share_of_machine_cpu_pct'])} of the CPU the machine used "
            f"(host busy {_pct(run['host_busy_pct'])})"
        )
        if cpu.get("drain_cpu_per_s") is not None:
            lines.append(
                f"  while the old color drained ({cpu['drain_wall_s']:.1f} s, until the "
                f"rollback): aipbxctl {cpu['drain_cpu_s']:.2f} s CPU, "
                f"{1000 * cpu['drain_cpu_per_s']:.0f} ms per second"
            )
        phases = ", ".join(
            f"{p['from']}->{p['to']} {p['cpu_s']:.2f}s/{p['wall_s']:.1f}s"
            for p in cpu["phases"]
            if p["wall_s"] > 0
        )
        lines.append(f"  aipbxctl CPU/wall by step: {phases}")
    return lines


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} %"


def render(doc: Mapping[str, Any]) -> str:
    """Pure: the sizing line, the table and the CPU lines, as the demo prints them."""
    found = doc["sizing"]
    load = doc["load"]
    head = [
        f"sustainable rate: {found['sustainable_rps']:g} {load['rate_unit']} "
        f"({found['bound_text']})",
    ]
    for r in doc.get("runs", []):
        head.append(
            f"  share {sizing.pct(float(r['share']))}: {r['http_rps']:g} {load['rate_unit']}"
        )
    cols = columns(doc)
    table = timeline.render_table(cols) if cols else "(nothing ran: no rate was sustainable)\n"
    return "\n".join(head) + "\n\n" + table + "\n".join(cpu_lines(doc)) + "\n"


def write_files(out_dir: Path, outcome: Outcome, doc: Mapping[str, Any], name: str) -> None:
    """<out_dir>/<name> (the report), each run's load report, and the timeline PNGs of the
    runs whose load report is bench/load.py's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    for i, r in enumerate(outcome.runs):
        tag = "" if i == 0 else f"-{round(r.share * 100)}"
        for kind, png, run, title in (
            ("baseline", "baseline", r.baseline, "the same load, no upgrade"),
            ("bluegreen", "upgrade", r.bluegreen, "blue/green upgrade and rollback under load"),
            ("naive", "naive", r.naive, "naive in-place restart under load"),
        ):
            if run is None:
                continue
            (out_dir / f"load-{kind}{tag}.json").write_text(json.dumps(run["doc"]))
            if str(run["doc"].get("schema", "")).startswith("aipbx-bench-load/"):
                timeline.render_timeline(
                    run["doc"],
                    run.get("events", []),
                    out_dir / f"{png}-timeline{tag}.png",
                    title=f"{title} ({r.rate:g} {outcome.unit}, {sizing.pct(r.share)})",
                )
