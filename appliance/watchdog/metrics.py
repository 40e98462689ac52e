"""/metrics: the /system-health document in Prometheus' text exposition format (0.0.4).
Pure: the same dict in, text out, so the two endpoints never disagree."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.watchdog.breaker import BreakerState
from appliance.watchdog.model import Status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class _Doc:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(f"{name}{labels} {_number(v)}" for labels, v in samples)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(health: dict[str, Any]) -> str:
    checks: dict[str, dict[str, Any]] = health["checks"]
    restarts: dict[str, dict[str, Any]] = health["restarts"]
    alerts: dict[str, dict[str, Any]] = health.get("alerts", {})
    d = _Doc()
    d.family(
        "aipbx_check_up",
        "gauge",
        "1 when the check answers (ok or warning), 0 when it is critical; idle checks and "
        "those the watchdog could not run (unknown) have none.",
        (
            (_labels(check=n), 0 if c["state"] == Status.CRITICAL else 1)
            for n, c in checks.items()
            if c["state"] not in (Status.IDLE, Status.UNKNOWN)
        ),
    )
    d.family(
        "aipbx_check_latency_seconds",
        "gauge",
        "How long the last run of the check took.",
        (
            (_labels(check=n), c["latency_ms"] / 1000.0)
            for n, c in checks.items()
            if c["latency_ms"] is not None and c["state"] != Status.IDLE
        ),
    )
    own = health.get("watchdog")
    if own is not None:
        d.family(
            "aipbx_watchdog_impaired",
            "gauge",
            "1 while the watchdog cannot run some of its checks (its own fault: no file "
            "descriptor, memory, thread or process); it restarts nothing meanwhile.",
            [("", int(own["state"] != "ok"))],
        )
    d.family(
        "aipbx_check_state",
        "gauge",
        "The check's state, one series per possible state (1 for the current one).",
        (
            (_labels(check=n, state=str(s)), int(c["state"] == s))
            for n, c in checks.items()
            for s in Status
        ),
    )
    d.family(
        "aipbx_breaker_state",
        "gauge",
        "The check's circuit breaker, one series per state (1 for the current one).",
        (
            (_labels(check=n, state=str(s)), int(c["breaker"] == s))
            for n, c in checks.items()
            for s in BreakerState
        ),
    )
    d.family(
        "aipbx_restarts_total",
        "counter",
        "Restarts of the unit by the watchdog since it started.",
        ((_labels(unit=u), r["total"]) for u, r in restarts.items()),
    )
    d.family(
        "aipbx_restart_budget_exhausted",
        "gauge",
        "1 while the unit is over its restart budget (the watchdog only probes it).",
        ((_labels(unit=u), int(r["exhausted"])) for u, r in restarts.items()),
    )
    d.family(
        "aipbx_alert_channel_enabled",
        "gauge",
        "1 when the alert channel is configured.",
        ((_labels(channel=ch), int(a["enabled"])) for ch, a in alerts.items()),
    )
    for key, kind, help_ in (
        ("sent", "counter", "Alerts delivered."),
        ("failed", "counter", "Failed delivery attempts (each is retried)."),
        ("dropped", "counter", "Alerts dropped because the channel's queue was full."),
        ("queued", "gauge", "Alerts waiting to be delivered."),
    ):
        suffix = "_total" if kind == "counter" else ""
        d.family(
            f"aipbx_alerts_{key}{suffix}",
            kind,
            help_,
            ((_labels(channel=ch), a[key]) for ch, a in alerts.items()),
        )
    return d.text()
