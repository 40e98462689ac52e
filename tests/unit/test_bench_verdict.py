"""bench/shares.py (sized runs, the report, the table) and bench/demo.judge (the exit code):
a promised zero that is not zero fails the demo, and a baseline that fails on its own says the
box is overloaded instead."""

from __future__ import annotations

from typing import Any

from bench import demo, shares, sizing


def clean(**kw: Any) -> dict[str, Any]:
    """Blue/green figures where every promised zero held."""
    return {
        "http_ok": 1000,
        "http_failed": 0,
        "http_p50_ms": 4.0,
        "http_p99_ms": 30.0,
        "ws_kept": 50,
        "ws_dropped": 0,
        "udp_pinned_flows": 20,
        "udp_flows_before_switch": 20,
        "udp_pinned_lost": 0,
        "new_flows_on_new_color": 3,
        "new_flows_after_switch": 3,
        "writes_acked": 1000,
        "writes_lost": 0,
        "upgrade_exit_code": 0,
        "rollback_exit_code": 0,
        **kw,
    }


def base(**kw: Any) -> dict[str, Any]:
    """Baseline figures (no switch): what only a switch has is None."""
    return {**clean(**kw), "udp_pinned_flows": None, "new_flows_on_new_color": None}


def found(rate: float, tried: list[tuple[float, bool]] | None = None) -> sizing.Sizing:
    steps = tuple(
        sizing.StepResult(r, 5, int(r * 5), 0 if ok else 5, 3.0, 20.0 if ok else 900.0)
        for r, ok in (tried or [(rate, True), (rate * 2, False)])
    )
    return sizing.Sizing(sizing.BOUND, sizing.PLAN, steps, rate)


def outcome(*runs: tuple[float, dict[str, Any], dict[str, Any]], rate: float = 200) -> Any:
    out = shares.Outcome(found(rate), "writes/s", 40)
    for i, (share, b, g) in enumerate(runs):
        naive = {"figures": clean(http_failed=800)} if i == 0 else None
        out.runs.append(
            shares.ShareRun(
                share, sizing.rate_for(rate, share), {"figures": b}, {"figures": g}, naive
            )
        )
    return out


def doc(*runs: tuple[float, dict[str, Any], dict[str, Any]], rate: float = 200) -> Any:
    return shares.report_doc(outcome(*runs, rate=rate), demo.SAMPLE_LOAD)


def test_every_zero_held() -> None:
    assert demo.judge(doc((0.5, base(), clean()), (0.8, base(), clean()))) == (0, [])


def test_a_failed_request_under_the_switch_is_a_failed_claim() -> None:
    code, lines = demo.judge(doc((0.5, base(), clean(http_failed=3, ws_dropped=1))))
    assert code == demo.EXIT_CLAIM_FAILED == 1
    assert lines[0].startswith("CLAIM FAILED: blue/green at 50 % of the sustainable rate")
    assert "(100 writes/s)" in lines[0]
    assert "http_failed = 3" in lines[0] and "ws_dropped = 1" in lines[0]


def test_unpinned_flows_and_a_failed_aipbxctl_fail_the_claim() -> None:
    fig = clean(udp_pinned_flows=17, new_flows_on_new_color=2, upgrade_exit_code=1)
    code, lines = demo.judge(doc((0.5, base(), fig)))
    assert code == 1
    assert "udp_pinned_flows = 17 of 20" in lines[0]
    assert "a new call flow did not reach the new color" in lines[0]
    assert "aipbxctl upgrade exited 1" in lines[0]


def test_a_failing_baseline_is_overload_not_a_failed_claim() -> None:
    code, lines = demo.judge(doc((0.5, base(http_failed=40), clean(http_failed=900))))
    assert code == demo.EXIT_OVERLOADED == 3
    assert lines[0].startswith("OVERLOADED: at 50 %")
    assert "the baseline with no upgrade failed too (http_failed = 40" in lines[0]
    assert "blue/green: http_failed = 900" in lines[0]


def test_a_failed_claim_wins_over_overload_at_another_share() -> None:
    code, lines = demo.judge(
        doc((0.5, base(), clean(writes_lost=1)), (0.8, base(ws_dropped=2), clean()))
    )
    assert code == 1
    assert [line.split(":")[0] for line in lines] == ["CLAIM FAILED", "OVERLOADED"]


def test_nothing_sustainable_is_overload() -> None:
    empty = shares.report_doc(
        shares.Outcome(found(0, [(25, False), (12, False)]), "writes/s", 40), demo.SAMPLE_LOAD
    )
    code, lines = demo.judge(empty)
    assert code == 3
    assert lines[0].startswith("OVERLOADED: no rate down to 12")


def test_a_slow_baseline_is_noted_not_failed() -> None:
    code, lines = demo.judge(doc((0.5, base(http_p99_ms=400.0), clean())))
    assert code == 0
    assert lines[0].startswith("note at 50 %") and "400 ms" in lines[0]


def test_baseline_failures() -> None:
    assert demo.baseline_failures(base()) == []
    assert demo.baseline_failures(base(http_failed=1, writes_lost=2)) == [
        "http_failed = 1",
        "writes_lost = 2",
    ]


def test_run_all_sizes_first_and_runs_each_share_at_its_rate() -> None:
    calls: list[tuple[str, float, float]] = []

    def run(kind: str) -> Any:
        def go(duration: float, rate: float) -> dict[str, Any]:
            calls.append((kind, duration, rate))
            return {"figures": clean()}

        return go

    driver = shares.Driver(
        unit="writes/s",
        size=lambda: found(283),
        baseline=run("baseline"),
        bluegreen=run("bluegreen"),
        naive=run("naive"),
    )
    said: list[str] = []
    out = shares.run_all(driver, [0.5, 0.8], 40, said.append)
    assert calls == [
        ("baseline", 40, 141),
        ("bluegreen", 40, 141),
        ("naive", 20, 141),  # the naive restart at the headline share only
        ("baseline", 40, 226),
        ("bluegreen", 40, 226),
    ]
    assert [(r.share, r.rate) for r in out.runs] == [(0.5, 141), (0.8, 226)]
    assert any("sustainable rate: 283 writes/s" in s for s in said)


def test_run_all_runs_nothing_when_nothing_is_sustainable() -> None:
    def never(duration: float, rate: float) -> dict[str, Any]:
        raise AssertionError("no run on an overloaded box")

    driver = shares.Driver("writes/s", lambda: found(0, [(3, False)]), never, never, never)
    assert shares.run_all(driver, [0.5], 40, lambda _s: None).runs == []


def test_the_report_keeps_the_headline_at_its_top_level() -> None:
    d = doc((0.5, base(), clean(http_ok=111)), (0.8, base(), clean(http_ok=222)))
    assert d["http_ok"] == 111  # the keys build/bench/upgrade.json always had
    assert d["naive_restart"]["http_failed"] == 800
    assert d["baseline"]["http_ok"] == 1000
    assert d["load"]["http_rps"] == 100 and d["load"]["share"] == 0.5
    assert d["load"]["sustainable_rps"] == 200 and d["load"]["ws"] == 50
    assert [(r["share"], r["http_rps"]) for r in d["runs"]] == [(0.5, 100), (0.8, 160)]
    assert d["sizing"]["sustainable_rps"] == 200


def test_the_table_puts_each_baseline_beside_its_blue_green_run() -> None:
    d = doc((0.5, base(), clean()), (0.8, base(), clean()))
    assert list(shares.columns(d)) == [
        "baseline 50 %",
        "blue/green 50 %",
        "naive 50 %",
        "baseline 80 %",
        "blue/green 80 %",
    ]
    text = shares.render(d)
    assert text.startswith("sustainable rate: 200 writes/s (p99 <= 250 ms")
    assert "  share 50 %: 100 writes/s" in text and "  share 80 %: 160 writes/s" in text


def test_cpu_lines() -> None:
    cpu = {
        "upgrade_cpu_s": 3.3,
        "aipbxctl_cpu_s": 2.5,
        "aipbxctl_cpu_until_switch_s": 1.7,
        "new_color_cpu_until_switch_s": 0.8,
        "share_of_capacity_pct": 4.12,
        "share_of_machine_cpu_pct": 7.76,
        "run": {"cpus": 2, "wall_s": 40.0, "host_busy_pct": 75.0},
        "drain_cpu_s": 0.7,
        "drain_wall_s": 10.0,
        "drain_cpu_per_s": 0.07,
        "phases": [
            {"from": "start", "to": "verify", "wall_s": 1.0, "cpu_s": 0.3},
            {"from": "verify", "to": "unpack", "wall_s": 2.0, "cpu_s": 0.8},
        ],
    }
    d = doc((0.5, base(), clean(upgrade_cpu=cpu)))
    lines = shares.cpu_lines(d)
    assert lines[0].startswith("upgrade CPU at 50 %: 3.30 s = aipbxctl and what it ran 2.50 s")
    assert "4.1 % of 2 CPUs x 40 s" in lines[0]
    assert lines[1] == (
        "  while the old color drained (10.0 s, until the rollback): aipbxctl 0.70 s CPU, "
        "70 ms per second"
    )
    assert lines[2] == (
        "  aipbxctl CPU/wall by step: start->verify 0.30s/1.0s, verify->unpack 0.80s/2.0s"
    )
