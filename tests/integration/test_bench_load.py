"""bench/load.py against the real sample backend (gunicorn + aiohttp, PostgreSQL behind
PgBouncer) on loopback: a clean run must see every request, WebSocket and UDP packet answered
and every acknowledged write in the database; a run during which the backend is SIGKILLed
must see the failures. Then the analysis and the timeline PNG from that run, and the
sizing steps (bench/sizing.py) run with load.py as the demo runs them."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Database
from bench import sizing
from bench.analyze import Events, analyze, parse_load
from bench.timeline import render_timeline
from tests.integration.procs import stop
from tests.integration.test_sample_backend import (  # noqa: F401  (fixtures)
    VERSION,
    Sample,
    _query,
    database,
    release,
    start_sample,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOAD = REPO / "bench/load.py"
# what runs it inside the booted machine: Debian's python3 with python3-aiohttp
PYTHON = "/usr/bin/python3"
RPS = 100


def run_load(sample: Sample, out: Path, duration: float) -> subprocess.Popen[bytes]:
    argv = [PYTHON, str(LOAD), f"--base-url=http://127.0.0.1:{sample.port}"]
    argv += [f"--ws-url=ws://127.0.0.1:{sample.ws_port}/ws/", "--ws=5"]
    argv += ["--udp-host=127.0.0.1", f"--udp-port={sample.udp_port}", "--udp-flows=3"]
    argv += ["--udp-pps=50", "--udp-size=172", "--new-udp-flow-every=2"]
    argv += [f"--http-rps={RPS}", f"--duration={duration}", f"--out={out}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def db_ids(db: Database) -> list[str]:
    return [r[0] for r in _query(db, "SELECT id FROM writes")]


@pytest.fixture
def backend(release: Path, database: Database) -> tuple[Path, Database]:  # noqa: F811
    """The sample release and its database (test_sample_backend's module fixtures)."""
    return release, database


def sigkill_tree(pid: int) -> None:
    """SIGKILL gunicorn's master, then its worker: a crash, not a graceful stop (a worker
    whose master died exits gracefully on its own; the master would respawn a worker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    os.kill(pid, signal.SIGKILL)
    for child in children:
        os.kill(child, signal.SIGKILL)


def test_clean_run_sees_everything_answered(backend: tuple[Path, Database], tmp_path: Path) -> None:
    release_dir, db = backend
    sample = start_sample(release_dir, db, {})
    out = tmp_path / "load.json"
    try:
        log = finish(run_load(sample, out, duration=6))
    finally:
        stop(sample.proc)
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert doc["stop_cause"] == "duration", log
    # open loop: the schedule offers the full rate whatever happens
    assert abs(s["http_sent"] - RPS * 6) <= 2, s
    assert s["http_ok"] == s["http_sent"] and s["http_failed"] == 0, s["http_fail_reasons"]
    assert s["http_versions"] == {VERSION: s["http_ok"]}
    assert len(doc["timeline"]) == 6
    assert all(r["http_ok"] >= RPS - 2 and r["http_failed"] == 0 for r in doc["timeline"])
    assert all(r["http_p99_ms"] is not None for r in doc["timeline"])

    conns = doc["ws_connections"]
    assert len(conns) == 5 and s["ws_drops"] == 0 and not s["ws_connect_failures"]
    for c in conns:
        assert c["close_reason"] == "end", c
        assert c["pongs"] >= 5 and [r["version"] for r in c["runs"]] == [VERSION]

    assert len(doc["udp_flows"]) == 3 and len({f["port"] for f in doc["udp_flows"]}) == 3
    for f in doc["udp_flows"]:
        assert f["sent"] >= 50 * 6 - 2 and f["lost"] == 0 and f["malformed"] == 0, f
        assert list(f["versions"]) == [VERSION]
    assert [f["versions"].keys() for f in doc["udp_new_flows"]] == [{VERSION}, {VERSION}]
    assert all(f["received"] == f["sent"] == 10 for f in doc["udp_new_flows"])

    in_db = db_ids(db)
    acked = doc["writes_acked"]
    assert len(acked) == len(set(acked)) == s["http_ok"]
    assert set(acked) <= set(in_db)

    figures = analyze(doc, in_db, Events(switch_at=doc["stopped_at"]))
    assert (figures.http_ok, figures.http_failed) == (s["http_ok"], 0)
    assert (figures.ws_kept, figures.ws_dropped, figures.writes_lost) == (5, 0, 0)
    assert figures.old_version == VERSION and figures.udp_lost == 0


def test_sigkill_mid_run_is_seen(backend: tuple[Path, Database], tmp_path: Path) -> None:
    release_dir, db = backend
    sample = start_sample(release_dir, db, {})
    out = tmp_path / "load.json"
    try:
        proc = run_load(sample, out, duration=8)
        time.sleep(3.5)
        killed_at = time.time()
        sigkill_tree(sample.proc.pid)
        log = finish(proc)
    finally:
        stop(sample.proc)
    doc = json.loads(out.read_text())
    in_db = db_ids(db)
    figures = analyze(doc, in_db, Events(switch_at=killed_at))

    assert figures.http_ok > 0 and figures.http_failed > 0, log
    assert figures.http_fail_window_s is not None
    run = parse_load(doc)
    first_failing = min(s.at for s in run.timeline if s.http_failed)
    assert killed_at - 1 <= first_failing <= killed_at + 1
    assert figures.ws_dropped >= 5 and figures.ws_kept == 0
    for c in doc["ws_connections"][:5]:
        assert c["close_reason"] != "end" and c["closed"] is not None
        assert abs(c["closed"] - killed_at) < 1.5, (c, killed_at)
    assert figures.udp_lost > 0
    # nothing answers after a crash: no flow was "pinned", no new flow reached a new color
    assert figures.udp_pinned_flows == 0 and figures.new_version is None
    assert figures.new_flows_on_new_color == 0
    # the sample answers 200 only after COMMIT: a crash loses no acknowledged write
    assert figures.writes_acked > 0 and figures.writes_lost == 0

    png = render_timeline(
        doc, [{"at": killed_at, "label": "SIGKILL"}], tmp_path / "timeline.png", "SIGKILL"
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack("!II", data[16:24])
    assert (width, height) == (1200, 1000)
    assert 20_000 < len(data) < 2_000_000


def test_sizing_steps_run_load_py_with_a_warmup(
    backend: tuple[Path, Database], tmp_path: Path
) -> None:
    """bench/sizing.search driving load.py as the demo does (a step per rate, latency after
    the warm-up): the steps ramp up, each offers its rate in full and is read back."""
    release_dir, db = backend
    sample = start_sample(release_dir, db, {})
    plan = sizing.Plan(start=20, factor=2, max_steps=2, step_s=2, warmup_s=1)
    docs: list[dict[str, Any]] = []

    def step(rate: float) -> sizing.StepResult:
        out = tmp_path / f"step-{len(docs)}.json"
        argv = [PYTHON, str(LOAD), f"--base-url=http://127.0.0.1:{sample.port}", "--ws=0"]
        argv += [f"--http-rps={rate}", f"--duration={plan.warmup_s + plan.step_s}"]
        argv += [f"--warmup-s={plan.warmup_s}", f"--out={out}"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        finish(proc)
        docs.append(json.loads(out.read_text()))
        return sizing.step_from_load(docs[-1], rate, plan.step_s)

    try:
        found = sizing.search(step, sizing.Bound(p99_ms=60_000), plan)
    finally:
        stop(sample.proc)
    assert [s.rate for s in found.steps] == [20, 40]
    for s, doc in zip(found.steps, docs, strict=True):
        summary = doc["summary"]
        assert abs(s.sent - s.rate * 3) <= 2 and s.failed == 0, summary
        assert s.p99_ms == summary["http_p99_ms_after_warmup"] is not None
    assert found.sustainable == 40  # a bound nothing on loopback breaks
