"""`make bench-upgrade` (alias bench-bluegreen): the blue/green upgrade and rollback under load
beside a no-switch baseline and a naive in-place restart, in a booted Debian 12, with the
load sized to the machine as `make demo` sizes it (bench/shares.py: the sustainable rate
first, then --share of it). Writes build/bench/upgrade.json, each run's load report and the
timeline PNGs; exits as `make demo` does (bench/demo.judge: 1 CLAIM FAILED, 3 OVERLOADED)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench import bluegreen, demo, shares, sizing
from tests.system.harness import harness_problem
from tests.system.machine import Machine
from tests.system.rootfs import ensure_rootfs

TOP = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=90, help="seconds of load per run")
    p.add_argument(
        "--share",
        default=os.environ.get("LOAD_SHARE", "0.5,0.8"),
        help="shares of the sustainable rate, the first the headline (default: LOAD_SHARE "
        "or 0.5,0.8)",
    )
    p.add_argument("--out", type=Path, default=TOP / "build" / "bench")
    args = p.parse_args(argv)
    try:
        parts = sizing.parse_shares(args.share)
    except ValueError as e:
        p.error(str(e))
    problem = harness_problem()
    if problem:
        print(f"bench: cannot boot a machine: {problem}", file=sys.stderr)
        return 1
    deb = Path(os.environ["AIPBX_DEB"])
    sample = Path(os.environ.get("AIPBX_SAMPLE_DIR", TOP / "build" / "sample"))
    with Machine(ensure_rootfs(TOP / "build" / "cache")) as m:
        bluegreen.prepare(m, deb, sample)
        bluegreen.deploy_first(m)
        outcome = shares.run_all(
            demo.sample_driver(m), parts, args.duration, lambda t: print(f"bench: {t}", flush=True)
        )
    doc = shares.report_doc(outcome, demo.SAMPLE_LOAD)
    shares.write_files(args.out, outcome, doc, "upgrade.json")
    print(shares.render(doc))
    print(f"bench: wrote {args.out / 'upgrade.json'} and the timelines beside it")
    code, lines = demo.judge(doc)
    for line in lines:
        print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
