"""Bring the nft table (the blue/green switch) and the backend units in line with state.json
(at boot, from aipbx-netns@'s ExecStartPost, and by `aipbxctl reconcile`): a power cut in
the middle of a switch heals itself, since state.json says what is live."""

from __future__ import annotations

import time
from collections.abc import Sequence

from appliance import drain, nft, state
from appliance.colors import Color
from appliance.config import Config
from appliance.paths import Paths
from appliance.services import Services


def network(paths: Paths, cfg: Config, *, host: Sequence[str] = ()) -> list[str]:
    """The nft table from state.json: it is the switch of all three protocols."""
    st = state.load(paths.state)
    nft.apply(nft.render(cfg, st.live_color), host=host)
    return [f"nft table: live color {st.live_color or 'none'}"]


def units(paths: Paths, services: Services, cfg: Config) -> list[str]:
    """The live color's backend runs and is enabled (so boot brings it up); a color that is
    neither live nor draining is stopped and disabled, and the UDP flows that still led to
    it are forgotten (their next packet goes to the live color)."""
    st = state.load(paths.state)
    changes = []
    if st.draining and (time.time() >= st.draining.deadline or st.draining.color == st.live_color):
        # An interrupted upgrade left a drain behind; its deadline has passed.
        changes.append(f"the drain of {st.draining.color} is over")
        st = st.with_(draining=None, upgrading="")
        state.save(paths.state, st)
    if st.upgrading and st.draining is None:
        # The caller holds the mutation lock: no upgrade runs, this one was interrupted.
        changes.append(
            f"an interrupted upgrade to {st.upgrading} ended; live is "
            f"{st.live_release() or 'nothing'}"
        )
        st = st.with_(upgrading="")
        state.save(paths.state, st)
    for color in ("blue", "green"):
        unit = f"aipbx-backend@{color}.service"
        s = services.state(unit)
        if st.live_color is not None and color == str(st.live_color):
            if s.enabled != "enabled":
                services.enable(unit)
                changes.append(f"enabled {unit}")
            if s.active != "active":
                services.start(unit)
                changes.append(f"started {unit}")
        elif st.draining is None or color != str(st.draining.color):
            if s.active in ("active", "activating", "failed"):
                services.stop(unit)
                changes.append(f"stopped {unit}")
                if n := drain.forget_udp_flows(cfg, Color(color)):
                    changes.append(f"{n} UDP flow(s) that led to {color} go to the live color")
            if s.enabled == "enabled":
                services.disable(unit)
                changes.append(f"disabled {unit}")
    return changes
