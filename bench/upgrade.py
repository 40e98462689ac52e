"""`make bench`: the blue/green upgrade and rollback under load beside a naive in-place
restart, in a booted Debian 12. Writes build/bench/upgrade.json and the timeline PNGs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench import bluegreen, timeline
from tests.system.harness import harness_problem
from tests.system.machine import Machine
from tests.system.rootfs import ensure_rootfs

TOP = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=90, help="seconds of load per scenario")
    p.add_argument("--http-rps", type=float, default=500)
    p.add_argument("--out", type=Path, default=TOP / "build" / "bench")
    args = p.parse_args(argv)
    problem = harness_problem()
    if problem:
        print(f"bench: cannot boot a machine: {problem}", file=sys.stderr)
        return 1
    deb = Path(os.environ["AIPBX_DEB"])
    sample = Path(os.environ.get("AIPBX_SAMPLE_DIR", TOP / "build" / "sample"))
    with Machine(ensure_rootfs(TOP / "build" / "cache")) as m:
        bluegreen.prepare(m, deb, sample)
        bluegreen.deploy_first(m)
        print(f"bench: blue/green under load for {args.duration:.0f}s", flush=True)
        bg = bluegreen.run_bluegreen(m, args.duration, args.http_rps)
        print(f"bench: naive restart under load for {args.duration / 2:.0f}s", flush=True)
        naive = bluegreen.run_naive(m, args.duration / 2, args.http_rps)
    params = {
        "http_rps": args.http_rps,
        "ws": 50,
        "udp_flows": 20,
        "udp_pps": 50,
        "udp_size": 172,
        "duration_s": args.duration,
    }
    doc = bluegreen.report(args.out, bg, naive, params)
    print(timeline.render_table({"blue/green": doc, "naive restart": doc["naive_restart"]}))
    print(f"bench: wrote {args.out / 'upgrade.json'} and {args.out / 'upgrade-timeline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
