"""`aipbx-netns up|down COLOR`, run by aipbx-netns@.service as root."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance import config as config_mod
from appliance import log as logmod
from appliance import netns
from appliance.colors import color_net, parse_color
from appliance.errors import AipbxError
from appliance.paths import Paths

log = logging.getLogger("aipbx.netns")


def main(argv: Sequence[str]) -> int:
    logmod.setup(identifier="aipbx-netns", stderr=True)
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: aipbx-netns up|down blue|green", file=sys.stderr)
        return 2
    try:
        color = parse_color(argv[1])
        cfg = config_mod.load(Paths(Path(os.environ.get("AIPBX_ROOT", "/"))).config)
        net = color_net(cfg.network.subnet, color)
        steps = netns.up(net) if argv[0] == "up" else netns.down(net)
    except (AipbxError, ValueError) as e:
        msg = e.message if isinstance(e, AipbxError) else str(e)
        print(f"aipbx-netns: {msg}", file=sys.stderr)
        return 1
    for s in steps:
        log.info(
            "%s: %s",
            color,
            shlex.join(s),
            extra={"fields": {"color": color, "action": f"netns-{argv[0]}"}},
        )
    return 0
