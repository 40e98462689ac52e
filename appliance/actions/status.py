"""`aipbxctl status [--json]`: each service's state, the live color and what it runs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from appliance import state
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


def collect(paths: Paths, services: Services) -> dict[str, Any]:
    st = state.load(paths.state)
    return {
        "live_color": str(st.live_color) if st.live_color else None,
        "colors": st.colors,
        "set_up": paths.secrets.exists(),
        "services": [asdict(services.state(u)) for u in unit_names()],
    }


def format_text(data: dict[str, Any]) -> str:
    lines = [
        f"live color: {data['live_color'] or 'none (no release deployed)'}",
        f"set up:     {'yes' if data['set_up'] else 'no (run `aipbxctl setup`)'}",
    ]
    for color, release in sorted(data["colors"].items()):
        lines.append(f"{color + ':':11} {release}")
    lines.append("")
    lines.append(f"{'SERVICE':34} {'STATE':20} {'ENABLED':10} SINCE")
    for s in data["services"]:
        lines.append(
            f"{s['name']:34} {s['active'] + '/' + s['sub']:20} {s['enabled']:10} " f"{s['since']}"
        )
    return "\n".join(lines)
