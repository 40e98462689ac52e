"""`make demo`: build the .deb (done by make), boot Debian 12 under systemd-nspawn, install
the appliance with apt, set it up, deploy the sample backend v1, upgrade it to v2 under load,
roll back, do a naive in-place restart under the same load for comparison, and print what
happened. build/demo/report.json has the keys of build/bench/upgrade.json. KEEP=1 leaves the
machine running and prints how to enter it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bench import bluegreen, timeline
from tests.system.harness import harness_problem
from tests.system.machine import Machine
from tests.system.rootfs import ensure_rootfs

TOP = Path(__file__).resolve().parents[1]
DURATION = float(os.environ.get("DEMO_DURATION", "40"))


def step(title: str, t0: float) -> None:
    print(f"\n== {title}  (+{time.monotonic() - t0:.1f}s)", flush=True)


def main() -> int:
    problem = harness_problem()
    if problem:
        print(f"demo: cannot boot a machine: {problem}", file=sys.stderr)
        return 1
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
        step(
            f"upgrade to 2.0.0 under load ({DURATION:.0f}s: HTTP writes through nginx, 50 "
            "WebSockets, 20 UDP flows), then an instant rollback",
            t0,
        )
        bg = bluegreen.run_bluegreen(m, DURATION, 500)
        step("for comparison: a naive in-place restart of the live unit under the same load", t0)
        naive = bluegreen.run_naive(m, DURATION / 2, 500)
        step("aipbxctl releases", t0)
        print(m.run(["aipbxctl", "releases"]).stdout)
        params = {
            "http_rps": 500,
            "ws": 50,
            "udp_flows": 20,
            "udp_pps": 50,
            "udp_size": 172,
            "duration_s": DURATION,
        }
        out = TOP / "build" / "demo"
        doc = bluegreen.report(out, bg, naive, params)
        (out / "report.json").write_text((out / "upgrade.json").read_text())
        step("what happened", t0)
        print(timeline.render_table({"blue/green": doc, "naive restart": doc["naive_restart"]}))
        print(
            f"\nreport: {(out / 'report.json').relative_to(TOP)}, timeline: "
            f"{(out / 'upgrade-timeline.png').relative_to(TOP)}"
        )
        if keep:
            print(f"machine left running: nsenter -t {m.pid1} -a bash")
            print(f"stop it with: kill {m.nspawn_pid}")
    finally:
        if not keep:
            m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
