"""What still uses a color: WebSocket connections nginx holds to it and the UDP flows
(calls) conntrack keeps pinned to it (DESIGN decision 4)."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.colors import Color, color_net
from appliance.config import Config
from appliance.run import run


@dataclass(frozen=True)
class Usage:
    ws: int
    udp_flows: int

    @property
    def idle(self) -> bool:
        return self.ws == 0 and self.udp_flows == 0


def count_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


def usage(cfg: Config, color: Color) -> Usage:
    addr = color_net(cfg.network.subnet, color).ns_addr
    # nginx connects to the live-color address; conntrack knows which color answered.
    ws = run(
        [
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--state",
            "ESTABLISHED",
            "--reply-src",
            addr,
            "--reply-port-src",
            str(cfg.backend.ws_port),
        ],
        check=False,
    ).stdout
    flows = run(
        [
            "conntrack",
            "-L",
            "-p",
            "udp",
            "--reply-src",
            addr,
            "--reply-port-src",
            str(cfg.backend.udp_port),
        ],
        check=False,
    ).stdout
    return Usage(ws=count_lines(ws), udp_flows=count_lines(flows))
