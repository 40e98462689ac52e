"""`make bench-tls`'s keep-alive load sized to this host (issue 11, item 14): the renewal runs
offer --share of the sustainable rate, measured first with the same load (the same
connections and requests, the certificate through the variable path, no renewal) in steps
(bench/sizing.py), instead of a fixed rate the host may not carry. Client and server share
the host's CPUs, so the rate found is the pair's."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path

from bench import sizing, tls

PLAN = sizing.Plan(start=250.0, max_rate=8000.0, min_rate=25.0, step_s=5.0, warmup_s=0.0)


def percentile_ms(sorted_s: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted latencies in seconds, in ms."""
    if not sorted_s:
        return None
    rank = max(1, -(-len(sorted_s) * q // 100))
    return round(1000 * sorted_s[int(rank) - 1], 2)


def size(
    root: Path,
    pki: tls.Pki,
    key: Path,
    gid: int,
    args: argparse.Namespace,
    log: Callable[[str], None] = tls.log,
    plan: sizing.Plan = PLAN,
) -> sizing.Sizing:
    """Steps of the renewal runs' load against a private nginx serving the certificate
    through the variable path, with no renewal."""
    port = tls.free_ports(1)[0]
    live = root / "size" / "live"
    tls.install_pair(live, pki.leaf(key), gid)
    http = tls.tls_map("aipbx_tls_dir", live) + tls.ssl_server(
        port, "$aipbx_tls_dir/fullchain.pem", "$aipbx_tls_dir/privkey.pem", " http2"
    )
    nginx = tls.Nginx(root / "size", http, args.workers)

    def step(rate: float) -> sizing.StepResult:
        a = argparse.Namespace(**{**vars(args), "rate": rate, "duration": plan.step_s})
        ctx = tls.client_context(pki.ca)
        load, _ = asyncio.run(tls.drive("swap", nginx, port, ctx, live, [], gid, a))
        return sizing.StepResult(
            rate=rate,
            seconds=plan.step_s,
            sent=load.sent,
            failed=sum(load.failed.values()),
            p50_ms=percentile_ms(load.latencies, 50),
            p99_ms=percentile_ms(load.latencies, 99),
            fail_reasons=dict(load.failed),
        )

    try:
        nginx.start([port])
        log(f"sizing: {args.connections} connections, steps of {plan.step_s:g} s")
        return sizing.search(step, sizing.BOUND, plan, log)
    finally:
        nginx.stop()
