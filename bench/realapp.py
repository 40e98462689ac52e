"""`make demo APP=real`: the demo's blue/green run and naive restart with the real aiPBX backend
(built and packed by `make realapp`) instead of the sample.

The real app echoes no version, so what the sample's replies tell is read here from the
machine instead: conntrack says which color each RTP flow and each of nginx's WebSocket
connections reaches (sampled twice a second), and tests/system/realapp_load.py records
every request's outcome and every Socket.IO connect and disconnect. The figures have the
keys of bench/analyze.Figures; the ones the real app cannot show are None:
- udp_pinned_lost: the app ignores RTP from a source it does not know (no reply), so
  packets delivered cannot be counted; udp_pinned_flows counts the flows conntrack kept on
  the old color in every sample from the switch to the rollback;
- writes_acked / writes_lost: the app has no unauthenticated write route to count.

The load is sized to the machine like the sample's (bench/sizing.py, bench/shares.py): `size`
steps the run's HTTP GETs and RTP flows without the Socket.IO clients: realapp_load's p99
covers a whole step, and 50 clients connecting at once (Nest's handshakes) put it over 1 s
at any rate, even 1.2 GET/s, so with them the steps would measure the connecting, not the
rate. The runs' p99 includes that connecting (a note says so when it is over the bound).
`run_baseline` is the run's load with no upgrade; the upgrade's CPU is measured
(bench/cpuwatch.py)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import analyze, bluegreen, sizing
from tests.system import realapp
from tests.system.appliance import aipbxctl_json, install, wait_until
from tests.system.machine import Machine

HERE = Path(__file__).resolve().parent
PIN_GRACE_S = 1.0
# the real app is slower to answer than the sample: start lower
PLAN = sizing.Plan(start=10.0, max_rate=1280.0, min_rate=1.0, step_s=6.0, warmup_s=0.0)
SIO = 50
UDP_FLOWS = 20


def prepare(m: Machine, deb: Path, app: Mapping[str, Any]) -> None:
    realapp.copy_in(m, dict(app))
    shutil.copy(HERE / "cpuwatch.py", m.path("/root") / "cpuwatch.py")
    install(m, deb)
    m.run(["aipbxctl", "setup"], timeout=300)
    m.run(["aipbxctl", "env", "set", *(f"{k}={v}" for k, v in realapp.APP_ENV.items())])


def deploy_first(m: Machine, app: Mapping[str, Any]) -> dict[str, Any]:
    code, out = aipbxctl_json(
        m,
        "upgrade",
        realapp.artifact(app["v1"]),
        "--probation",
        "3",
        "--drain",
        "5",
        "--yes",
        check=False,
        timeout=900,
    )
    if code != 0:
        raise RuntimeError(f"deploying {app['v1']} failed: {out}")
    return out


class Sampler:
    """Which color each RTP flow reaches, and how many WebSockets each color holds."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(
                {
                    "at": time.time(),
                    "udp": realapp.udp_targets(self.m),
                    "ws": {c: realapp.ws_on(self.m, c) for c in ("blue", "green")},
                }
            )
            self.stop.wait(0.5)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def figures(
    doc: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    *,
    old: str,
    new: str,
    switch_at: float,
    rollback_at: float | None,
) -> dict[str, Any]:
    """Pure: the Figures keys from realapp_load's report and the conntrack samples."""
    http = doc["http"]
    clients = doc["sio"]
    early = [c for c in clients if not c["late"]]
    drops = [e for c in clients for e in c["events"] if e[1] == "disconnect"]
    flows = doc["udp"]
    steady = [f["port"] for f in flows if not f["fresh"]]
    until = rollback_at or doc["stopped_at"]
    window = [s for s in samples if switch_at + PIN_GRACE_S <= s["at"] <= until]

    def kept_on_old(port: int) -> bool:
        return bool(window) and all(
            s["udp"].get(str(port), s["udp"].get(port)) == old for s in window
        )

    fresh = [f for f in flows if f["fresh"] and f["started"] >= switch_at and f["started"] < until]

    def first_target(f: Mapping[str, Any]) -> str | None:
        for s in samples:
            t = s["udp"].get(str(f["port"]), s["udp"].get(f["port"]))
            if s["at"] >= f["started"] and t:
                return str(t)
        return None

    return {
        "http_ok": http["sent"] - http["failed"],
        "http_failed": http["failed"],
        "http_fail_reasons": http["fail_reasons"],
        "http_statuses": http["statuses"],
        "http_p50_ms": http.get("p50_ms"),
        "http_p99_ms": http["p99_ms"],
        "ws_open_at_start": len(early),
        "ws_kept": sum(1 for c in early if not any(e[1] == "disconnect" for e in c["events"])),
        "ws_dropped": len(drops),
        "udp_flows_before_switch": len(steady),
        "udp_pinned_flows": sum(1 for p in steady if kept_on_old(p)),
        "udp_pinned_lost": None,
        "new_flows_on_new_color": sum(1 for f in fresh if first_target(f) == new),
        "new_flows_after_switch": len(fresh),
        "writes_acked": None,
        "writes_lost": None,
        "old_version": old,
        "new_version": new,
    }


def run_bluegreen(
    m: Machine, app: Mapping[str, Any], duration: float, http_rps: float
) -> dict[str, Any]:
    """v1 live; under load: upgrade to v2, then an instant rollback while v1 still drains.
    The upgrade's CPU is measured."""
    wait_other_stopped(m)
    before = bluegreen.cpu_snapshot(m)
    t0 = time.time()
    realapp.start_load(
        m, "bluegreen", duration + 120, sio=SIO, http_rps=http_rps, udp_flows=UDP_FLOWS
    )
    with Sampler(m) as sampler:
        time.sleep(min(10.0, duration * 0.15))
        t, up = upgrade_watched(
            m,
            "aipbx-backend@green.service",
            "upgrade",
            realapp.artifact(app["v2"]),
            "--probation",
            "5",
            "--drain",
            str(int(duration * 3)),
        )
        wait_until(lambda: realapp.live_color(m) == "green", 600, "the switch to green")
        switch_at = time.time()
        m.run(["touch", "/root/load-more"])
        # roll back once the upgrade has passed probation and v1 drains (as an operator
        # would on a bad release; the real app's unpack is slow, the sample's is not)
        wait_until(lambda: realapp.state(m).get("draining"), 300, "the drain of blue")
        time.sleep(max(0.0, t0 + duration * 0.6 - time.time()))
        # green drains until the load ends (its late clients close then), not cut before
        rt, back = realapp.upgrade_in_thread(m, "rollback", "--drain", str(int(duration * 3)))
        wait_until(lambda: realapp.live_color(m) == "blue", 300, "the rollback to blue")
        rollback_at = time.time()
        time.sleep(max(0.0, t0 + duration - time.time()))
        doc = realapp.stop_load(m, "bluegreen")
    after = bluegreen.cpu_snapshot(m)
    t.join(900)
    rt.join(900)
    rb_code, rb = back.get("code"), back.get("out", {})
    upgrade = up.get("out", {})
    steps = {s["step"]: s["at"] for s in upgrade.get("steps", [])}
    fig = figures(
        doc,
        sampler.samples,
        old="blue",
        new="green",
        switch_at=switch_at,
        rollback_at=rollback_at,
    )
    started, probation = upgrade.get("steps", [{}])[0].get("at"), steps.get("probation")
    fig.update(
        switch_ms=upgrade.get("switch_ms"),
        rollback_ms=rb.get("rollback_ms"),
        upgrade_s=round(probation - started, 2) if started and probation else None,
        upgrade_exit_code=up.get("code"),
        rollback_exit_code=rb_code,
        rollback_instant=rb.get("instant"),
        old_version=app["v1"],
        new_version=app["v2"],
    )
    fig.update(
        bluegreen.upgrade_cpu(
            up.get("cpu", {}),
            upgrade.get("steps", []),
            "aipbx-backend@green.service",
            before,
            after,
        )
    )
    return {"figures": fig, "doc": doc}


def upgrade_watched(m: Machine, unit: str, *args: str) -> tuple[threading.Thread, dict[str, Any]]:
    """aipbxctl under bench/cpuwatch.py in a thread: {"code", "out", "cpu"} once it ends."""
    result: dict[str, Any] = {}

    def go() -> None:
        out, cpu = bluegreen.aipbxctl_watched(m, unit, *args)
        result.update(code=out.get("exit_code"), out=out, cpu=cpu)

    t = threading.Thread(target=go)
    t.start()
    return t, result


def wait_other_stopped(m: Machine) -> None:
    """Until green is stopped (blue is live in these runs: the rollback's drain is over)."""
    wait_until(
        lambda: m.run(
            ["systemctl", "is-active", "aipbx-backend@green.service"], check=False
        ).stdout.strip()
        != "active",
        300,
        "the rollback's drain to stop green",
    )


def size(
    m: Machine,
    bound: sizing.Bound = sizing.BOUND,
    plan: sizing.Plan = PLAN,
    log: Any = print,
) -> sizing.Sizing:
    """The sustainable GET rate: steps of the run's HTTP GETs and RTP flows, no switch (the
    Socket.IO clients left out: see the module doc)."""
    wait_other_stopped(m)
    count = iter(range(1000))

    def step(rate: float) -> sizing.StepResult:
        name = f"size-{next(count)}"
        seconds = plan.warmup_s + plan.step_s
        realapp.start_load(m, name, seconds + 60, sio=0, http_rps=rate, udp_flows=UDP_FLOWS)
        time.sleep(seconds)
        result = sizing.step_from_realapp(realapp.stop_load(m, name), rate, seconds)
        if not sizing.held(result, bound):
            time.sleep(3)  # what the app still queues drains before the next step
        return result

    return sizing.search(step, bound, plan, log)


def baseline_figures(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the figures of a run with no switch (those only a switch has are None)."""
    fig = figures(
        doc,
        [],
        old="blue",
        new="blue",
        switch_at=float(doc["stopped_at"]),
        rollback_at=None,
    )
    fig.update(dict.fromkeys(analyze.SWITCH_ONLY))
    fig["old_version"] = None
    return fig


def run_baseline(
    m: Machine, app: Mapping[str, Any], duration: float, http_rps: float
) -> dict[str, Any]:
    """The blue/green run's load (late clients and flows included) for as long, with no
    upgrade."""
    wait_other_stopped(m)
    realapp.start_load(
        m, "baseline", duration + 120, sio=SIO, http_rps=http_rps, udp_flows=UDP_FLOWS
    )
    time.sleep(duration * 0.4)
    m.run(["touch", "/root/load-more"])  # when the blue/green run's switch would come
    time.sleep(duration * 0.6)
    doc = realapp.stop_load(m, "baseline")
    fig = baseline_figures(doc)
    fig["old_version"] = app["v1"]
    return {"figures": fig, "doc": doc}


def run_naive(
    m: Machine, app: Mapping[str, Any], duration: float, http_rps: float
) -> dict[str, Any]:
    """What `docker compose up --force-recreate` does: restart the one live unit in place."""
    wait_other_stopped(m)
    color = realapp.live_color(m) or "blue"
    realapp.start_load(m, "naive", duration + 120, sio=SIO, http_rps=http_rps, udp_flows=UDP_FLOWS)
    with Sampler(m) as sampler:
        time.sleep(min(10.0, duration * 0.25))
        restart_at = time.time()
        m.run(["systemctl", "restart", f"aipbx-backend@{color}.service"], timeout=300)
        # any answer of the app's (its 404, or 429 from its own rate limiter), not nginx's 5xx
        wait_until(
            lambda: realapp.curl(m, "/api/")[0] < 500, 300, "the restarted backend", poll=0.2
        )
        healthy_s = time.time() - restart_at
        time.sleep(max(0.0, restart_at + duration * 0.75 - time.time()))
        doc = realapp.stop_load(m, "naive")
    fig = figures(
        doc, sampler.samples, old=color, new=color, switch_at=restart_at, rollback_at=None
    )
    fig.update(
        switch_ms=round(healthy_s * 1000, 1),
        rollback_ms=None,
        upgrade_s=round(healthy_s, 2),
        udp_pinned_flows=None,
        old_version=app["v1"],
        new_version=f"{app['v1']}-restarted",
    )
    return {"figures": fig, "doc": doc}
