"""The benchmark's figures from one run: bench/load.py's JSON report, the write ids found in
the database afterwards, and the orchestrator's event times.

Every time here is epoch seconds: load.py writes time.time() at its start plus monotonic
offsets, and the orchestrator must stamp its events with time.time() on the same machine.
`switch_at` is when the switch COMPLETED (from then on every new flow must reach the new
color); for a naive restart it is when the restart was issued.

Definitions:
- http_ok / http_failed: POST /api/writes answered 2xx with its id / anything else (non-2xx,
  timeout, connection error), over the whole run.
- ws_kept: connections open at the start of the run still open at its end (closed by the
  load generator itself); ws_dropped: connections closed by anything else (server close,
  error, 5 s without a pong), over the whole run.
- udp_pinned_flows: steady flows started before the switch that the OLD version kept
  answering after it (later than switch_at + grace_s); udp_pinned_lost: packets lost on them.
- new_flows_on_new_color: fresh flows started after the switch (and before a rollback) that
  only the NEW version answered, out of new_flows_after_switch.
- writes_lost: acknowledged ids missing from the database.
- http_p50_ms / http_p99_ms: latency of the answered requests over the whole run (from when
  each was due), as load.py reports it.

`no_switch` gives the same figures for a baseline run (the same load, no upgrade): those
that need a switch are None.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PIN_GRACE_S = 1.0  # a reply to a packet sent just before the switch is not "kept answering"


@dataclass(frozen=True)
class Span:
    """When one version answered: how often, first and last time."""

    count: int
    first: float
    last: float


@dataclass(frozen=True)
class WsConn:
    slot: int
    gen: int
    opened: float
    closed: float | None
    close_reason: str | None
    versions: Mapping[str, Span]

    @property
    def kept(self) -> bool:
        return self.close_reason == "end"

    @property
    def dropped(self) -> bool:
        return self.close_reason not in (None, "end")


@dataclass(frozen=True)
class UdpFlow:
    flow: int
    port: int
    started: float
    sent: int
    received: int
    lost: int
    versions: Mapping[str, Span]


@dataclass(frozen=True)
class Second:
    t: int
    at: float
    http_ok: int
    http_failed: int
    http_versions: Mapping[str, int]


@dataclass(frozen=True)
class LoadRun:
    started_at: float
    stopped_at: float
    http_ok: int
    http_failed: int
    http_fail_reasons: Mapping[str, int]
    http_p50_ms: float | None
    http_p99_ms: float | None
    timeline: tuple[Second, ...]
    ws: tuple[WsConn, ...]
    udp_flows: tuple[UdpFlow, ...]
    udp_new_flows: tuple[UdpFlow, ...]
    writes_acked: tuple[str, ...]


@dataclass(frozen=True)
class Events:
    """The orchestrator's times (epoch seconds) and durations it measured itself."""

    switch_at: float
    rollback_at: float | None = None
    switch_ms: float | None = None
    rollback_ms: float | None = None
    upgrade_s: float | None = None


@dataclass(frozen=True)
class Figures:
    http_ok: int
    http_failed: int
    ws_kept: int
    ws_dropped: int
    udp_pinned_flows: int
    udp_pinned_lost: int
    new_flows_on_new_color: int
    writes_acked: int
    writes_lost: int
    switch_ms: float | None
    rollback_ms: float | None
    upgrade_s: float | None
    http_p50_ms: float | None
    http_p99_ms: float | None
    # context for the figures above
    http_fail_reasons: Mapping[str, int]
    http_fail_window_s: float | None
    ws_open_at_start: int
    udp_flows_before_switch: int
    udp_lost: int
    new_flows_after_switch: int
    lost_write_ids: tuple[str, ...]
    old_version: str | None
    new_version: str | None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["http_fail_reasons"] = dict(self.http_fail_reasons)
        d["lost_write_ids"] = list(self.lost_write_ids)
        return d


# -- reading load.py's report


def _spans(doc: Mapping[str, Any]) -> dict[str, Span]:
    return {
        str(v): Span(int(s["count"]), float(s["first"]), float(s["last"]))
        for v, s in doc.get("versions", {}).items()
    }


def _flow(f: Mapping[str, Any]) -> UdpFlow:
    return UdpFlow(
        flow=int(f["flow"]),
        port=int(f["port"]),
        started=float(f["started"]),
        sent=int(f["sent"]),
        received=int(f["received"]),
        lost=int(f["lost"]),
        versions=_spans(f),
    )


def _ms(value: Any) -> float | None:
    return None if value is None else float(value)


def parse_load(doc: Mapping[str, Any]) -> LoadRun:
    """load.py's JSON (already json.load-ed) as typed records; KeyError/ValueError if it is
    not one."""
    if not str(doc.get("schema", "")).startswith("aipbx-bench-load/"):
        raise ValueError(f"not a load report (schema {doc.get('schema')!r})")
    summary = doc["summary"]
    return LoadRun(
        started_at=float(doc["started_at"]),
        stopped_at=float(doc["stopped_at"]),
        http_ok=int(summary["http_ok"]),
        http_failed=int(summary["http_failed"]),
        http_fail_reasons={str(k): int(v) for k, v in summary["http_fail_reasons"].items()},
        http_p50_ms=_ms(summary.get("http_p50_ms")),
        http_p99_ms=_ms(summary.get("http_p99_ms")),
        timeline=tuple(
            Second(
                t=int(r["t"]),
                at=float(r["at"]),
                http_ok=int(r["http_ok"]),
                http_failed=int(r["http_failed"]),
                http_versions={str(k): int(v) for k, v in r["http_versions"].items()},
            )
            for r in doc["timeline"]
        ),
        ws=tuple(
            WsConn(
                slot=int(c["slot"]),
                gen=int(c["gen"]),
                opened=float(c["opened"]),
                closed=None if c["closed"] is None else float(c["closed"]),
                close_reason=c["close_reason"],
                versions=_spans(c),
            )
            for c in doc["ws_connections"]
        ),
        udp_flows=tuple(_flow(f) for f in doc["udp_flows"]),
        udp_new_flows=tuple(_flow(f) for f in doc["udp_new_flows"]),
        writes_acked=tuple(str(i) for i in doc["writes_acked"]),
    )


# -- the figures


def http_fail_window(run: LoadRun) -> tuple[float, float] | None:
    """From the start of the first second with a failed request to the end of the last."""
    failing = [s.at for s in run.timeline if s.http_failed]
    return (min(failing), max(failing) + 1.0) if failing else None


def ws_kept_dropped(run: LoadRun) -> tuple[int, int, int]:
    """(open at start, of those still open at the end, dropped over the whole run)."""
    at_start = [c for c in run.ws if c.gen == 0]
    return len(at_start), sum(c.kept for c in at_start), sum(c.dropped for c in run.ws)


def http_version_between(run: LoadRun, start: float | None, end: float | None) -> str | None:
    """The version that answered most HTTP requests due in whole seconds within [start, end)."""
    seen: Counter[str] = Counter()
    for s in run.timeline:
        if (start is None or s.at >= start) and (end is None or s.at + 1.0 <= end):
            seen.update(s.http_versions)
    return seen.most_common(1)[0][0] if seen else None


def infer_versions(run: LoadRun, events: Events) -> tuple[str | None, str | None]:
    """(old, new): what HTTP got before the switch and between it and a rollback. HTTP, not
    UDP: nginx moves every new request at once, while pinned UDP flows stay on the old one."""
    old = http_version_between(run, None, events.switch_at)
    new = http_version_between(run, events.switch_at, events.rollback_at)
    return old, new


def pinned_flows(
    run: LoadRun, switch_at: float, old_version: str, grace_s: float = PIN_GRACE_S
) -> list[UdpFlow]:
    """Steady flows started before the switch that old_version still answered after it."""
    pinned = []
    for f in run.udp_flows:
        span = f.versions.get(old_version)
        if f.started < switch_at and span is not None and span.last > switch_at + grace_s:
            pinned.append(f)
    return pinned


def new_flows_on_new_color(
    run: LoadRun, switch_at: float, new_version: str | None, until: float | None = None
) -> tuple[int, int]:
    """(answered only by new_version, all) for fresh flows started in [switch_at, until)."""
    after = [
        f
        for f in run.udp_new_flows
        if f.started >= switch_at and (until is None or f.started < until)
    ]
    on_new = sum(1 for f in after if f.received > 0 and set(f.versions) == {new_version})
    return on_new, len(after)


def lost_writes(acked: Iterable[str], in_db: Iterable[str]) -> list[str]:
    """Acknowledged write ids the database does not have."""
    return sorted(set(acked) - set(in_db))


def analyze(
    doc: Mapping[str, Any],
    db_ids: Iterable[str],
    events: Events,
    *,
    old_version: str | None = None,
    new_version: str | None = None,
    grace_s: float = PIN_GRACE_S,
) -> Figures:
    """All figures for one run. Versions not given are inferred from HTTP answers; the two
    must differ, or nothing could tell a pinned flow from a moved one."""
    run = parse_load(doc)
    inferred_old, inferred_new = infer_versions(run, events)
    old = old_version if old_version is not None else inferred_old
    new = new_version if new_version is not None else inferred_new
    if old is not None and old == new:
        raise ValueError(
            f"old and new version are both {old!r}: upgrade to a different version, "
            "or the analysis cannot tell the colors apart"
        )
    pinned = pinned_flows(run, events.switch_at, old, grace_s) if old is not None else []
    on_new, after = new_flows_on_new_color(run, events.switch_at, new, events.rollback_at)
    at_start, kept, dropped = ws_kept_dropped(run)
    lost = lost_writes(run.writes_acked, db_ids)
    window = http_fail_window(run)
    return Figures(
        http_ok=run.http_ok,
        http_failed=run.http_failed,
        ws_kept=kept,
        ws_dropped=dropped,
        udp_pinned_flows=len(pinned),
        udp_pinned_lost=sum(f.lost for f in pinned),
        new_flows_on_new_color=on_new,
        writes_acked=len(run.writes_acked),
        writes_lost=len(lost),
        switch_ms=events.switch_ms,
        rollback_ms=events.rollback_ms,
        upgrade_s=events.upgrade_s,
        http_p50_ms=run.http_p50_ms,
        http_p99_ms=run.http_p99_ms,
        http_fail_reasons=dict(run.http_fail_reasons),
        http_fail_window_s=None if window is None else round(window[1] - window[0], 3),
        ws_open_at_start=at_start,
        udp_flows_before_switch=sum(1 for f in run.udp_flows if f.started < events.switch_at),
        udp_lost=sum(f.lost for f in run.udp_flows),
        new_flows_after_switch=after,
        lost_write_ids=tuple(lost),
        old_version=old,
        new_version=new,
    )


# the figures only a switch has: None in a baseline
SWITCH_ONLY = (
    "udp_pinned_flows",
    "udp_pinned_lost",
    "new_flows_on_new_color",
    "new_flows_after_switch",
    "udp_flows_before_switch",
    "switch_ms",
    "rollback_ms",
    "upgrade_s",
    "new_version",
)


def no_switch(doc: Mapping[str, Any], db_ids: Iterable[str]) -> dict[str, Any]:
    """The figures of a baseline run (the same load, nothing switched): failures, drops,
    losses and latency; the figures only a switch has are None."""
    run = parse_load(doc)
    at_start, kept, dropped = ws_kept_dropped(run)
    lost = lost_writes(run.writes_acked, db_ids)
    window = http_fail_window(run)
    fig: dict[str, Any] = {
        "http_ok": run.http_ok,
        "http_failed": run.http_failed,
        "http_fail_reasons": dict(run.http_fail_reasons),
        "http_fail_window_s": None if window is None else round(window[1] - window[0], 3),
        "http_p50_ms": run.http_p50_ms,
        "http_p99_ms": run.http_p99_ms,
        "ws_open_at_start": at_start,
        "ws_kept": kept,
        "ws_dropped": dropped,
        "udp_lost": sum(f.lost for f in run.udp_flows),
        "writes_acked": len(run.writes_acked),
        "writes_lost": len(lost),
        "lost_write_ids": lost,
        "old_version": http_version_between(run, None, None),
    }
    return fig | dict.fromkeys(SWITCH_ONLY)


def read_ids(text: str) -> list[str]:
    """Ids one a line (`psql -At -c 'SELECT id FROM writes'`), blank lines ignored."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Figures from a bench/load.py report.")
    p.add_argument("load", type=Path, help="load.py's JSON")
    p.add_argument("--db-ids", type=Path, required=True, help="ids in the DB, one a line")
    p.add_argument("--switch-at", type=float, required=True, help="epoch seconds")
    p.add_argument("--rollback-at", type=float, help="epoch seconds")
    p.add_argument("--switch-ms", type=float)
    p.add_argument("--rollback-ms", type=float)
    p.add_argument("--upgrade-s", type=float)
    p.add_argument("--old-version")
    p.add_argument("--new-version")
    args = p.parse_args(argv)
    events = Events(
        switch_at=args.switch_at,
        rollback_at=args.rollback_at,
        switch_ms=args.switch_ms,
        rollback_ms=args.rollback_ms,
        upgrade_s=args.upgrade_s,
    )
    try:
        figures = analyze(
            json.loads(args.load.read_text()),
            read_ids(args.db_ids.read_text()),
            events,
            old_version=args.old_version,
            new_version=args.new_version,
        )
    except (OSError, KeyError, ValueError) as e:
        print(f"analyze: {e}", file=sys.stderr)
        return 1
    print(json.dumps(figures.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
