"""`aipbxctl status [--json]`: each service's state, the live color and what it runs, and
the watchdog's view of the appliance's health."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import asdict
from typing import Any

from appliance import boottime, state
from appliance import config as config_mod
from appliance.colors import Color
from appliance.paths import Paths
from appliance.services import Services

CORE_UNITS = (
    "aipbx.target",
    "aipbx-watchdog.service",
    "nginx.service",
    "postgresql.service",
    "aipbx-pgbouncer.service",
)


def unit_names() -> list[str]:
    names = list(CORE_UNITS)
    for c in Color:
        names += [f"aipbx-netns@{c}.service", f"aipbx-backend@{c}.service"]
    return names


def health_url(paths: Paths) -> str:
    """Where the watchdog serves /system-health, from aipbx.toml (defaults if unreadable)."""
    try:
        w = config_mod.load(paths.config).watchdog
    except Exception:
        w = config_mod.Watchdog()
    host = "127.0.0.1" if w.api_bind in ("0.0.0.0", "::") else w.api_bind
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{w.api_port}/system-health"


def fetch_health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The watchdog's /system-health, or None when it does not answer (best effort)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def collect(paths: Paths, services: Services) -> dict[str, Any]:
    st = state.load(paths.state)
    now = boottime.now()
    return {
        "live_color": str(st.live_color) if st.live_color else None,
        "colors": st.colors,
        "frontend": st.frontend or None,
        # deadlines are boot-time: "left_s" is what counts; "deadline" (epoch) is now + it
        "draining": (
            {
                "color": str(st.draining.color),
                "left_s": round(st.draining.until.left(now), 1),
                "deadline": round(now.wall + st.draining.until.left(now), 3),
            }
            if st.draining
            else None
        ),
        "probation": (
            {
                "color": str(st.probation.color),
                "release": st.probation.release,
                "old_color": str(st.probation.old_color) if st.probation.old_color else None,
                "left_s": round(st.probation.until.left(now), 1),
            }
            if st.probation
            else None
        ),
        "phase": st.phase(),
        # set while an upgrade runs; still set after a crash: `aipbxctl reconcile`
        "upgrading": st.upgrading or None,
        "set_up": paths.secrets.exists(),
        "services": [asdict(services.state(u)) for u in unit_names()],
        "health": fetch_health(health_url(paths)),
    }


def format_health(health: dict[str, Any] | None) -> list[str]:
    if health is None:
        return ["health:     unknown (the watchdog's /system-health does not answer)"]
    lines = [f"health:     {health.get('status', '?')} (as the watchdog sees it)"]
    own = health.get("watchdog") or {}
    if own.get("state", "ok") != "ok":
        lines.append(
            f"watchdog:   {own.get('state')} since {own.get('since')}: {own.get('error', '')}; "
            "it restarts nothing until it can check again"
        )
    lines.append("")
    lines.append(f"{'CHECK':14} {'STATE':9} {'BREAKER':10} {'LATENCY':>9}  ERROR")
    for name, c in (health.get("checks") or {}).items():
        ms = c.get("latency_ms")
        latency = "-" if ms is None else f"{ms:.0f} ms"
        lines.append(
            f"{name:14} {c.get('state', '?'):9} {c.get('breaker', '?'):10} {latency:>9}  "
            f"{c.get('error') or ''}"
        )
    restarted = [
        f"{unit} {r.get('total', 0)}" + (" (budget exhausted)" if r.get("exhausted") else "")
        for unit, r in (health.get("restarts") or {}).items()
        if r.get("total") or r.get("exhausted")
    ]
    lines.append(f"restarts:   {', '.join(restarted) if restarted else 'none'}")
    channels = []
    for name, a in (health.get("alerts") or {}).items():
        if a.get("enabled"):
            channels.append(
                f"{name} on (sent {a.get('sent', 0)}, queued {a.get('queued', 0)}, "
                f"failed {a.get('failed', 0)})"
            )
        else:
            channels.append(f"{name} off ({a.get('reason', '')})")
    lines.append(f"alerts:     {'; '.join(channels) if channels else 'none'}")
    return lines


def format_text(data: dict[str, Any]) -> str:
    lines = [
        f"live color: {data['live_color'] or 'none (no release deployed)'}",
        f"set up:     {'yes' if data['set_up'] else 'no (run `aipbxctl setup`)'}",
    ]
    for color, release in sorted(data["colors"].items()):
        lines.append(f"{color + ':':11} {release}")
    if data.get("frontend"):
        lines.append(f"frontend:   {data['frontend']}")
    if data.get("probation"):
        p = data["probation"]
        lines.append(
            f"probation:  {p['release']} on {p['color']} ({p['left_s']:.0f}s left; a failure "
            f"switches back to {p['old_color'] or 'nothing'}; if no upgrade runs: "
            "`aipbxctl reconcile` resumes it)"
        )
    if data.get("draining"):
        lines.append(
            f"draining:   {data['draining']['color']} (stopped when idle, at the "
            f"latest in {data['draining']['left_s']:.0f}s)"
        )
    if data.get("upgrading"):
        lines.append(
            f"upgrading:  {data['upgrading']} (if no upgrade runs: `aipbxctl " "reconcile`)"
        )
    lines.append("")
    lines.append(f"{'SERVICE':34} {'STATE':20} {'ENABLED':10} SINCE")
    for s in data["services"]:
        lines.append(
            f"{s['name']:34} {s['active'] + '/' + s['sub']:20} {s['enabled']:10} " f"{s['since']}"
        )
    lines.append("")
    lines.extend(format_health(data.get("health")))
    return "\n".join(lines)
