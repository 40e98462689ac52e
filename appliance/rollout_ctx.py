"""What every step of a rollout (appliance.upgrade, appliance.phases) shares: the steps'
names, the timeline the operator sees, the options, the context (paths, config, services,
clock) and the error that refuses a release."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from appliance import boottime, state
from appliance import drain as drain_mod
from appliance.colors import Color
from appliance.config import Config
from appliance.errors import AipbxError, UsageError
from appliance.paths import Paths
from appliance.services import Services

log = logging.getLogger("aipbx.upgrade")


class Step(StrEnum):
    PLAN = "plan"
    VERIFY = "verify"
    UNPACK = "unpack"
    BACKUP = "backup"
    MIGRATE = "migrate"
    SHARED = "shared"
    ENV = "env"
    START = "start"
    HEALTH = "health"
    SWITCH = "switch"
    PROBATION = "probation"
    DRAIN = "drain"
    STOP_OLD = "stop-old"
    GC = "gc"
    DONE = "done"


class UpgradeFailed(AipbxError):
    """The new release was refused; what runs was left (or put back) as it was."""


@dataclass
class Timeline:
    """What happened, step by step, for the operator and --json."""

    out: Callable[[str], None] = print
    t0: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def step(self, step: Step, detail: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.steps.append(
            {
                "step": str(step),
                "elapsed_s": round(elapsed, 3),
                "detail": detail,
                "at": round(time.time(), 3),
            }
        )
        self.out(f"[{elapsed:7.2f}s] {step}: {detail}")
        log.info("%s: %s", step, detail, extra={"fields": {"step": step, "action": "upgrade"}})


@dataclass(frozen=True)
class Options:
    probation_s: float
    drain_s: float
    health_timeout_s: float | None = None  # None: the manifest's
    restore_db: bool = False  # rollback --restore-db: the database goes back too
    verb: str = "upgrade"  # upgrade | restart | rollback, for what is recorded and said


def refuse(what: str) -> None:
    """The default answer to a risky step (a downgrade): no."""
    raise UsageError(f"{what}: refused", hint="add --yes to go ahead anyway")


@dataclass
class Ctx:
    paths: Paths
    cfg: Config
    services: Services
    tl: Timeline
    clock: Callable[[], boottime.Now] = field(default=lambda: boottime.now())
    sleep: Callable[[float], None] = field(default=lambda s: boottime.sleep(s))
    # Asked before a risky step (a downgrade); raises to refuse it.
    confirm: Callable[[str], None] = refuse

    def save(self, st: state.State) -> state.State:
        state.save(self.paths.state, st)
        return st

    def load(self) -> state.State:
        return state.load(self.paths.state)


def unit(color: Color) -> str:
    return f"aipbx-backend@{color}.service"


def forget_flows(cfg: Config, color: Color) -> str:
    """After `color` has stopped: the UDP flows conntrack still sends to it go to the live
    color from their next packet. A note for the timeline ("" when there were none)."""
    n = drain_mod.forget_udp_flows(cfg, color)
    return f"; {n} UDP flow(s) that led to it now go to the live color" if n else ""
