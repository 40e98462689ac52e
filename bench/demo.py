"""`make demo`: build the .deb (done by make), boot Debian 12 under systemd-nspawn, install
the appliance with apt, set it up, deploy the sample backend v1, upgrade it to v2 under load,
roll back, do a naive in-place restart under the same load for comparison, and print what
happened. build/demo/report.json has the keys of build/bench/upgrade.json. KEEP=1 leaves the
machine running and prints how to enter it.

APP=real does the same with the real aiPBX backend (`make realapp`; bench/realapp.py): its
environment set with `aipbxctl env set`, Socket.IO clients instead of plain WebSockets, and
the report names the backend and its commit under `app`. It exits non-zero when a request
failed, a connection dropped or a call flow left its color during the blue/green run."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import bluegreen, realapp, timeline
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
    if os.environ.get("APP", "sample") == "real":
        return main_real()
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
        return verdict(m, bg["figures"], keep)
    finally:
        if not keep:
            m.close()


def main_real() -> int:
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
    rps = 50.0
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
        step(
            f"upgrade to {app['v2']} under load ({DURATION:.0f}s: {rps:.0f} HTTP GET/s through "
            f"nginx, {realapp.SIO} Socket.IO clients, {realapp.UDP_FLOWS} RTP flows), then an "
            "instant rollback",
            t0,
        )
        bg = realapp.run_bluegreen(m, app, DURATION, rps)
        step("for comparison: a naive in-place restart of the live unit under the same load", t0)
        naive = realapp.run_naive(m, app, DURATION / 2, rps)
        step("aipbxctl releases", t0)
        print(m.run(["aipbxctl", "releases"]).stdout)
        fig = bg["figures"]
        doc = {
            **fig,
            "naive_restart": naive["figures"],
            "app": {"name": app["app"], "commit": app["commit"], "version": app.get("version")},
            "load": {
                "http_rps": rps,
                "sio": realapp.SIO,
                "udp_flows": realapp.UDP_FLOWS,
                "duration_s": DURATION,
            },
        }
        out = TOP / "build" / "demo"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        step("what happened", t0)
        print(timeline.render_table({"blue/green": doc, "naive restart": doc["naive_restart"]}))
        print(f"\nreport: {(out / 'report.json').relative_to(TOP)}")
        return verdict(m, fig, keep)
    finally:
        if not keep:
            m.close()


def verdict(m: Machine, fig: dict[str, Any], keep: bool) -> int:
    """Exit code: 1, saying so, when the blue/green run broke the demo's claim."""
    broken = claim_failures(fig)
    if broken:
        print("demo: the blue/green run did NOT hold: " + "; ".join(broken), file=sys.stderr)
    if keep:
        print(f"machine left running: nsenter -t {m.pid1} -a bash")
        print(f"stop it with: kill {m.nspawn_pid}")
    return 1 if broken else 0


def claim_failures(fig: dict[str, Any]) -> list[str]:
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
