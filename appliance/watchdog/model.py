"""What a check says: its status and the result of one run."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    WARNING = "warning"  # answering, but slow, or a resource running low
    CRITICAL = "critical"  # not answering, or a resource nearly gone
    IDLE = "idle"  # nothing to check (no live color, PgBouncer not set up)

    @property
    def failed(self) -> bool:
        """What the circuit breaker counts as a failure."""
        return self is Status.CRITICAL


# Worst first: the overall status is the worst of the checks'.
SEVERITY_ORDER = (Status.CRITICAL, Status.WARNING, Status.OK, Status.IDLE)


@dataclass(frozen=True)
class Result:
    status: Status
    latency: float | None = None  # seconds, for checks that talk to something
    error: str = ""  # why it is not ok
    detail: str = ""  # what was seen (HTTP 200, 42% free, 60 days left)


def worst(statuses: list[Status]) -> Status:
    for s in SEVERITY_ORDER:
        if s in statuses:
            return s
    return Status.IDLE
