"""bench/analyze.py on small synthetic load reports (the schema bench/load.py writes), plus the
table and the timeline PNG from bench/timeline.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from bench import analyze as an
from bench.load import Runs, percentile
from bench.timeline import event_times, render_table, render_timeline

T0 = 1_700_000_000.0  # the load's start, epoch seconds
SWITCH = T0 + 10.0
ROLLBACK = T0 + 20.0
OLD, NEW = "1.0.0", "2.0.0"


def spans(*runs: tuple[str, int, float, float]) -> dict[str, Any]:
    """load.py's "runs" and "versions" for answers given as (version, count, first, last)
    relative to T0."""
    versions: dict[str, dict[str, float]] = {}
    for v, n, a, b in runs:
        seen = versions.setdefault(v, {"count": 0, "first": T0 + a, "last": T0 + b})
        seen["count"] += n
        seen["last"] = T0 + b
    return {
        "runs": [
            {"version": v, "count": n, "first": T0 + a, "last": T0 + b} for v, n, a, b in runs
        ],
        "versions": versions,
    }


def flow(number: int, started: float, sent: int, received: int, *runs: Any) -> dict[str, Any]:
    return {
        "flow": number,
        "port": 40000 + number,
        "started": T0 + started,
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "late_window_s": 1.0,
        **spans(*runs),
    }


def conn(slot: int, gen: int, opened: float, closed: float, reason: str) -> dict[str, Any]:
    return {
        "slot": slot,
        "gen": gen,
        "opened": T0 + opened,
        "closed": T0 + closed,
        "close_reason": reason,
        "pings": 10,
        "pongs": 10,
        **spans((OLD, 10, opened + 0.5, closed - 0.5)),
    }


def second(t: int, ok: int, failed: int = 0) -> dict[str, Any]:
    version = OLD if T0 + t < SWITCH or T0 + t >= ROLLBACK else NEW
    return {
        "t": t,
        "at": T0 + t,
        "span_s": 1.0,
        "http_sent": ok + failed,
        "http_ok": ok,
        "http_failed": failed,
        "http_fail_reasons": {"ClientConnectorError": failed} if failed else {},
        "http_p50_ms": 2.0,
        "http_p99_ms": 9.0,
        "http_versions": {version: ok} if ok else {},
        "sched_lag_ms": 1.0,
        "ws_open": 3,
        "ws_pongs": 3,
        "ws_drops": 1 if t == 12 else 0,
        "ws_connect_failed": 0,
        "ws_versions": {OLD: 3},
        "udp_sent": 150,
        "udp_recv": 150,
        "udp_flows_alive": 3,
        "udp_versions": {OLD: 100, NEW: 50} if T0 + t >= SWITCH else {OLD: 150},
        "cpu_pct": 5.0,
    }


def make_doc() -> dict[str, Any]:
    """30 s of load with a switch at 10 s and a rollback at 20 s: one HTTP request failed
    (second 10), WebSocket slot 1 dropped at 12 s and reconnected, UDP flow 0 pinned to the
    old version, flow 1 moved to the new one, flow 2 died; two writes acked."""
    timeline = [second(t, ok=10, failed=1 if t == 10 else 0) for t in range(30)]
    ok = sum(r["http_ok"] for r in timeline)
    return {
        "schema": "aipbx-bench-load/1",
        "started_at": T0,
        "stopped_at": T0 + 30,
        "ended_at": T0 + 31,
        "stop_cause": "duration",
        "config": {"http_rps": 11, "ws": 3, "udp_flows": 3},
        "summary": {
            "http_ok": ok,
            "http_failed": 1,
            "http_fail_reasons": {"ClientConnectorError": 1},
            "http_p50_ms": 2.0,
            "http_p99_ms": 9.5,
        },
        "timeline": timeline,
        "ws_connections": [
            conn(0, 0, 0.1, 30.0, "end"),
            conn(1, 0, 0.1, 12.2, "closed: 1006"),
            conn(2, 0, 0.1, 30.0, "end"),
            conn(1, 1, 13.2, 30.0, "end"),
        ],
        "udp_flows": [
            flow(0, 0.0, 1500, 1490, (OLD, 1490, 0.0, 30.0)),
            flow(1, 0.0, 1500, 1480, (OLD, 500, 0.0, 10.0), (NEW, 980, 10.1, 30.0)),
            flow(2, 0.0, 1500, 520, (OLD, 520, 0.0, 10.5)),
        ],
        "udp_new_flows": [
            flow(1000, 5.0, 10, 10, (OLD, 10, 5.0, 5.2)),  # before the switch
            flow(1001, 12.0, 10, 10, (NEW, 10, 12.0, 12.2)),
            flow(1002, 15.0, 10, 0),  # after the switch, never answered
            flow(1003, 17.0, 10, 9, (NEW, 9, 17.0, 17.2)),
            flow(1004, 25.0, 10, 10, (OLD, 10, 25.0, 25.2)),  # after the rollback
        ],
        "writes_acked": ["a", "b"],
    }


EVENTS = an.Events(
    switch_at=SWITCH, rollback_at=ROLLBACK, switch_ms=42.0, rollback_ms=8.5, upgrade_s=3.2
)


def test_pinned_flows_and_new_flows() -> None:
    f = an.analyze(make_doc(), ["a", "b"], EVENTS)
    assert (f.old_version, f.new_version) == (OLD, NEW)
    # flow 0 kept answering from the old version; flow 1 moved; flow 2 stopped within grace
    assert f.udp_pinned_flows == 1 and f.udp_pinned_lost == 10
    assert f.udp_flows_before_switch == 3 and f.udp_lost == 10 + 20 + 980
    # new flows between switch and rollback: 1001 and 1003 on the new version, 1002 unanswered
    assert (f.new_flows_on_new_color, f.new_flows_after_switch) == (2, 3)


def test_pinned_grace_decides_a_flow_that_died_just_after_the_switch() -> None:
    run = an.parse_load(make_doc())
    assert [p.flow for p in an.pinned_flows(run, SWITCH, OLD)] == [0]
    assert [p.flow for p in an.pinned_flows(run, SWITCH, OLD, grace_s=0.2)] == [0, 2]


def test_a_dropped_websocket_is_counted_even_when_it_reconnected() -> None:
    f = an.analyze(make_doc(), ["a", "b"], EVENTS)
    assert (f.ws_open_at_start, f.ws_kept, f.ws_dropped) == (3, 2, 1)


def test_a_lost_write() -> None:
    f = an.analyze(make_doc(), ["a", "zz"], EVENTS)
    assert (f.writes_acked, f.writes_lost, f.lost_write_ids) == (2, 1, ("b",))
    assert an.lost_writes(["a", "b", "c"], ["c", "a", "x"]) == ["b"]
    assert an.read_ids("a\n\n b \n") == ["a", "b"]


def test_a_failed_request() -> None:
    f = an.analyze(make_doc(), ["a", "b"], EVENTS)
    assert (f.http_ok, f.http_failed) == (300, 1)
    assert f.http_fail_reasons == {"ClientConnectorError": 1}
    assert f.http_fail_window_s == 1.0
    assert an.http_fail_window(an.parse_load(make_doc())) == (SWITCH, SWITCH + 1)


def test_orchestrator_durations_pass_through() -> None:
    d = an.analyze(make_doc(), ["a", "b"], EVENTS).as_dict()
    assert (d["switch_ms"], d["rollback_ms"], d["upgrade_s"]) == (42.0, 8.5, 3.2)
    assert json.loads(json.dumps(d))["lost_write_ids"] == []


def test_versions_given_override_inference_and_must_differ() -> None:
    doc = make_doc()
    f = an.analyze(doc, [], EVENTS, old_version=NEW, new_version=OLD)
    assert f.udp_pinned_flows == 1  # flow 1 answered NEW after the switch
    with pytest.raises(ValueError, match="both"):
        an.analyze(doc, [], EVENTS, old_version=OLD, new_version=OLD)


def test_without_a_rollback_new_flows_count_to_the_end() -> None:
    f = an.analyze(make_doc(), [], an.Events(switch_at=SWITCH), new_version=NEW)
    # flow 1004 (after 20 s, answered by OLD) now counts and is not on the new color
    assert (f.new_flows_on_new_color, f.new_flows_after_switch) == (2, 4)


def test_latency_is_reported() -> None:
    f = an.analyze(make_doc(), ["a", "b"], EVENTS)
    assert (f.http_p50_ms, f.http_p99_ms) == (2.0, 9.5)


def test_no_switch_figures_of_a_baseline() -> None:
    fig = an.no_switch(make_doc(), ["a"])
    assert (fig["http_ok"], fig["http_failed"], fig["http_p99_ms"]) == (300, 1, 9.5)
    assert (fig["ws_open_at_start"], fig["ws_kept"], fig["ws_dropped"]) == (3, 2, 1)
    assert (fig["writes_acked"], fig["writes_lost"], fig["lost_write_ids"]) == (2, 1, ["b"])
    assert fig["udp_lost"] == 10 + 20 + 980
    # what only a switch has is not made up
    for key in an.SWITCH_ONLY:
        assert fig[key] is None
    # the table shows them as "-" beside a blue/green column
    bg = an.analyze(make_doc(), ["a", "b"], EVENTS).as_dict()
    rows = {
        line.split()[0]: line.split()[1:]
        for line in render_table({"baseline": fig, "bg": bg}).splitlines()[2:]
    }
    assert rows["udp_pinned_flows"] == ["-", "1"]
    assert rows["http_p99_ms"] == ["9.5", "9.5"]


def test_not_a_load_report() -> None:
    with pytest.raises(ValueError, match="not a load report"):
        an.parse_load({"schema": "something else"})


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "load.json").write_text(json.dumps(make_doc()))
    (tmp_path / "ids").write_text("a\n")
    argv = [str(tmp_path / "load.json"), "--db-ids", str(tmp_path / "ids")]
    argv += ["--switch-at", str(SWITCH), "--rollback-at", str(ROLLBACK)]
    assert an.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["writes_lost"], out["udp_pinned_flows"], out["ws_dropped"]) == (1, 1, 1)
    assert an.main([*argv, "--old-version", "x", "--new-version", "x"]) == 1


def test_render_table_side_by_side() -> None:
    bg = an.analyze(make_doc(), ["a", "b"], EVENTS).as_dict()
    naive = {**bg, "http_failed": 1234, "switch_ms": None, "new_flows_on_new_color": 0}
    table = render_table({"blue/green": bg, "naive restart": naive})
    lines = table.splitlines()
    assert lines[0].split() == ["figure", "blue/green", "naive", "restart"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["http_failed"] == ["1", "1234"]
    assert rows["new_flows_on_new_color"] == ["2/3", "0/3"]
    assert rows["switch_ms"] == ["42.0", "-"]
    assert rows["old_version"] == [OLD, OLD]
    assert list(rows)[:14] == [
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
    ]


def test_render_timeline_png(tmp_path: Path) -> None:
    doc = make_doc()
    events = [{"at": SWITCH, "label": "switch"}, {"t": 20.0, "label": "rollback"}]
    assert event_times(doc, events) == [(10.0, "switch"), (20.0, "rollback")]
    png = render_timeline(doc, events, tmp_path / "t.png", "synthetic")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack("!II", data[16:24]) == (1200, 1000)
    assert not list(tmp_path.glob(".*"))  # the temp file was renamed


def test_load_helpers() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    runs = Runs()
    for v, t in [(OLD, 1.0), (OLD, 2.0), (NEW, 3.0), (OLD, 4.0)]:
        runs.add(v, t)
    assert runs.runs == [[OLD, 2, 1.0, 2.0], [NEW, 1, 3.0, 3.0], [OLD, 1, 4.0, 4.0]]
    assert runs.by_version == {OLD: [3, 1.0, 4.0], NEW: [1, 3.0, 3.0]}
