"""bench/sizing.py: the rate search, the bound, the shares, and reading a step's report."""

from __future__ import annotations

from typing import Any

import pytest

from bench import sizing as sz


def step(rate: float, *, p99: float | None = 20.0, failed: int = 0, **kw: Any) -> sz.StepResult:
    return sz.StepResult(
        rate=rate, seconds=5, sent=int(rate * 5), failed=failed, p50_ms=5.0, p99_ms=p99, **kw
    )


def machine(capacity: float) -> Any:
    """A box whose latency stays low up to `capacity` requests/s and explodes above."""

    def run(rate: float) -> sz.StepResult:
        return step(rate, p99=30.0 if rate <= capacity else 1800.0)

    return run


def test_search_ramps_up_then_bisects_to_within_the_precision() -> None:
    plan = sz.Plan(start=25, factor=2, precision=1.15, max_steps=20)
    found = sz.search(machine(300), sz.Bound(), plan)
    rates = [s.rate for s in found.steps]
    assert rates[:5] == [25, 50, 100, 200, 400]  # doubling until the first step over
    assert 300 / 1.15 <= found.sustainable <= 300
    over = min(r for r in rates if r > 300)
    assert over / found.sustainable <= 1.15
    # every rate after the ramp lies between what held and what did not
    assert all(200 < r < 400 for r in rates[5:])


def test_the_sustainable_rate_is_one_that_held() -> None:
    found = sz.search(machine(130), sz.Bound(), sz.Plan(start=10))
    held = {s.rate for s in found.steps if sz.held(s, found.bound)}
    assert found.sustainable in held and found.sustainable <= 130


def test_a_busy_box_goes_below_the_start() -> None:
    found = sz.search(machine(7), sz.Bound(), sz.Plan(start=25, min_rate=3))
    assert [s.rate for s in found.steps][:3] == [25, 12, 6]
    assert 0 < found.sustainable <= 7


def test_nothing_sustainable_is_zero_and_stops_at_the_lowest_rate() -> None:
    found = sz.search(machine(0.5), sz.Bound(), sz.Plan(start=25, min_rate=3))
    assert found.sustainable == 0.0
    assert min(s.rate for s in found.steps) >= 3
    assert "sustainable rate: 0" in found.describe()


def test_the_search_stops_at_max_rate_and_max_steps() -> None:
    found = sz.search(machine(1e9), sz.Bound(), sz.Plan(start=100, max_rate=500))
    assert [s.rate for s in found.steps] == [100, 200, 400, 500]
    assert found.sustainable == 500
    assert found.capped and "sustainable rate: at least 500 requests/s" in found.describe()
    few = sz.search(machine(300), sz.Bound(), sz.Plan(start=25, max_steps=3))
    assert len(few.steps) == 3


def test_next_rate_is_pure_and_starts_at_the_plan() -> None:
    plan = sz.Plan(start=25)
    assert sz.next_rate(plan, []) == 25
    assert sz.next_rate(plan, [(25, True)]) == 50
    assert sz.next_rate(plan, [(25, True), (50, False)]) == 35  # sqrt(25 * 50)
    assert sz.next_rate(plan, [(25, True), (50, False), (35, True), (42, False), (38, True)]) in (
        40,
        None,
    )
    assert sz.next_rate(plan, [(100, True), (110, False)]) is None  # within 1.15


def test_a_noisy_step_below_a_held_one_caps_the_rate() -> None:
    # 200 held, 400 failed, then 283 failed: 200 stays the best; a held rate above a failed
    # one (noise) never counts
    assert sz.sustainable_of([(100, True), (200, True), (400, False), (283, False)]) == 200
    assert sz.sustainable_of([(100, True), (150, False), (200, True)]) == 100
    assert sz.sustainable_of([]) == 0.0


@pytest.mark.parametrize(
    ("result", "phrase"),
    [
        (step(100, failed=2, fail_reasons={"timeout": 2}), "2 failed (timeout 2)"),
        (step(100, ws_drops=1), "1 WebSockets dropped"),
        (step(100, udp_sent=1000, udp_lost=50), "UDP loss 5.0%"),
        (step(100, p99=251.0), "p99 251 ms"),
        (step(100, p99=None), "no request answered"),
    ],
)
def test_each_way_to_break_the_bound_is_named(result: sz.StepResult, phrase: str) -> None:
    assert phrase in sz.violations(result, sz.Bound())
    assert not sz.held(result, sz.Bound())


def test_within_the_bound() -> None:
    ok = step(100, p99=250.0, udp_sent=1000, udp_lost=10)
    assert sz.violations(ok, sz.Bound()) == []
    assert sz.violations(ok, sz.Bound(p99_ms=100)) == ["p99 250 ms"]


def test_parse_shares() -> None:
    assert sz.parse_shares("0.5,0.8") == [0.5, 0.8]
    assert sz.parse_shares("50, 80%") == [0.5, 0.8]
    assert sz.parse_shares("0.5,50") == [0.5]  # the same share once
    assert sz.parse_shares("1") == [1.0]
    for bad in ("", "0", "-0.5", "abc", "150", "nan"):
        with pytest.raises(ValueError, match="LOAD_SHARE"):
            sz.parse_shares(bad)


def test_rate_for_a_share_never_exceeds_it() -> None:
    assert sz.rate_for(283, 0.5) == 141
    assert sz.rate_for(283, 0.8) == 226
    assert sz.rate_for(7, 0.5) == 3.5
    assert sz.rate_for(0.1, 0.5) == 0.1  # the floor of what can be offered
    assert sz.rate_for(0, 0.5) == 0.0
    assert sz.pct(0.5) == "50 %"


def test_step_from_load_uses_the_latency_after_the_warmup() -> None:
    doc = {
        "summary": {
            "http_sent": 500,
            "http_failed": 1,
            "http_fail_reasons": {"timeout": 1},
            "http_p50_ms": 9.0,
            "http_p99_ms": 900.0,  # the warm-up's TLS handshakes
            "http_p50_ms_after_warmup": 4.0,
            "http_p99_ms_after_warmup": 40.0,
            "ws_drops": 0,
            "udp_sent": 1000,
            "udp_lost": 3,
        }
    }
    s = sz.step_from_load(doc, 100, 5)
    assert (s.sent, s.failed, s.p50_ms, s.p99_ms, s.udp_lost) == (500, 1, 4.0, 40.0, 3)
    assert s.fail_reasons == {"timeout": 1}


def test_step_from_realapp_counts_socketio_disconnects_as_drops() -> None:
    doc = {
        "http": {
            "sent": 60,
            "failed": 0,
            "fail_reasons": {},
            "statuses": {"200": 40, "429": 20},
            "p50_ms": 12.0,
            "p99_ms": 80.0,
        },
        "sio": [
            {"events": [[1, "connect", "a"], [2, "disconnect", ""], [3, "end", ""]]},
            {"events": [[1, "connect", "b"], [3, "end", ""]]},
            {"events": [[1, "connect-failed", "timeout"]]},  # never connected
        ],
    }
    s = sz.step_from_realapp(doc, 10, 6)
    assert (s.sent, s.p99_ms, s.ws_drops) == (60, 80.0, 2)
    assert s.statuses == {"200": 40, "429": 20} and sz.held(s, sz.Bound()) is False


def test_sizing_as_dict_says_why_each_step_was_over() -> None:
    found = sz.search(machine(300), sz.Bound(), sz.Plan(start=200, max_steps=2))
    d = found.as_dict()
    assert d["sustainable_rps"] == 200
    assert [(s["rate"], s["held"]) for s in d["steps"]] == [(200, True), (400, False)]
    assert d["steps"][1]["violations"] == ["p99 1800 ms"]
    assert "p99 <= 250 ms" in d["bound_text"]
