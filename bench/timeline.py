"""The upgrade timeline PNG from bench/load.py's report, and the side-by-side table of figures.

Four panels share the time axis (seconds since the load started): requests/s (ok, failed),
WebSocket connections open, UDP flows answered, and which version answered (share of HTTP,
WebSocket and UDP answers per version, the share of HTTP requests that failed, and a marker
per fresh UDP flow in the color of the version that answered it), with a vertical line per
event. matplotlib comes from Debian (python3-matplotlib), Agg backend.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FIGURES = (
    "http_ok",
    "http_failed",
    "http_p50_ms",
    "http_p99_ms",
    "ws_kept",
    "ws_dropped",
    "udp_pinned_flows",
    "udp_pinned_lost",
    "new_flows_on_new_color",
    "writes_acked",
    "writes_lost",
    "switch_ms",
    "rollback_ms",
    "upgrade_s",
)
# shown under the figures when a result has them
CONTEXT = (
    "http_fail_window_s",
    "ws_open_at_start",
    "udp_flows_before_switch",
    "udp_lost",
    "old_version",
    "new_version",
    "upgrade_cpu_s",
    "upgrade_cpu_pct",
)


def _cell(result: Mapping[str, Any], key: str) -> str:
    value = result.get(key)
    if key == "new_flows_on_new_color" and value is not None:
        total = result.get("new_flows_after_switch")
        return f"{value}/{total}" if total is not None else str(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def render_table(results: dict[str, dict[str, Any]]) -> str:
    """The figures side by side, a column per result (e.g. "blue/green", "naive restart")."""
    names = list(results)
    rows = [(key, [_cell(results[n], key) for n in names]) for key in FIGURES]
    rows += [
        (key, [_cell(results[n], key) for n in names])
        for key in CONTEXT
        if any(results[n].get(key) is not None for n in names)
    ]
    width0 = max([len("figure"), *(len(k) for k, _ in rows)])
    widths = [max([len(n), *(len(cells[i]) for _, cells in rows)]) for i, n in enumerate(names)]
    lines = [
        "  ".join(
            ["figure".ljust(width0), *(n.rjust(w) for n, w in zip(names, widths, strict=True))]
        )
    ]
    lines.append("  ".join(["-" * width0, *("-" * w for w in widths)]))
    for key, cells in rows:
        lines.append(
            "  ".join(
                [key.ljust(width0), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]
            )
        )
    return "\n".join(lines) + "\n"


def event_times(
    doc: Mapping[str, Any], events: Sequence[Mapping[str, Any]]
) -> list[tuple[float, str]]:
    """(seconds since the load started, label) for events given either as {"t": seconds since
    the start} or as {"at": epoch seconds}."""
    started = float(doc["started_at"])
    out = []
    for e in events:
        t = float(e["t"]) if "t" in e else float(e["at"]) - started
        out.append((t, str(e.get("label", ""))))
    return out


def _share(rows: Sequence[Mapping[str, Any]], key: str, version: str) -> list[float | None]:
    out: list[float | None] = []
    for r in rows:
        total = sum(r[key].values())
        out.append(100.0 * r[key].get(version, 0) / total if total else None)
    return out


def render_timeline(
    doc: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    out: Path,
    title: str | None = None,
) -> Path:
    """Draw the PNG to out (written whole: temp file, then rename) and return out."""
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    # per-second counts drawn as steps over [t, t + span); the last second may be cut short:
    # plot rates, and drop a stub too short to mean much
    rows = [r for r in doc["timeline"] if r.get("span_s", 1.0) >= 0.5]
    span = [float(r.get("span_s", 1.0)) for r in rows]
    edges = [float(r["t"]) for r in rows] + ([rows[-1]["t"] + span[-1]] if rows else [])
    config = doc.get("config", {})
    versions = sorted(
        {v for r in rows for k in ("http_versions", "ws_versions", "udp_versions") for v in r[k]}
    )

    def steps(ax: Any, values: Sequence[float | None], **style: Any) -> None:
        if values:
            ax.plot(edges, [*values, values[-1]], drawstyle="steps-post", **style)

    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(12, 10), constrained_layout=True)
    ax_http, ax_ws, ax_udp, ax_ver = axes

    ok = [r["http_ok"] / s for r, s in zip(rows, span, strict=True)]
    steps(ax_http, ok, color="tab:green", label="ok")
    failed = [r["http_failed"] / s for r, s in zip(rows, span, strict=True)]
    steps(ax_http, failed, color="tab:red", label="failed")
    if config.get("http_rps"):
        ax_http.axhline(config["http_rps"], color="grey", ls=":", lw=1, label="offered")
    ax_http.set_ylabel("HTTP writes/s")
    ax_http.legend(loc="lower left", fontsize="small")

    # sampled at the end of each second
    ax_ws.plot(
        [r["t"] + 1 for r in rows], [r["ws_open"] for r in rows], color="tab:blue", label="open"
    )
    drops = [(r["t"], r["ws_drops"]) for r in rows if r["ws_drops"]]
    if drops:
        ax_ws.bar(
            [x for x, _ in drops],
            [n for _, n in drops],
            width=1.0,
            align="edge",
            color="tab:red",
            alpha=0.6,
            label="dropped in that second",
        )
    if config.get("ws"):
        ax_ws.axhline(config["ws"], color="grey", ls=":", lw=1)
    ax_ws.set_ylabel("WebSockets")
    ax_ws.legend(loc="lower left", fontsize="small")

    alive = [r["udp_flows_alive"] for r in rows]
    steps(ax_udp, alive, color="tab:purple", label="answered in that second")
    if config.get("udp_flows"):
        ax_udp.axhline(config["udp_flows"], color="grey", ls=":", lw=1)
    ax_udp.set_ylabel("UDP flows")
    ax_udp.legend(loc="lower left", fontsize="small")

    palette = plt.get_cmap("tab10")
    for i, version in enumerate(versions):
        color = palette(i % 10)
        steps(ax_ver, _share(rows, "http_versions", version), color=color, label=f"{version} HTTP")
        steps(ax_ver, _share(rows, "udp_versions", version), color=color, ls="--", label="UDP")
        steps(ax_ver, _share(rows, "ws_versions", version), color=color, ls=":", label="WS")
    failed_pct = [
        100.0 * r["http_failed"] / r["http_sent"] if r["http_sent"] else None for r in rows
    ]
    steps(ax_ver, failed_pct, color="tab:red", lw=2, label="HTTP failed")
    # each fresh UDP flow: a triangle in the color of the version that answered it
    started_at = float(doc["started_at"])
    labelled: set[str] = set()
    for f in doc.get("udp_new_flows", []):
        x = float(f["started"]) - started_at
        answered = list(f["versions"])
        if len(answered) == 1 and answered[0] in versions:
            style = {"marker": "v", "color": palette(versions.index(answered[0]) % 10)}
            label = "new UDP flow"
        else:  # no answer, or answers from both colors
            style = {"marker": "x", "color": "tab:red"}
            label = "new UDP flow, unanswered/mixed"
        ax_ver.plot([x], [102], ms=6, ls="", label=None if label in labelled else label, **style)
        labelled.add(label)
    ax_ver.set_ylabel("% of answers")
    ax_ver.set_ylim(-5, 108)
    ax_ver.legend(loc="center left", fontsize="small", ncol=max(1, len(versions)))
    ax_ver.set_xlabel("seconds since the load started")

    for x, label in event_times(doc, events):
        for ax in axes:
            ax.axvline(x, color="black", ls="--", lw=1)
        ax_http.annotate(
            label,
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize="small",
        )
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax is not ax_ver:
            ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)

    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw the upgrade timeline from a load report.")
    p.add_argument("load", type=Path, help="bench/load.py's JSON")
    p.add_argument("out", type=Path, help="the PNG")
    p.add_argument(
        "--event", action="append", default=[], help="LABEL=EPOCH_SECONDS, e.g. switch=1.7e9"
    )
    p.add_argument("--title")
    args = p.parse_args(argv)
    events = []
    for e in args.event:
        label, sep, at = e.rpartition("=")
        if not sep:
            p.error(f"--event {e}: want LABEL=EPOCH_SECONDS")
        events.append({"label": label, "at": float(at)})
    render_timeline(json.loads(args.load.read_text()), events, args.out, args.title)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
