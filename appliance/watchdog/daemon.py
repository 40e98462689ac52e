"""The watchdog's event loop: asyncio on uvloop, Type=notify. The systemd watchdog is pinged
from the same loop that does the work, so a stuck loop gets the daemon killed and restarted.
The checks, breakers and alerts join this loop in the watchdog issue; today it reports
READY, a STATUS line with the live color, and pings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from appliance import log as logmod
from appliance import state
from appliance.paths import Paths

log = logging.getLogger("aipbx.watchdog")


class Notifier:
    """sd_notify through python3-sdnotify; silent when not run by systemd."""

    def __init__(self) -> None:
        self._n = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()

    def notify(self, msg: str) -> None:
        if self._n is not None:
            self._n.notify(msg)


def ping_interval() -> float:
    """Half of WatchdogSec (WATCHDOG_USEC), so one late tick is not fatal; 5 s otherwise."""
    usec = os.environ.get("WATCHDOG_USEC")
    return int(usec) / 2e6 if usec and usec.isdigit() else 5.0


async def run(paths: Paths, notifier: Notifier, stop: asyncio.Event) -> None:
    interval = ping_interval()
    notifier.notify("READY=1")
    log.info("watchdog started", extra={"fields": {"action": "start"}})
    last_status = ""
    while not stop.is_set():
        try:
            live = state.load(paths.state).live_color
            status = f"live color: {live or 'none'}"
        except Exception as e:  # a broken state file must not stop the pings
            status = f"state unreadable: {e}"
        if status != last_status:
            notifier.notify(f"STATUS={status}")
            last_status = status
        notifier.notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
    notifier.notify("STOPPING=1")
    log.info("watchdog stopping", extra={"fields": {"action": "stop"}})


async def _main(paths: Paths) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(paths, Notifier(), stop)


def main() -> int:
    logmod.setup(identifier="aipbx-watchdog", stderr=not os.environ.get("JOURNAL_STREAM"))
    paths = Paths(Path(os.environ.get("AIPBX_ROOT", "/")))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        log.warning("uvloop not available; using asyncio's default loop")
    asyncio.run(_main(paths))
    return 0
