"""/metrics rendering (Prometheus text format), the API's loopback fence, and the health
section of `aipbxctl status`."""

from __future__ import annotations

import re
from typing import Any

from appliance.actions.status import format_health
from appliance.watchdog.api import is_loopback
from appliance.watchdog.metrics import render

HEALTH: dict[str, Any] = {
    "status": "critical",
    "live_color": "blue",
    "checks": {
        "backend_http": {
            "state": "critical",
            "breaker": "open",
            "latency_ms": 2000.0,
            "error": 'no answer "within" 2 s',
            "detail": "",
            "since": None,
            "unit": "aipbx-backend@blue.service",
            "failures": 3,
        },
        "nginx": {
            "state": "ok",
            "breaker": "closed",
            "latency_ms": 0.4,
            "error": "",
            "detail": "",
            "since": None,
            "unit": "nginx.service",
            "failures": 0,
        },
        "pgbouncer": {
            "state": "idle",
            "breaker": "closed",
            "latency_ms": None,
            "error": "",
            "detail": "not set up",
            "since": None,
            "unit": "aipbx-pgbouncer.service",
            "failures": 0,
        },
    },
    "restarts": {
        "aipbx-backend@blue.service": {"total": 2, "exhausted": False},
        "nginx.service": {"total": 0, "exhausted": True},
    },
    "alerts": {
        "telegram": {
            "enabled": True,
            "reason": "",
            "queued": 1,
            "sent": 3,
            "failed": 2,
            "dropped": 0,
            "last_error": "",
        },
        "email": {
            "enabled": False,
            "reason": "alerts.smtp_host not set",
            "queued": 0,
            "sent": 0,
            "failed": 0,
            "dropped": 0,
            "last_error": "",
        },
    },
}

SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="(?:[^"\\]|\\.)*"(,[a-z_]+="(?:[^"\\]|\\.)*")*\})? \S+$')


def samples(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = value
    return out


def test_every_line_is_valid_exposition_format() -> None:
    text = render(HEALTH)
    assert text.endswith("\n")
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter")
            assert name not in names, f"{name} declared twice"
            names.add(name)
        elif not line.startswith("# HELP "):
            assert SAMPLE.match(line), line


def test_the_required_series_are_there() -> None:
    s = samples(render(HEALTH))
    assert s['aipbx_check_up{check="backend_http"}'] == "0"
    assert s['aipbx_check_up{check="nginx"}'] == "1"
    assert 'aipbx_check_up{check="pgbouncer"}' not in s  # idle: no up/down
    assert s['aipbx_check_latency_seconds{check="backend_http"}'] == "2.0"
    assert float(s['aipbx_check_latency_seconds{check="nginx"}']) == 0.0004
    assert s['aipbx_breaker_state{check="backend_http",state="open"}'] == "1"
    assert s['aipbx_breaker_state{check="backend_http",state="closed"}'] == "0"
    assert s['aipbx_breaker_state{check="backend_http",state="half_open"}'] == "0"
    assert s['aipbx_check_state{check="pgbouncer",state="idle"}'] == "1"
    assert s['aipbx_restarts_total{unit="aipbx-backend@blue.service"}'] == "2"
    assert s['aipbx_restart_budget_exhausted{unit="nginx.service"}'] == "1"
    assert s['aipbx_alerts_sent_total{channel="telegram"}'] == "3"
    assert s['aipbx_alerts_failed_total{channel="telegram"}'] == "2"
    assert s['aipbx_alerts_queued{channel="telegram"}'] == "1"
    assert s['aipbx_alert_channel_enabled{channel="email"}'] == "0"


def test_label_values_are_escaped() -> None:
    health = {
        "checks": {'we"ird\\\n': HEALTH["checks"]["nginx"]},
        "restarts": {},
        "alerts": {},
    }
    text = render(health)
    assert 'aipbx_check_up{check="we\\"ird\\\\\\n"} 1' in text.splitlines()


def test_loopback_fence() -> None:
    for a in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(a), a
    for a in ("10.203.0.2", "0.0.0.0", "192.0.2.1", "::", "", "nonsense"):
        assert not is_loopback(a), a


def test_status_shows_the_watchdogs_view() -> None:
    text = "\n".join(format_health(HEALTH))
    assert text.startswith("health:     critical")
    assert re.search(r"backend_http\s+critical\s+open\s+2000 ms\s+no answer", text)
    assert re.search(r"pgbouncer\s+idle\s+closed\s+-", text)
    assert "aipbx-backend@blue.service 2" in text
    assert "nginx.service 0 (budget exhausted)" in text
    assert "telegram on (sent 3, queued 1, failed 2)" in text
    assert "email off (alerts.smtp_host not set)" in text
    assert format_health(None) == [
        "health:     unknown (the watchdog's /system-health does not answer)"
    ]


def test_checks_the_watchdog_could_not_run_are_neither_up_nor_down() -> None:
    unknown = {**HEALTH["checks"]["nginx"], "state": "unknown", "latency_ms": None}
    own = {
        "state": "impaired",
        "since": "2026-01-01T00:00:00+00:00",
        "error": "no file descriptor left in the watchdog (EMFILE) (checks not run: nginx)",
        "restarts_held": True,
    }
    health = {**HEALTH, "checks": {"nginx": unknown}, "watchdog": own, "status": "unknown"}
    s = samples(render(health))
    assert 'aipbx_check_up{check="nginx"}' not in s
    assert s['aipbx_check_state{check="nginx",state="unknown"}'] == "1"
    assert s["aipbx_watchdog_impaired"] == "1"
    assert (
        samples(render({**HEALTH, "watchdog": {**own, "state": "ok"}}))["aipbx_watchdog_impaired"]
        == "0"
    )
    text = "\n".join(format_health(health))
    assert "watchdog:   impaired since 2026-01-01T00:00:00+00:00: no file descriptor" in text
    assert "restarts nothing" in text
    assert "watchdog:" not in "\n".join(format_health(HEALTH))
