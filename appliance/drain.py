"""What still uses a color: WebSocket connections nginx holds to it and the UDP flows
(calls) conntrack keeps pinned to it (DESIGN decision 4); and, once it is stopped, forgetting
those flows so that their next packet goes to the live color."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from appliance.colors import Color, color_net
from appliance.config import Config
from appliance.errors import AipbxError, CommandError
from appliance.run import run

log = logging.getLogger("aipbx.drain")


@dataclass(frozen=True)
class Usage:
    ws: int
    udp_flows: int

    @property
    def idle(self) -> bool:
        return self.ws == 0 and self.udp_flows == 0


class UsageUnknown(AipbxError):
    """conntrack could not say what uses a color: never read as idle (a color that still
    carries calls must not be stopped because a command failed)."""


def count_usage(text: str, ws_port: int, udp_port: int) -> Usage:
    """Pure: from `conntrack -L --reply-src ADDR` output, the established TCP connections
    answered from `ws_port` (nginx's WebSockets to the color) and the UDP flows answered
    from `udp_port` (calls). The reply tuple is the second src=/sport= of a line."""
    ws = udp = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        sports = [f[6:] for f in fields if f.startswith("sport=")]
        if len(sports) < 2:
            continue
        reply_sport = sports[1]
        if fields[0] == "tcp" and "ESTABLISHED" in fields and reply_sport == str(ws_port):
            ws += 1
        elif fields[0] == "udp" and reply_sport == str(udp_port):
            udp += 1
    return Usage(ws=ws, udp_flows=udp)


def usage(cfg: Config, color: Color) -> Usage:
    """What still uses `color`, from one conntrack dump of the entries it answers (nginx
    connects to the live-color address; conntrack knows which color answered). Raises
    UsageUnknown when conntrack fails."""
    addr = color_net(cfg.network.subnet, color).ns_addr
    try:
        proc = run(["conntrack", "-L", "--reply-src", addr], check=False, timeout=30)
    except CommandError as e:
        raise UsageUnknown(f"cannot tell what still uses {color}: {e.message}") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip() or f"exit {proc.returncode}").splitlines()[-1]
        raise UsageUnknown(f"cannot tell what still uses {color}: conntrack: {said}")
    return count_usage(proc.stdout, cfg.backend.ws_port, cfg.backend.udp_port)


def forget_argvs(cfg: Config, color: Color) -> list[list[str]]:
    """Pure: the conntrack deletions for the UDP flows that still lead to `color`'s RTP
    port: those DNATed to it (a call that outlived the drain) and those it started from
    that port itself (masqueraded: the far end's answers would be un-NATed back to it)."""
    addr, port = color_net(cfg.network.subnet, color).ns_addr, str(cfg.backend.udp_port)
    return [
        ["conntrack", "-D", "-p", "udp", "--reply-src", addr, "--reply-port-src", port],
        ["conntrack", "-D", "-p", "udp", "--orig-src", addr, "--orig-port-src", port],
    ]


_DELETED = re.compile(r"(\d+) flow entries have been deleted")


def deleted_count(stderr: str) -> int | None:
    """Pure: what `conntrack -D` says it deleted (it exits 1 when that is 0); None when it
    said something else (an error)."""
    m = _DELETED.search(stderr)
    return int(m.group(1)) if m else None


def forget_udp_flows(cfg: Config, color: Color) -> int:
    """Call when `color` has stopped: conntrack would otherwise keep sending a flow's
    packets to it for as long as the far end keeps sending (a UDP entry is refreshed by
    each packet), while without the entry the next packet is DNATed to the live color.
    Returns how many entries were deleted; a failure is logged, never raised (the color is
    stopped either way)."""
    total = 0
    for argv in forget_argvs(cfg, color):
        try:
            proc = run(argv, check=False, timeout=30)
        except CommandError as e:  # conntrack missing, or a timeout
            log.warning("cannot forget the UDP flows of %s: %s", color, e.message)
            return total
        n = deleted_count(proc.stderr)
        if n is None:
            log.warning(
                "cannot forget the UDP flows of %s: %s",
                color,
                (proc.stderr.strip() or f"conntrack exited {proc.returncode}").splitlines()[-1],
            )
            continue
        total += n
    if not total:
        log.debug("no UDP flow leads to %s any more", color)
    else:
        log.info(
            "forgot %d UDP flow(s) still leading to %s: their next packet goes to the live color",
            total,
            color,
            extra={"fields": {"action": "forget-udp-flows", "color": str(color)}},
        )
    return total
