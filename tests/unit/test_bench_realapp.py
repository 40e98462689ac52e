"""bench/realapp.figures: the demo's figures for the real backend, from the load's report and
the conntrack samples; and bench/demo.claim_failures, which makes the demo fail loudly."""

from __future__ import annotations

from typing import Any

from bench.demo import claim_failures
from bench.realapp import figures


def _doc() -> dict[str, Any]:
    return {
        "started_at": 100.0,
        "stopped_at": 200.0,
        "http": {
            "sent": 1000,
            "failed": 0,
            "fail_reasons": {},
            "statuses": {"404": 600, "200": 400},
            "p99_ms": 12.0,
        },
        "sio": [
            {"client": 0, "late": False, "events": [[101, "connect", "a"], [200, "end", ""]]},
            {
                "client": 1,
                "late": False,
                "events": [[101, "connect", "b"], [150, "disconnect", ""], [151, "connect", "c"]],
            },
            {"client": 2, "late": True, "events": [[131, "connect", "d"]]},
        ],
        "udp": [
            {"port": 4001, "fresh": False, "started": 100.5, "sent": 10},
            {"port": 4002, "fresh": False, "started": 100.5, "sent": 10},
            {"port": 4003, "fresh": True, "started": 131.0, "sent": 10},
            {"port": 4004, "fresh": True, "started": 170.0, "sent": 10},  # after the rollback
        ],
    }


def _samples() -> list[dict[str, Any]]:
    out = []
    for t in range(100, 200):
        udp: dict[Any, str] = {4001: "blue", "4002": "blue" if t < 140 else "green"}
        if t >= 132:
            udp[4003] = "green"
        out.append({"at": float(t), "udp": udp, "ws": {"blue": 2, "green": 0}})
    return out


def test_figures_from_the_load_and_conntrack() -> None:
    fig = figures(_doc(), _samples(), old="blue", new="green", switch_at=130.0, rollback_at=160.0)
    assert fig["http_ok"] == 1000 and fig["http_failed"] == 0
    assert fig["ws_open_at_start"] == 2 and fig["ws_kept"] == 1 and fig["ws_dropped"] == 1
    # 4002 moved to green while blue was still up: not pinned
    assert fig["udp_flows_before_switch"] == 2 and fig["udp_pinned_flows"] == 1
    assert fig["new_flows_on_new_color"] == 1 and fig["new_flows_after_switch"] == 1
    assert fig["udp_pinned_lost"] is None and fig["writes_lost"] is None


def test_claim_failures_names_what_broke() -> None:
    fig = figures(_doc(), _samples(), old="blue", new="green", switch_at=130.0, rollback_at=160.0)
    broken = claim_failures(fig)
    assert "ws_dropped = 1" in broken
    assert "udp_pinned_flows = 1 of 2" in broken
    ok = {**fig, "ws_dropped": 0, "udp_pinned_flows": 2, "upgrade_exit_code": 0}
    assert claim_failures(ok) == []
    assert claim_failures({**ok, "http_failed": 3}) == ["http_failed = 3"]
