"""`aipbx-netns up|down COLOR`: ExecStartPost=+ / ExecStopPost=+ of aipbx-netns@COLOR.service.
`up` runs inside the color's namespace ($MAINPID is the unit's anchor process); it wires the
veth and then (re)applies the nft table from state.json, so a boot brings the UDP switch
back as it was."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance import config as config_mod
from appliance import log as logmod
from appliance import netns, reconcile
from appliance.colors import color_net, parse_color
from appliance.errors import AipbxError
from appliance.paths import Paths

log = logging.getLogger("aipbx.netns")


def main(argv: Sequence[str]) -> int:
    logmod.setup(identifier="aipbx-netns", stderr=True)
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: aipbx-netns up|down blue|green", file=sys.stderr)
        return 2
    action = argv[0]
    try:
        color = parse_color(argv[1])
        paths = Paths(Path(os.environ.get("AIPBX_ROOT", "/")))
        cfg = config_mod.load(paths.config)
        net = color_net(cfg.network.subnet, color)
        if action == "up":
            pid = os.environ.get("MAINPID", "")
            if not pid.isdigit():
                print(
                    "aipbx-netns: up needs $MAINPID (run it from aipbx-netns@.service)",
                    file=sys.stderr,
                )
                return 2
            steps = netns.up(net, peer_netns=pid)
            for change in reconcile.network(paths, cfg, host=netns.HOST_FROM_COLOR):
                log.info("reconciled: %s", change, extra={"fields": {"action": "reconcile"}})
        else:
            steps = netns.down(net)
    except (AipbxError, ValueError) as e:
        msg = e.message if isinstance(e, AipbxError) else str(e)
        print(f"aipbx-netns: {msg}", file=sys.stderr)
        return 1
    for s in steps:
        log.info(
            "%s: %s",
            color,
            shlex.join(s),
            extra={"fields": {"color": color, "action": f"netns-{action}"}},
        )
    return 0
