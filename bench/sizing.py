"""Size a bench's load to the machine it runs on: measure the sustainable rate first, then
load a stated share of it (issue 11, item 14).

A fixed load (the demo's 500 writes/s) measured overload on a 2-core box, not the switch.
So, in the same run and on the machine as it is, a few short steps of the run's own request
mix (no switch) find the highest rate that stays within a stated bound; the run then offers
`share` x that rate (LOAD_SHARE, e.g. 0.5 for the headline and 0.8 as a second figure).

The search (pure, `next_rate`): start at `Plan.start`, multiply by `Plan.factor` while a step
holds the bound; after the first step over it, bisect (geometric mean) between the highest
rate that held and the lowest that did not, until they are within `Plan.precision` of each
other. If the very first step fails, divide until one holds or `Plan.min_rate` is passed.
The sustainable rate is the highest rate that held with no failed step below it; 0 when
none held (the box cannot carry even the lowest rate: overloaded).

A step holds the bound when nothing failed (no failed request, no dropped WebSocket, UDP
loss within `Bound.udp_loss`) and the p99 latency of the requests due after the step's
warm-up is at most `Bound.p99_ms`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Bound:
    """What a sustainable rate must hold for a whole step."""

    p99_ms: float = 250.0
    failed: int = 0  # failed requests (timeouts, connection errors, 5xx)
    ws_drops: int = 0
    udp_loss: float = 0.01  # fraction of UDP packets not answered

    def describe(self) -> str:
        return (
            f"p99 <= {self.p99_ms:g} ms, {self.failed} failed requests, "
            f"{self.ws_drops} dropped WebSockets, UDP loss <= {self.udp_loss:.0%}"
        )


@dataclass(frozen=True)
class Plan:
    """How the rates are stepped through (requests per second)."""

    start: float = 25.0
    factor: float = 2.0
    max_rate: float = 3200.0
    min_rate: float = 3.0
    precision: float = 1.15  # stop when highest-failed / highest-held <= this
    max_steps: int = 10
    step_s: float = 5.0  # seconds measured per step, after the warm-up
    warmup_s: float = 1.0


@dataclass(frozen=True)
class StepResult:
    """One step: `rate` offered for `seconds`, what came back."""

    rate: float
    seconds: float
    sent: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    ws_drops: int = 0
    udp_sent: int = 0
    udp_lost: int = 0
    fail_reasons: Mapping[str, int] = field(default_factory=dict)
    statuses: Mapping[str, int] = field(default_factory=dict)  # answers by HTTP status


BOUND = Bound()
PLAN = Plan()


def violations(step: StepResult, bound: Bound) -> list[str]:
    """Pure: how the step broke the bound, as phrases ([] when it held)."""
    out = []
    if step.failed > bound.failed:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(step.fail_reasons.items()))
        out.append(f"{step.failed} failed" + (f" ({reasons})" if reasons else ""))
    if step.ws_drops > bound.ws_drops:
        out.append(f"{step.ws_drops} WebSockets dropped")
    if step.udp_sent and step.udp_lost / step.udp_sent > bound.udp_loss:
        out.append(f"UDP loss {step.udp_lost / step.udp_sent:.1%}")
    if step.sent == 0:
        out.append("nothing was sent")
    elif step.p99_ms is None:
        out.append("no request answered")
    elif step.p99_ms > bound.p99_ms:
        out.append(f"p99 {step.p99_ms:.0f} ms")
    return out


def held(step: StepResult, bound: Bound) -> bool:
    return not violations(step, bound)


def _round(rate: float) -> float:
    """Rates as an operator would write them: whole numbers from 10/s up."""
    return float(round(rate)) if rate >= 10 else round(rate, 1)


def next_rate(plan: Plan, tried: Sequence[tuple[float, bool]]) -> float | None:
    """Pure: the next rate to try after `tried` ((rate, held) in order), or None when done."""
    if not tried:
        return _round(plan.start)
    if len(tried) >= plan.max_steps:
        return None
    failed = [r for r, ok in tried if not ok]
    lo = sustainable_of(tried)
    above = [r for r in failed if r > lo]
    if lo == 0:  # nothing held yet: go down
        nxt = _round(min(failed) / plan.factor)
        return nxt if nxt >= plan.min_rate and nxt not in (r for r, _ in tried) else None
    if not above:  # nothing failed above the best: go up
        if lo >= plan.max_rate:
            return None
        return _round(min(lo * plan.factor, plan.max_rate))
    hi = min(above)
    if hi / lo <= plan.precision:
        return None
    nxt = _round(math.sqrt(lo * hi))
    return nxt if lo < nxt < hi else None


def sustainable_of(tried: Sequence[tuple[float, bool]]) -> float:
    """Pure: the highest rate that held with no failed rate at or below it (0.0 if none)."""
    lowest_failed = min((r for r, ok in tried if not ok), default=math.inf)
    return max((r for r, ok in tried if ok and r < lowest_failed), default=0.0)


@dataclass(frozen=True)
class Sizing:
    """The outcome of a search: what was tried and the sustainable rate."""

    bound: Bound
    plan: Plan
    steps: tuple[StepResult, ...]
    sustainable: float

    def as_dict(self) -> dict[str, Any]:
        tried = [
            {
                **asdict(s),
                "fail_reasons": dict(s.fail_reasons),
                "statuses": dict(s.statuses),
                "held": held(s, self.bound),
            }
            for s in self.steps
        ]
        for row, s in zip(tried, self.steps, strict=True):
            row["violations"] = violations(s, self.bound)
        return {
            "sustainable_rps": self.sustainable,
            "capped": self.capped,
            "bound": asdict(self.bound),
            "bound_text": self.bound.describe(),
            "plan": asdict(self.plan),
            "steps": tried,
        }

    @property
    def capped(self) -> bool:
        """The plan's highest rate held: the box carries at least that, maybe more."""
        return self.sustainable >= self.plan.max_rate

    def describe(self, unit: str = "requests/s") -> str:
        steps = ", ".join(
            f"{s.rate:g} {'ok' if held(s, self.bound) else 'over'}" for s in self.steps
        )
        least = "at least " if self.capped else ""
        return (
            f"sustainable rate: {least}{self.sustainable:g} {unit} ({self.bound.describe()}, "
            f"{self.plan.step_s:g} s steps; tried {steps})"
        )


def search(
    run_step: Callable[[float], StepResult],
    bound: Bound = BOUND,
    plan: Plan = PLAN,
    log: Callable[[str], None] = lambda _s: None,
) -> Sizing:
    """Run steps as next_rate says (the thin part: run_step offers a rate and measures it)."""
    steps: list[StepResult] = []
    tried: list[tuple[float, bool]] = []
    while (rate := next_rate(plan, tried)) is not None:
        step = run_step(rate)
        steps.append(step)
        tried.append((rate, held(step, bound)))
        why = violations(step, bound)
        log(
            f"  {rate:g}/s: p99 {step.p99_ms} ms, {step.failed} failed"
            + (f" -> over the bound: {'; '.join(why)}" if why else " -> held")
        )
    return Sizing(bound, plan, tuple(steps), sustainable_of(tried))


# -- shares


def parse_shares(text: str) -> list[float]:
    """LOAD_SHARE ("0.5,0.8", or percentages "50,80") as fractions in (0, 1], in the order
    given, without repeats; ValueError with what is wrong."""
    out: list[float] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        pct = part.endswith("%")
        try:
            value = float(part.rstrip("%"))
        except ValueError:
            raise ValueError(f"LOAD_SHARE: {part!r} is not a number") from None
        if pct or value > 1:
            value /= 100
        if not 0 < value <= 1 or not math.isfinite(value):
            raise ValueError(f"LOAD_SHARE: {part!r} is not a share in (0, 1] (or 1-100 %)")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("LOAD_SHARE: no share given (e.g. 0.5,0.8)")
    return out


def rate_for(sustainable: float, share: float) -> float:
    """Pure: the rate offered at `share` of the sustainable rate: rounded down (whole
    numbers from 10/s up, tenths below), never above the share, at least 0.1/s; 0 when
    nothing is sustainable."""
    if sustainable <= 0:
        return 0.0
    raw = sustainable * share
    rate = float(math.floor(raw)) if raw >= 10 else math.floor(raw * 10) / 10
    return max(rate, 0.1)


def pct(share: float) -> str:
    return f"{share * 100:g} %"


# -- steps from the load generators' reports


def step_from_load(doc: Mapping[str, Any], rate: float, seconds: float) -> StepResult:
    """bench/load.py's report of one step (run with --warmup-s): latency over the requests
    due after the warm-up, failures over the whole step."""
    s = doc["summary"]
    p50 = s.get("http_p50_ms_after_warmup", s.get("http_p50_ms"))
    p99 = s.get("http_p99_ms_after_warmup", s.get("http_p99_ms"))
    return StepResult(
        rate=rate,
        seconds=seconds,
        sent=int(s["http_sent"]),
        failed=int(s["http_failed"]),
        p50_ms=None if p50 is None else float(p50),
        p99_ms=None if p99 is None else float(p99),
        ws_drops=int(s.get("ws_drops", 0)),
        udp_sent=int(s.get("udp_sent", 0)),
        udp_lost=int(s.get("udp_lost", 0)),
        fail_reasons={str(k): int(v) for k, v in s.get("http_fail_reasons", {}).items()},
    )


def step_from_realapp(doc: Mapping[str, Any], rate: float, seconds: float) -> StepResult:
    """tests/system/realapp_load.py's report of one step: its p99 covers the whole step
    (it records no times per request), a stricter measure than after a warm-up. A
    Socket.IO disconnect, or a client that never connected, is a dropped WebSocket; RTP
    gets no replies to count. Every
    answer below 500 is one (the app's own 404 and 429 too, as in the claim); `statuses`
    keeps the mix: the app throttles /api/ routes to 100 a minute per client address, and
    all of them come from nginx, so at these rates most of those are a quick 429."""
    http = doc["http"]
    clients = doc.get("sio", [])
    drops = sum(1 for c in clients for e in c["events"] if e[1] == "disconnect")
    drops += sum(1 for c in clients if not any(e[1] == "connect" for e in c["events"]))
    return StepResult(
        rate=rate,
        seconds=seconds,
        sent=int(http["sent"]),
        failed=int(http["failed"]),
        p50_ms=http.get("p50_ms"),
        p99_ms=http.get("p99_ms"),
        ws_drops=drops,
        fail_reasons={str(k): int(v) for k, v in http.get("fail_reasons", {}).items()},
        statuses={str(k): int(v) for k, v in http.get("statuses", {}).items()},
    )
