"""`make demo`: build the .deb (done by make), boot Debian 12 under systemd-nspawn, install
the appliance with apt, set it up, deploy the sample backend v1, then, with the load sized to
this machine (bench/shares.py): measure the sustainable write rate (steps of the same load,
no switch, until p99 > 250 ms or something fails), and at each share of it (LOAD_SHARE,
default 0.5,0.8; the first is the headline) run the load once with no upgrade (the baseline)
and once while upgrading to v2 and rolling back, plus a naive in-place restart at the
headline share; measure the upgrade's CPU; print what happened. build/demo/report.json has
the keys of build/bench/upgrade.json. KEEP=1 leaves the machine running and prints how to
enter it.

APP=real does the same with the real aiPBX backend (`make realapp`; bench/realapp.py): its
environment set with `aipbxctl env set`, HTTP GETs, Socket.IO clients instead of plain
WebSockets, and the report names the backend and its commit under `app`.

Exit codes: 0 every promised zero held; 1 CLAIM FAILED (a request failed, a connection
dropped, a call flow left its color, or aipbxctl failed during a blue/green run whose
baseline lost nothing), or the demo could not run; 2 a bad LOAD_SHARE; 3 OVERLOADED (the
baseline with no upgrade failed too, or no rate was sustainable: the box cannot carry the
load, so the figures measure overload, not the switch)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import bluegreen, realapp, shares, sizing
from tests.system.harness import harness_problem
from tests.system.machine import Machine
from tests.system.rootfs import ensure_rootfs

TOP = Path(__file__).resolve().parents[1]
DURATION = float(os.environ.get("DEMO_DURATION", "40"))
EXIT_CLAIM_FAILED = 1
EXIT_USAGE = 2
EXIT_OVERLOADED = 3
SAMPLE_LOAD = {"ws": 50, "udp_flows": 20, "udp_pps": 50, "udp_size": 172}


def step(title: str, t0: float) -> None:
    print(f"\n== {title}  (+{time.monotonic() - t0:.1f}s)", flush=True)


def load_shares() -> list[float] | None:
    try:
        return sizing.parse_shares(os.environ.get("LOAD_SHARE", "0.5,0.8"))
    except ValueError as e:
        print(f"demo: {e}", file=sys.stderr)
        return None


def main() -> int:
    problem = harness_problem()
    if problem:
        print(f"demo: cannot boot a machine: {problem}", file=sys.stderr)
        return 1
    parts = load_shares()
    if parts is None:
        return EXIT_USAGE
    if os.environ.get("APP", "sample") == "real":
        return main_real(parts)
    deb = Path(os.environ["AIPBX_DEB"])
    sample = Path(os.environ.get("AIPBX_SAMPLE_DIR", TOP / "build" / "sample"))
    t0 = time.monotonic()
    step("preparing the Debian 12 rootfs (cached after the first run)", t0)
    rootfs = ensure_rootfs(TOP / "build" / "cache")
    keep = os.environ.get("KEEP") == "1"
    m = Machine(rootfs)
    try:
        m.__enter__()
        step(
            f"booted {m.name} (systemd as PID 1, private network); apt install {deb.name}; "
            "aipbxctl setup",
            t0,
        )
        bluegreen.prepare(m, deb, sample)
        print(m.run(["aipbxctl", "status"]).stdout)
        step("aipbxctl upgrade aipbx-sample-1.0.0.tar.gz (first deploy)", t0)
        first = bluegreen.deploy_first(m)
        for s in first["steps"]:
            print(f"  [{s['elapsed_s']:6.2f}s] {s['step']}: {s['detail']}")
        print(
            f"\nthe load: HTTP writes through nginx, {SAMPLE_LOAD['ws']} WebSockets, "
            f"{SAMPLE_LOAD['udp_flows']} UDP flows; shares {', '.join(map(sizing.pct, parts))}"
        )
        outcome = shares.run_all(sample_driver(m), parts, DURATION, lambda t: step(t, t0))
        step("aipbxctl releases", t0)
        print(m.run(["aipbxctl", "releases"]).stdout)
        doc = shares.report_doc(outcome, SAMPLE_LOAD)
        return finish(m, outcome, doc, keep, t0)
    finally:
        if not keep:
            m.close()


def sample_driver(m: Machine) -> shares.Driver:
    return shares.Driver(
        unit="writes/s",
        size=lambda: bluegreen.size(m, log=print),
        baseline=lambda d, r: bluegreen.run_baseline(m, d, r),
        bluegreen=lambda d, r: bluegreen.run_bluegreen(m, d, r),
        naive=lambda d, r: bluegreen.run_naive(m, d, r),
    )


def finish(m: Machine, outcome: shares.Outcome, doc: dict[str, Any], keep: bool, t0: float) -> int:
    out = TOP / "build" / "demo"
    shares.write_files(out, outcome, doc, "report.json")
    step("what happened", t0)
    print(shares.render(doc))
    print(f"report: {(out / 'report.json').relative_to(TOP)}")
    return verdict(m, doc, keep)


def main_real(parts: list[float]) -> int:
    from tests.system.realapp import NotBuilt, app_info

    try:
        app = app_info()
    except NotBuilt as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    deb = Path(os.environ["AIPBX_DEB"])
    t0 = time.monotonic()
    step("preparing the Debian 12 rootfs (cached after the first run)", t0)
    rootfs = ensure_rootfs(TOP / "build" / "cache")
    keep = os.environ.get("KEEP") == "1"
    m = Machine(rootfs)
    try:
        m.__enter__()
        step(
            f"booted {m.name}; apt install {deb.name}; aipbxctl setup; aipbxctl env set "
            f"{' '.join(realapp_env_keys())}",
            t0,
        )
        realapp.prepare(m, deb, app)
        step(f"aipbxctl upgrade aipbx-{app['v1']}.tar.gz (first deploy of {app['app']})", t0)
        first = realapp.deploy_first(m, app)
        for s in first["steps"]:
            print(f"  [{s['elapsed_s']:6.2f}s] {s['step']}: {s['detail']}")
        print(
            f"\nthe load: HTTP GETs through nginx, {realapp.SIO} Socket.IO clients, "
            f"{realapp.UDP_FLOWS} RTP flows; shares {', '.join(map(sizing.pct, parts))}"
        )
        driver = shares.Driver(
            unit="GET/s",
            size=lambda: realapp.size(m, log=print),
            baseline=lambda d, r: realapp.run_baseline(m, app, d, r),
            bluegreen=lambda d, r: realapp.run_bluegreen(m, app, d, r),
            naive=lambda d, r: realapp.run_naive(m, app, d, r),
        )
        outcome = shares.run_all(driver, parts, DURATION, lambda t: step(t, t0))
        step("aipbxctl releases", t0)
        print(m.run(["aipbxctl", "releases"]).stdout)
        doc = shares.report_doc(outcome, {"sio": realapp.SIO, "udp_flows": realapp.UDP_FLOWS})
        doc["app"] = {"name": app["app"], "commit": app["commit"], "version": app.get("version")}
        return finish(m, outcome, doc, keep, t0)
    finally:
        if not keep:
            m.close()


def verdict(m: Machine, doc: Mapping[str, Any], keep: bool) -> int:
    """Exit code, saying why on stderr: judge() on the report."""
    code, lines = judge(doc)
    for line in lines:
        print(line, file=sys.stderr)
    if keep:
        print(f"machine left running: nsenter -t {m.pid1} -a bash")
        print(f"stop it with: kill {m.nspawn_pid}")
    return code


def judge(doc: Mapping[str, Any]) -> tuple[int, list[str]]:
    """Pure: the exit code and the lines that say why. A blue/green run that broke a
    promised zero (claim_failures) while its baseline lost nothing: CLAIM FAILED (1). A
    baseline that failed itself, or no sustainable rate at all: OVERLOADED (3): the box
    cannot carry that load, and what the switch did there cannot be told from overload.
    CLAIM FAILED wins over OVERLOADED. A baseline slower than the sizing's bound is noted."""
    found = doc["sizing"]
    unit = doc["load"]["rate_unit"]
    if float(found["sustainable_rps"]) <= 0:
        lowest = min((s["rate"] for s in found["steps"]), default=None)
        return EXIT_OVERLOADED, [
            f"OVERLOADED: no rate down to {lowest} {unit} held {found['bound_text']}: this box "
            "cannot carry the load now, so nothing was upgraded under it"
        ]
    claimed, overloaded, lines = False, False, []
    bound = float(found["bound"]["p99_ms"])
    for r in doc["runs"]:
        at = (
            f"at {sizing.pct(float(r['share']))} of the sustainable rate ({r['http_rps']:g} {unit})"
        )
        base, claim = baseline_failures(r["baseline"]), claim_failures(r["bluegreen"])
        if base:
            overloaded = True
            seen = f"; blue/green: {'; '.join(claim)}" if claim else ""
            lines.append(
                f"OVERLOADED: {at}, the baseline with no upgrade failed too ({'; '.join(base)}"
                f"{seen}): the box cannot carry this load now, so the blue/green figures there "
                "measure overload, not the switch"
            )
        elif claim:
            claimed = True
            lines.append(
                f"CLAIM FAILED: blue/green {at}: {'; '.join(claim)}, while the baseline with "
                "no upgrade lost nothing"
            )
        p99 = r["baseline"].get("http_p99_ms")
        if not base and p99 is not None and float(p99) > bound:
            lines.append(
                f"note {at}: the baseline's p99 ({float(p99):.0f} ms) is over the bound "
                f"the rate was sized with ({bound:g} ms)"
            )
    code = EXIT_CLAIM_FAILED if claimed else EXIT_OVERLOADED if overloaded else 0
    return code, lines


def baseline_failures(fig: Mapping[str, Any]) -> list[str]:
    """What failed in a run with no switch, as phrases: there, a failure is the box's."""
    return [
        f"{k} = {fig[k]}"
        for k in ("http_failed", "ws_dropped", "writes_lost")
        if fig.get(k) not in (0, None)
    ]


def claim_failures(fig: Mapping[str, Any]) -> list[str]:
    """What broke the demo's headline claim (no failed request, no dropped connection, no
    call moved off its color, every new call on the new color), as sentences."""
    broken = [
        f"{k} = {fig[k]}"
        for k in ("http_failed", "ws_dropped", "udp_pinned_lost", "writes_lost")
        if fig.get(k) not in (0, None)
    ]
    pinned, before = fig.get("udp_pinned_flows"), fig.get("udp_flows_before_switch")
    if pinned is not None and before is not None and pinned != before:
        broken.append(f"udp_pinned_flows = {pinned} of {before}")
    if fig.get("new_flows_on_new_color") != fig.get("new_flows_after_switch"):
        broken.append("a new call flow did not reach the new color")
    for verb in ("upgrade", "rollback"):
        if fig.get(f"{verb}_exit_code") not in (0, None):
            broken.append(f"aipbxctl {verb} exited {fig.get(f'{verb}_exit_code')}")
    return broken


def realapp_env_keys() -> list[str]:
    from tests.system.realapp import APP_ENV

    return [f"{k}=…" for k in APP_ENV]


if __name__ == "__main__":
    sys.exit(main())
