"""The watchdog's state machines, driven by a fake monotonic clock: backoff, the restart
budget, the circuit breaker and the restart policy built from them."""

from __future__ import annotations

import pytest

from appliance.watchdog.backoff import Backoff, RestartBudget
from appliance.watchdog.breaker import Breaker, BreakerState
from appliance.watchdog.restarts import Decision, RestartPolicy

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def test_backoff_doubles_from_initial_and_is_capped() -> None:
    b = Backoff(1, 300)
    assert b.delay() == 0
    assert [b.failed() for _ in range(11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    for _ in range(5000):  # no overflow however long it fails
        b.failed()
    assert b.delay() == 300
    b.reset()
    assert b.delay() == 0 and b.failed() == 1


def test_budget_is_a_sliding_window() -> None:
    budget = RestartBudget(limit=3, window=600)
    for t in (0, 10, 20):
        assert budget.allows(t)
        budget.record(t)
    assert not budget.allows(30)
    assert budget.frees_at(30) == 600
    assert not budget.allows(599.9)
    assert budget.allows(600)  # the event at 0 left the window
    assert budget.used(600) == 2
    assert budget.total == 3


def test_breaker_opens_after_n_consecutive_failures_only() -> None:
    br = Breaker(failures_to_open=3, cooldown=10)
    assert br.record(False, 0) is None
    assert br.record(False, 1) is None
    assert br.record(True, 2) is None  # a success resets the count
    assert br.record(False, 3) is None
    assert br.record(False, 4) is None
    t = br.record(False, 5)
    assert t is not None and (t.old, t.new, t.at, t.failures) == (CLOSED, OPEN, 5, 3)
    assert not br.probing


def test_breaker_cools_down_then_probes_once() -> None:
    br = Breaker(failures_to_open=1, cooldown=10)
    br.record(False, 0)
    assert br.poll(9.9) is None and br.state is OPEN
    t = br.poll(10)
    assert t is not None and t.new is HALF_OPEN and br.probing
    # a failed probe opens it again, for a whole new cool-down
    t = br.record(False, 11)
    assert t is not None and t.new is OPEN
    assert br.poll(20.9) is None
    assert br.poll(21) is not None
    t = br.record(True, 21.5)
    assert t is not None and (t.old, t.new) == (HALF_OPEN, CLOSED)
    assert br.failures == 0


def test_breaker_reset_closes_it() -> None:
    br = Breaker(failures_to_open=1, cooldown=10)
    br.record(False, 0)
    t = br.reset(1)
    assert t is not None and t.new is CLOSED and br.probing
    assert br.reset(2) is None


def policy(budget: int = 5, window: float = 600, cooldown: float = 15) -> RestartPolicy:
    return RestartPolicy("x.service", Backoff(1, 300), RestartBudget(budget, window), cooldown)


def test_policy_restarts_at_once_then_waits_cooldown_or_backoff() -> None:
    p = policy(budget=100, cooldown=15)
    assert p.next_allowed() is None
    assert p.decide(0) is Decision.RESTART
    assert p.decide(14.9) is Decision.WAIT  # cool-down (> backoff of 1 s)
    assert p.decide(15) is Decision.RESTART
    # backoff grows: 1, 2, 4, 8, 16, 32 ... and takes over once it exceeds the cool-down
    now = 15.0
    waits = []
    for _ in range(8):
        nxt = p.next_allowed()
        assert nxt is not None
        assert p.decide(nxt - 0.01) is Decision.WAIT
        waits.append(nxt - now)
        now = nxt
        assert p.decide(now) is Decision.RESTART
    assert waits == [15, 15, 15, 16, 32, 64, 128, 256]


def test_policy_backoff_is_capped() -> None:
    p = policy(budget=1000, cooldown=1)
    now = 0.0
    for _ in range(20):
        assert p.decide(now) is Decision.RESTART
        nxt = p.next_allowed()
        assert nxt is not None
        now = nxt
    assert p.backoff.delay() == 300


def test_policy_stops_past_budget_says_so_once_and_resumes_when_window_frees() -> None:
    p = policy(budget=5, window=600, cooldown=10)
    times = []
    now = 0.0
    while True:
        d = p.decide(now)
        if d is Decision.RESTART:
            times.append(now)
        elif d is Decision.EXHAUSTED:
            break
        now += 1
    assert len(times) == 5
    assert p.exhausted
    # past the budget: quiet until the oldest restart leaves the window
    assert p.decide(now + 1) is Decision.BLOCKED
    assert p.decide(times[0] + 599) is Decision.BLOCKED
    assert p.decide(times[0] + 600) is Decision.RESTART
    assert not p.exhausted


def test_policy_recovery_resets_backoff_but_not_the_budget() -> None:
    p = policy(budget=2, cooldown=5)
    assert p.decide(0) is Decision.RESTART
    assert p.recovered() is True
    assert p.backoff.failures == 0
    assert p.recovered() is False
    assert p.decide(10) is Decision.RESTART
    assert p.decide(20) is Decision.EXHAUSTED
    assert p.recovered() is True
    assert not p.exhausted


@pytest.mark.parametrize("cooldown", [0.2, 15])
def test_policy_never_restarts_within_cooldown_of_the_last(cooldown: float) -> None:
    p = policy(budget=1000, cooldown=cooldown)
    last: float | None = None
    t = 0.0
    while t < 100:
        if p.decide(t) is Decision.RESTART:
            if last is not None:
                assert t - last >= cooldown - 1e-9
            last = t
        t += 0.05
