"""Does the colors' subnet clash with a route the host already has? A clash would send the
backends' traffic (or the host's) the wrong way, so `config check` and `setup` refuse it."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from appliance.run import run

OWN_PREFIX = "aipbx-"  # the colors' own veths route the subnet legitimately


def clashes(subnet: str, routes: list[dict[str, Any]]) -> list[str]:
    """Pure: each host route (as `ip -j route` gives them) that overlaps `subnet`."""
    net = ipaddress.IPv4Network(subnet)
    out = []
    for r in routes:
        dst, dev = str(r.get("dst", "")), str(r.get("dev", ""))
        if not dst or dst == "default" or dev.startswith(OWN_PREFIX):
            continue
        try:
            other = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if other.version == 4 and net.overlaps(other):
            out.append(f"{dst} dev {dev}" if dev else dst)
    return out


def host_routes() -> list[dict[str, Any]]:
    r = run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    data: list[dict[str, Any]] = json.loads(r.stdout)
    return [
        d
        for d in data
        if d.get("type", "unicast") in ("unicast", "local")
        and not str(d.get("dst", "")).startswith("127.")
    ]
