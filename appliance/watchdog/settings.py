"""The watchdog's settings: aipbx.toml's [watchdog] turned into seconds (with millisecond
precision, so tests can run at a 0.2 s interval) once, at start."""

from __future__ import annotations

from dataclasses import dataclass

from appliance import config


@dataclass(frozen=True)
class Settings:
    interval: float = 2.0
    timeout: float = 2.0
    slow: float = 1.0
    failures_to_open: int = 3
    cooldown: float = 15.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    restart_budget: int = 5
    restart_window: float = 600.0
    critical_after: float = 60.0
    api_port: int = 6030
    api_bind: str = "127.0.0.1"
    disk_warn_pct: int = 10
    disk_crit_pct: int = 5
    memory_warn_pct: int = 90
    cert_warn_days: int = 14
    cert_crit_days: int = 3


def seconds(duration: str) -> float:
    return config.duration_ms(duration) / 1000.0


def from_config(w: config.Watchdog) -> Settings:
    return Settings(
        interval=seconds(w.interval),
        # A round never takes longer than the interval: a hung backend is then caught
        # within failures_to_open intervals (at a 1 s interval the 2 s default timeout
        # would stretch every round to 2 s).
        timeout=min(seconds(w.timeout), seconds(w.interval)),
        slow=seconds(w.slow_threshold),
        failures_to_open=w.failures_to_open,
        cooldown=seconds(w.cooldown),
        backoff_initial=seconds(w.backoff_initial),
        backoff_max=seconds(w.backoff_max),
        restart_budget=w.restart_budget,
        restart_window=seconds(w.restart_window),
        critical_after=seconds(w.critical_after),
        api_port=w.api_port,
        api_bind=w.api_bind,
        disk_warn_pct=w.disk_warn_pct,
        disk_crit_pct=w.disk_crit_pct,
        memory_warn_pct=w.memory_warn_pct,
        cert_warn_days=w.cert_warn_days,
        cert_crit_days=w.cert_crit_days,
    )
