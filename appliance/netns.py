"""Each color's network namespace (DESIGN decision 1): /run/netns/aipbx-<color>, a veth pair
to the host on the color's /30, a default route back through the host. Deciding is pure:
`plan_up` turns what exists into the argv lists that create what is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass

from appliance.colors import ColorNet
from appliance.run import run


@dataclass(frozen=True)
class Observed:
    netns_exists: bool
    host_if_exists: bool
    host_if_addrs: tuple[str, ...]  # "a.b.c.d/nn"
    host_if_up: bool
    ns_if_addrs: tuple[str, ...]
    ns_if_up: bool
    ns_lo_up: bool
    ns_default_route: str  # gateway or ""


def plan_up(net: ColorNet, seen: Observed) -> list[list[str]]:
    ns = ["ip", "-n", net.netns]
    host_cidr = f"{net.host_addr}/{net.prefixlen}"
    ns_cidr = f"{net.ns_addr}/{net.prefixlen}"
    steps: list[list[str]] = []
    if not seen.netns_exists:
        steps.append(["ip", "netns", "add", net.netns])
    if not seen.host_if_exists:
        steps.append(
            [
                "ip",
                "link",
                "add",
                net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                net.ns_if,
                "netns",
                net.netns,
            ]
        )
    if host_cidr not in seen.host_if_addrs:
        steps.append(["ip", "addr", "replace", host_cidr, "dev", net.host_if])
    # The colors' egress and RTP from other hosts are forwarded (as Docker does).
    steps.append(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    # Asterisk on this host may send RTP from 127.0.0.1: let it be routed (then masqueraded).
    steps.append(["sysctl", "-q", "-w", f"net.ipv4.conf.{net.host_if}.route_localnet=1"])
    if not seen.host_if_up:
        steps.append(["ip", "link", "set", net.host_if, "up"])
    if ns_cidr not in seen.ns_if_addrs:
        steps.append([*ns, "addr", "replace", ns_cidr, "dev", net.ns_if])
    if not seen.ns_if_up:
        steps.append([*ns, "link", "set", net.ns_if, "up"])
    if not seen.ns_lo_up:
        steps.append([*ns, "link", "set", "lo", "up"])
    if seen.ns_default_route != net.host_addr:
        steps.append([*ns, "route", "replace", "default", "via", net.host_addr])
    return steps


def plan_down(net: ColorNet, seen: Observed) -> list[list[str]]:
    # Deleting the namespace destroys its veth end, and with it the host end.
    steps = []
    if seen.netns_exists:
        steps.append(["ip", "netns", "delete", net.netns])
    if seen.host_if_exists:
        steps.append(["ip", "link", "delete", net.host_if])
    return steps


# --- observing and acting ------------------------------------------------------------


def _links(prefix: list[str]) -> list[dict[str, object]]:
    r = run([*prefix, "-j", "addr", "show"], check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    data: list[dict[str, object]] = json.loads(r.stdout)
    return data


def _addrs(link: dict[str, object]) -> tuple[str, ...]:
    infos = link.get("addr_info") or []
    assert isinstance(infos, list)
    return tuple(f"{a['local']}/{a['prefixlen']}" for a in infos if a.get("family") == "inet")


def _up(link: dict[str, object]) -> bool:
    flags = link.get("flags") or []
    assert isinstance(flags, list)
    return "UP" in flags


def observe(net: ColorNet) -> Observed:
    names = run(["ip", "netns", "list"]).stdout.split()
    netns_exists = net.netns in names
    host = {str(li["ifname"]): li for li in _links(["ip"])}
    h = host.get(net.host_if)
    inside = (
        {str(li["ifname"]): li for li in _links(["ip", "-n", net.netns])} if netns_exists else {}
    )
    e, lo = inside.get(net.ns_if), inside.get("lo")
    route = ""
    if netns_exists:
        r = run(["ip", "-n", net.netns, "-j", "route", "show", "default"], check=False)
        routes = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
        route = str(routes[0].get("gateway", "")) if routes else ""
    return Observed(
        netns_exists=netns_exists,
        host_if_exists=h is not None,
        host_if_addrs=_addrs(h) if h else (),
        host_if_up=_up(h) if h else False,
        ns_if_addrs=_addrs(e) if e else (),
        ns_if_up=_up(e) if e else False,
        ns_lo_up=_up(lo) if lo else False,
        ns_default_route=route,
    )


def up(net: ColorNet) -> list[list[str]]:
    steps = plan_up(net, observe(net))
    for argv in steps:
        run(argv, hint="needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN")
    return steps


def down(net: ColorNet) -> list[list[str]]:
    steps = plan_down(net, observe(net))
    for argv in steps:
        run(argv, check=False)
    return steps
