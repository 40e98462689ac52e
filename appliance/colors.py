"""The two colors and their addresses: pure, derived from the configured subnet.

Each color gets one /30 of the subnet: the host side of its veth is the first address,
the namespace side (where the backend binds 5005/3033/3032) the second."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

# Where nginx proxies to: a loopback address the nft table DNATs to the live color.
LIVE_ADDR = "127.203.0.1"


class Color(StrEnum):
    BLUE = "blue"
    GREEN = "green"

    @property
    def other(self) -> Color:
        return Color.GREEN if self is Color.BLUE else Color.BLUE


@dataclass(frozen=True)
class ColorNet:
    color: Color
    host_addr: str  # host end of the veth: PgBouncer and the gateway
    ns_addr: str  # inside the namespace: the backend
    prefixlen: int
    # a name for tests that pin a namespace with `ip netns`; the appliance's own are held
    # by aipbx-netns@COLOR.service
    netns: str
    host_if: str  # veth name on the host
    ns_if: str  # veth name inside the namespace


def color_net(subnet: str, color: Color, *, prefix: str = "aipbx") -> ColorNet:
    """`prefix` names the netns and veth (tests use their own, unique one)."""
    net = ipaddress.IPv4Network(subnet)
    links = list(net.subnets(new_prefix=30))
    link = links[0 if color is Color.BLUE else 1]
    host, ns = list(link.hosts())[:2]
    return ColorNet(
        color=color,
        host_addr=str(host),
        ns_addr=str(ns),
        prefixlen=30,
        netns=f"{prefix}-{color}",
        host_if=f"{prefix}-{color}",
        ns_if="eth0",
    )


def parse_color(value: str) -> Color:
    try:
        return Color(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a color (blue or green)") from None
