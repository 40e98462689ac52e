"""The blue/green switch itself: the nft table `inet aipbx` replaced in one transaction. It
DNATs nginx's live-color address (HTTP and WebSocket) and the host's UDP port (RTP) to the
live color; conntrack keeps every open connection and call flow where it started. nginx is
not reloaded, so no client connection is touched. Rendering and `nft -c` happen before the
timed window, which holds only the commit."""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance import nft
from appliance.colors import Color
from appliance.config import Config


@dataclass(frozen=True)
class Prepared:
    color: Color | None
    ruleset: str


def prepare(cfg: Config, color: Color | None) -> Prepared:
    """Render the switch to `color` and have nft check it, without touching what runs."""
    ruleset = nft.render(cfg, color)
    nft.check(ruleset)
    return Prepared(color, ruleset)


def execute(prepared: Prepared) -> float:
    """The switch; returns its duration in milliseconds."""
    t0 = time.monotonic()
    nft.apply(prepared.ruleset)
    return (time.monotonic() - t0) * 1000
