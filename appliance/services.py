"""Service control behind one small interface (DESIGN decision 12). SystemdServices is the
implementation. The supervisord one the design plans for hosts whose PID 1 is not systemd
is not built yet: the appliance needs systemd as PID 1."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.run import run


@dataclass(frozen=True)
class UnitState:
    name: str
    active: str  # active, inactive, failed, activating, ...
    sub: str  # running, exited, dead, ...
    enabled: str  # enabled, disabled, static, not-found, ...
    since: str  # human timestamp of the last state change, or ""
    main_pid: int


class Services(Protocol):
    def state(self, unit: str) -> UnitState: ...
    def is_active(self, unit: str) -> bool: ...
    def start(self, unit: str) -> None: ...
    def stop(self, unit: str) -> None: ...
    def restart(self, unit: str) -> None: ...
    def reload(self, unit: str) -> None: ...
    def enable(self, unit: str, *, now: bool = False) -> None: ...
    def disable(self, unit: str, *, now: bool = False) -> None: ...
    def daemon_reload(self) -> None: ...
    def reset_failed(self, unit: str) -> None: ...
    def kill(self, unit: str, signal: str) -> None: ...


_PROPS = ("Id", "ActiveState", "SubState", "UnitFileState", "StateChangeTimestamp", "MainPID")


class SystemdServices:
    """systemctl over argv. `systemctl show` is used for state: it never fails on a
    unit that does not exist (LoadState=not-found), unlike is-active/status."""

    def state(self, unit: str) -> UnitState:
        out = run(["systemctl", "show", unit, "--property=" + ",".join(_PROPS)]).stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return UnitState(
            name=unit,
            active=props.get("ActiveState", "unknown"),
            sub=props.get("SubState", "unknown"),
            enabled=props.get("UnitFileState", "") or "not-found",
            since=props.get("StateChangeTimestamp", ""),
            main_pid=int(props.get("MainPID", "0") or 0),
        )

    def is_active(self, unit: str) -> bool:
        return run(["systemctl", "is-active", "--quiet", unit], check=False).returncode == 0

    def start(self, unit: str) -> None:
        run(["systemctl", "start", unit], hint=f"see `journalctl -u {unit}`")

    def stop(self, unit: str) -> None:
        run(["systemctl", "stop", unit])

    def restart(self, unit: str) -> None:
        run(["systemctl", "restart", unit], hint=f"see `journalctl -u {unit}`")

    def reload(self, unit: str) -> None:
        run(["systemctl", "reload", unit], hint=f"see `journalctl -u {unit}`")

    def enable(self, unit: str, *, now: bool = False) -> None:
        run(["systemctl", "enable", "--quiet", *(["--now"] if now else []), unit])

    def disable(self, unit: str, *, now: bool = False) -> None:
        run(["systemctl", "disable", "--quiet", *(["--now"] if now else []), unit])

    def daemon_reload(self) -> None:
        run(["systemctl", "daemon-reload"])

    def reset_failed(self, unit: str) -> None:
        run(["systemctl", "reset-failed", unit], check=False)

    def kill(self, unit: str, signal: str) -> None:
        run(["systemctl", "kill", f"--signal={signal}", unit], check=False)


def systemd_is_running() -> bool:
    return Path("/run/systemd/system").is_dir()
