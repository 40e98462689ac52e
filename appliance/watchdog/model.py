"""What a check says: its status and the result of one run."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    WARNING = "warning"  # answering, but slow, or a resource running low
    CRITICAL = "critical"  # not answering, or a resource nearly gone
    IDLE = "idle"  # nothing to check (no live color, PgBouncer not set up)
    # The watchdog could not run the check (its own fault: no file descriptor, memory,
    # thread or process for it). Says nothing about the service: never a restart.
    UNKNOWN = "unknown"

    @property
    def failed(self) -> bool:
        """What the circuit breaker counts as a failure."""
        return self is Status.CRITICAL


# Worst first: the overall status is the worst of the checks'.
SEVERITY_ORDER = (Status.CRITICAL, Status.UNKNOWN, Status.WARNING, Status.OK, Status.IDLE)


@dataclass(frozen=True)
class Result:
    status: Status
    latency: float | None = None  # seconds, for checks that talk to something
    error: str = ""  # why it is not ok
    detail: str = ""  # what was seen (HTTP 200, 42% free, 60 days left)
    timed_out: bool = False  # no answer at all within the timeout: hung, not crashed
    # The unit whose restart repairs this, when it is not the check's own (PgBouncer
    # missing a color's address that is not on the host: that color's netns unit).
    unit: str | None = None


def worst(statuses: list[Status]) -> Status:
    for s in SEVERITY_ORDER:
        if s in statuses:
            return s
    return Status.IDLE
