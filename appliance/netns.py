"""Each color's network namespace (DESIGN decision 1, done the systemd way).

aipbx-netns@COLOR.service holds the namespace: systemd creates it for the unit
(PrivateNetwork=yes) and the backend of the same color joins it (JoinsNamespaceOf=), so
its lifetime is the unit's and nothing is left behind by a crash. Its ExecStartPost=+
runs `aipbx-netns up COLOR` inside that namespace with full privileges; this module wires
a veth pair to the host's namespace (reached as PID 1's), addresses on the color's /30 and
a default route back through the host.

Deciding is pure: `plan_up` returns (where, argv) steps, where "host" is the host's
network namespace and "ns" the color's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from appliance.colors import ColorNet
from appliance.run import run

Where = Literal["host", "ns"]
Step = tuple[Where, list[str]]

# Run in the host's network namespace from inside the color's: PID 1 lives there.
HOST_FROM_COLOR = ("nsenter", "-t", "1", "-n", "--")


def plan_up(net: ColorNet, *, peer_netns: str, host_link_exists: bool) -> list[Step]:
    """Steps that make the color's network whatever exists already. `peer_netns` is where
    the veth's inner end goes: a PID (production) or a named netns (tests)."""
    host_cidr = f"{net.host_addr}/{net.prefixlen}"
    ns_cidr = f"{net.ns_addr}/{net.prefixlen}"
    steps: list[Step] = []
    if host_link_exists:
        # A leftover from a namespace that is gone (its peer went with it) or from a
        # previous start of this unit: start from a clean pair.
        steps.append(("host", ["ip", "link", "delete", net.host_if]))
    steps += [
        (
            "host",
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
                peer_netns,
            ],
        ),
        ("host", ["ip", "addr", "replace", host_cidr, "dev", net.host_if]),
        # The colors' egress and RTP from other hosts are forwarded (as Docker does).
        ("host", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]),
        # Asterisk on this host may send RTP from 127.0.0.1: let it be routed to the
        # color (the nft table masquerades it).
        ("host", ["sysctl", "-q", "-w", f"net.ipv4.conf.{net.host_if}.route_localnet=1"]),
        ("host", ["ip", "link", "set", net.host_if, "up"]),
        ("ns", ["ip", "addr", "replace", ns_cidr, "dev", net.ns_if]),
        ("ns", ["ip", "link", "set", net.ns_if, "up"]),
        ("ns", ["ip", "link", "set", "lo", "up"]),
        ("ns", ["ip", "route", "replace", "default", "via", net.host_addr]),
    ]
    return steps


def plan_down(net: ColorNet, *, host_link_exists: bool) -> list[Step]:
    return [("host", ["ip", "link", "delete", net.host_if])] if host_link_exists else []


def _argv(step: Step, host: Sequence[str], ns: Sequence[str]) -> list[str]:
    where, argv = step
    return [*(host if where == "host" else ns), *argv]


def host_link_exists(net: ColorNet, host: Sequence[str]) -> bool:
    return run([*host, "ip", "link", "show", "dev", net.host_if], check=False).returncode == 0


def up(
    net: ColorNet,
    *,
    peer_netns: str,
    host: Sequence[str] = HOST_FROM_COLOR,
    ns: Sequence[str] = (),
) -> list[list[str]]:
    """Wire the color's namespace. Defaults: called from inside it (ExecStartPost=+)."""
    steps = plan_up(net, peer_netns=peer_netns, host_link_exists=host_link_exists(net, host))
    done = []
    for step in steps:
        argv = _argv(step, host, ns)
        run(argv, hint="aipbx-netns needs root (it runs as ExecStartPost=+ of aipbx-netns@)")
        done.append(argv)
    return done


def down(net: ColorNet, *, host: Sequence[str] = HOST_FROM_COLOR) -> list[list[str]]:
    done = []
    for step in plan_down(net, host_link_exists=host_link_exists(net, host)):
        argv = _argv(step, host, ())
        run(argv, check=False)
        done.append(argv)
    return done
