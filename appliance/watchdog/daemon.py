"""The watchdog's event loop: asyncio on uvloop, Type=notify.

One coroutine schedules the rounds of checks and pings systemd's watchdog (WatchdogSec=):
after each round, while it sleeps between rounds, and while a round is under way but only
until the round's deadline (timeout + grace). A loop that is stuck (a blocking call, a
round that never ends) stops pinging, and systemd kills and restarts the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from appliance import config as config_mod
from appliance import log as logmod
from appliance import secrets as secrets_mod
from appliance.errors import ConfigError
from appliance.fsutil import lock_held
from appliance.paths import Paths
from appliance.watchdog.backoff import Clock
from appliance.watchdog.monitor import Monitor
from appliance.watchdog.settings import Settings, from_config, seconds

API_CHECK_S = 2.0  # how often the API's listener is checked

log = logging.getLogger("aipbx.watchdog")

# How long past its timeout a round may run before the loop counts as stuck.
ROUND_GRACE = 5.0


class Notifier:
    """sd_notify(3) in a few lines of the standard library (a datagram to $NOTIFY_SOCKET,
    `@` for the abstract namespace); silent when not run by systemd.

    The socket is non-blocking: a datagram socket whose reader lags (its queue holds
    net.unix.max_dgram_qlen = 10 messages) would block the event loop in the middle of a
    ping, signals and all. A ping that does not fit is dropped; the next one follows within
    half of WatchdogSec."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._addr = notify_address(os.environ.get("NOTIFY_SOCKET", ""))
        if self._addr is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    def notify(self, msg: str) -> None:
        if self._sock is not None and self._addr is not None:
            with contextlib.suppress(OSError):
                self._sock.sendto(msg.encode(), self._addr)


def notify_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as an address for sendto: a path, or `@name` for the abstract
    namespace (a leading NUL byte). None when unset or not a unix socket (`vsock:...`)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def ping_interval() -> float:
    """Half of WatchdogSec (WATCHDOG_USEC), so one late tick is not fatal; 5 s otherwise."""
    usec = os.environ.get("WATCHDOG_USEC")
    return int(usec) / 2e6 if usec and usec.isdigit() else 5.0


def status_line(health: dict[str, Any]) -> str:
    counts = Counter(c["state"] for c in health["checks"].values())
    parts = [f"{counts[s]} {s}" for s in ("ok", "warning", "critical", "idle") if counts[s]]
    return f"live color {health['live_color'] or 'none'}; checks: {', '.join(parts)}"


async def _round(
    monitor: Monitor, timeout: float, notifier: Notifier, clock: Clock, grace: float
) -> None:
    task = asyncio.create_task(monitor.round())
    deadline = clock() + timeout + grace
    said = False
    while True:
        done, _ = await asyncio.wait({task}, timeout=min(ping_interval(), timeout + 1))
        if done:
            break
        if clock() < deadline:
            notifier.notify("WATCHDOG=1")
        elif not said:
            said = True
            log.critical(
                "a round of checks is stuck; no longer pinging systemd, which will restart me",
                extra={"fields": {"action": "stuck"}},
            )
    try:
        task.result()
    except Exception:  # a bug: keep supervising, the next round may do better
        log.exception("a round of checks failed")


async def supervise(
    monitor: Monitor,
    settings: Settings,
    notifier: Notifier,
    stop: asyncio.Event,
    *,
    clock: Clock = time.monotonic,
    grace: float = ROUND_GRACE,
    after_round: Callable[[], None] = lambda: None,
) -> None:
    next_round = clock()
    last_status = ""
    while not stop.is_set():
        await _round(monitor, settings.timeout, notifier, clock, grace)
        after_round()
        notifier.notify("WATCHDOG=1")
        line = status_line(monitor.summary())  # every round: not the whole snapshot
        if line != last_status:
            notifier.notify(f"STATUS={line}")
            last_status = line
        next_round = max(next_round + settings.interval, clock())
        while not stop.is_set() and (left := next_round - clock()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(left, ping_interval()))
            notifier.notify("WATCHDOG=1")


async def run(
    monitor: Monitor,
    settings: Settings,
    notifier: Notifier,
    stop: asyncio.Event,
    *,
    health: Callable[[], dict[str, Any]],
    alerter: Any = None,
    on_start: Callable[[], Coroutine[Any, Any, object]] | None = None,
    after_round: Callable[[], None] = lambda: None,
) -> None:
    """Serve the API, start the alert channels and the start-up reconcile, then supervise
    until `stop` is set."""
    from appliance.watchdog import api

    runner = None
    try:
        runner = await api.serve(health, settings.api_bind, settings.api_port)
    except OSError as e:
        log.critical(
            "cannot serve /system-health on %s:%d: %s; checking on without it",
            settings.api_bind,
            settings.api_port,
            e,
            extra={"fields": {"action": "api"}},
        )
    if alerter is not None:
        alerter.start()
    started = asyncio.create_task(on_start()) if on_start else None
    serving = [runner]  # the API server in use (_keep_serving may replace it)
    keeper = asyncio.create_task(_keep_serving(serving, health, settings, stop))
    notifier.notify("READY=1")
    log.info("watchdog started", extra={"fields": {"action": "start"}})
    try:
        await supervise(monitor, settings, notifier, stop, after_round=after_round)
    finally:
        notifier.notify("STOPPING=1")
        log.info("watchdog stopping", extra={"fields": {"action": "stop"}})
        if started is not None:
            started.cancel()
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        if alerter is not None:
            await alerter.close()
        if serving[0] is not None:
            await serving[0].cleanup()


async def _keep_serving(
    serving: list[Any],
    health: Callable[[], dict[str, Any]],
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """Serve the API again when its listener is gone (uvloop closes it for good when
    accept() fails with EMFILE, and still says it serves) or never came up. serving[0] is
    the server in use."""
    from appliance.watchdog import api

    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), API_CHECK_S)
        if stop.is_set() or (serving[0] is not None and serving[0].listening()):
            continue
        if serving[0] is not None:
            with contextlib.suppress(OSError):
                await serving[0].cleanup()
            serving[0] = None
        try:
            serving[0] = await api.serve(health, settings.api_bind, settings.api_port)
        except OSError as e:
            log.error("cannot serve /system-health yet: %s", e, extra={"fields": {"action": "api"}})
            continue
        log.warning(
            "serving /system-health on %s:%d again (its listener was gone)",
            settings.api_bind,
            settings.api_port,
            extra={"fields": {"action": "api"}},
        )


def load_config(paths: Paths) -> config_mod.Config:
    """A broken aipbx.toml must not leave the appliance unsupervised: run on defaults."""
    try:
        return config_mod.load(paths.config)
    except ConfigError as e:
        log.critical(
            "%s; supervising with the defaults until it is fixed",
            e.message.replace("\n", "; "),
            extra={"fields": {"action": "config"}},
        )
        return config_mod.Config()


async def _main(paths: Paths) -> None:
    from appliance import reconcile as reconcile_net
    from appliance.services import SystemdServices
    from appliance.watchdog import reconcile
    from appliance.watchdog.channels import Alerter, configure
    from appliance.watchdog.spool import Spool
    from appliance.watchdog.targets import LiveTargets

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cfg = load_config(paths)
    try:  # 0600 root; the watchdog cannot read secrets.env (its unit hides it)
        secrets = secrets_mod.load(paths.alerts_env)
    except OSError as e:
        log.error("cannot read %s: %s; alerts that need it are off", paths.alerts_env, e)
        secrets = {}
    settings = from_config(cfg.watchdog)
    channels = configure(cfg.alerts, secrets)
    for c in channels:
        if c.sender is None:
            log.info("alert channel %s is off: %s", c.name, c.reason)
    alerter = Alerter(
        channels,
        capacity=cfg.alerts.queue_size,
        rate_per_min=cfg.alerts.rate_limit_per_min,
        timeout=seconds(cfg.alerts.send_timeout),
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
        clock=time.monotonic,
    )
    services = SystemdServices()
    monitor = Monitor(
        settings,
        LiveTargets(cfg, paths),
        services,
        alerter,
        change_running=lambda: lock_held(paths.lock),
        repair_switch=lambda: reconcile_net.network(paths, load_config(paths)),
    )

    def health() -> dict[str, Any]:
        return {**monitor.snapshot(), "alerts": alerter.snapshot()}

    # Alerts not yet delivered and open incidents survive a restart.
    # In the one directory the watchdog may write (StateDirectory=aipbx/watchdog); read
    # once from where an older appliance kept it, when the new one does not exist yet.
    spool = Spool(paths.watchdog_var / "alerts.json", legacy=paths.var / "watchdog-alerts.json")
    saved = spool.load()
    monitor.resume_alert_state(saved.get("monitor"))
    requeued = alerter.requeue(saved.get("queues"), time.monotonic(), time.time())
    if requeued:
        log.info("%d alert(s) from before the restart are queued again", requeued)

    def persist() -> None:
        spool.save(monitor.alert_state(), alerter.queue_docs())

    alerter.watch(persist)

    await run(
        monitor,
        settings,
        Notifier(),
        stop,
        health=health,
        alerter=alerter,
        on_start=lambda: reconcile.apply(paths, services),
        after_round=persist,
    )


def main() -> int:
    # On SIGABRT (systemd's WatchdogSignal) print where every thread was stuck.
    faulthandler.enable()
    logmod.setup(identifier="aipbx-watchdog", stderr=not os.environ.get("JOURNAL_STREAM"))
    paths = Paths(Path(os.environ.get("AIPBX_ROOT", "/")))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        log.warning("uvloop not available; using asyncio's default loop")
    run_bounded(_main(paths))
    return 0


# How long a stopping daemon waits for work still running in its threads.
EXIT_GRACE = 2.0


def run_bounded(main_coro: Coroutine[Any, Any, None], grace: float = EXIT_GRACE) -> None:
    """asyncio.run, except that work still running in a thread cannot hold up the exit for
    more than `grace` seconds. Checks and restarts run `systemctl` in threads, and
    `systemctl restart` waits for the unit's start job: asyncio.run would wait for it (and
    then the interpreter would join the thread), so a stop of the watchdog would last as
    long as a backend's start. Nothing in those threads needs finishing: state is on disk
    and systemd owns the jobs; the processes they started are left to systemd (the
    watchdog's cgroup is cleaned up at stop)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main_coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()  # shuts the default executor down without waiting
    busy = join_threads(grace)
    if busy:
        log.warning(
            "exiting with %d thread(s) still busy: %s",
            len(busy),
            ", ".join(busy),
            extra={"fields": {"action": "stop"}},
        )
        logging.shutdown()
        os._exit(0)


def join_threads(grace: float) -> list[str]:
    """Wait up to `grace` seconds for the other non-daemon threads; the names of those
    still running."""
    import threading

    deadline = time.monotonic() + grace
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    for t in others:
        if not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in others if t.is_alive() and not t.daemon]
