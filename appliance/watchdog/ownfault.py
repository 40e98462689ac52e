"""The watchdog's own trouble, as one incident of its own (the pseudo-check "watchdog"):
rounds in which some check could not be run (Status.UNKNOWN: no file descriptor, memory,
thread or process for it) impair the watchdog. While it is impaired it restarts nothing;
the operator hears of it once (a CRITICAL about the watchdog itself), and once more when
it has run every check for `recover_after` rounds in a row (INFO). Pure: time passed in."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.watchdog.alerts import Alert, Severity, _dur

NAME = "watchdog"


@dataclass(frozen=True)
class Fault:
    check: str
    reason: str  # what faults.own_fault said


def describe(faults: list[Fault]) -> str:
    reasons = sorted({f.reason for f in faults})
    checks = ", ".join(f.check for f in faults)
    return f"{'; '.join(reasons)} (checks not run: {checks})"


class OwnFault:
    def __init__(self, recover_after: int) -> None:
        self.recover_after = recover_after
        self.count = 0  # incidents so far (for the incident id)
        self.started: float | None = None  # None: not impaired
        self.ok_streak = 0
        self.last = ""  # what the last impaired round said

    @property
    def impaired(self) -> bool:
        return self.started is not None

    @property
    def incident(self) -> str:
        return f"{NAME}#{self.count}"

    def observe(self, faults: list[Fault], now: float) -> list[Alert]:
        """One round: the checks it could not run (none: a clean round)."""
        if faults:
            self.ok_streak = 0
            self.last = describe(faults)
            if self.started is not None:
                return []
            self.count += 1
            self.started = now
            text = (
                f"the watchdog cannot run its checks: {self.last}; it restarts nothing "
                "until it can"
            )
            return [Alert(Severity.CRITICAL, NAME, text, self.incident, now)]
        if self.started is None:
            return []
        self.ok_streak += 1
        if self.ok_streak < self.recover_after:
            return []
        text = f"the watchdog runs all its checks again, after {_dur(now - self.started)}"
        self.started, self.ok_streak = None, 0
        return [Alert(Severity.INFO, NAME, text, self.incident, now)]

    def state_doc(self, now: float, wall_now: float) -> dict[str, object]:
        """As IncidentTracker.state_doc: an open incident is not alerted again after a
        restart of the watchdog, and its INFO still follows."""
        doc: dict[str, object] = {"count": self.count}
        if self.started is not None:
            doc["started"] = round(wall_now - (now - self.started))
        return doc

    def resume(self, doc: object, now: float, wall_now: float) -> None:
        if not isinstance(doc, dict):
            return
        count = doc.get("count")
        if isinstance(count, int) and count >= 0:
            self.count = count
        started = doc.get("started")
        if isinstance(started, int | float):
            self.started = now - max(0.0, wall_now - started)
