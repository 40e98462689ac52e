"""Which alerts to send, and the queue of each channel. Pure: time is passed in.

An incident starts when a check stops being ok and ends when it has been ok (or idle) for
`recover_after` checks in a row. Within one incident at most one WARNING (slow, low disk, a
certificate expiring) and one CRITICAL (down for `critical_after`) are sent, and one INFO
when it ends, if anything was sent for it.

Each channel has an Outbox: a bounded queue drained at most `rate_per_min` per minute, the
head retried with exponential backoff while the channel fails. When it is full the oldest
INFO is dropped first, then the oldest WARNING, and every drop is counted."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from appliance.watchdog.backoff import Backoff
from appliance.watchdog.model import Status


class Severity(StrEnum):
    CRITICAL = "CRITICAL"
    WARNING = "WARNING"
    INFO = "INFO"


@dataclass(frozen=True)
class Alert:
    severity: Severity
    check: str  # a check name, or "restart:<unit>" for the restart budget
    text: str
    incident: str  # e.g. "nginx#3": the CRITICAL and the INFO of one incident share it
    at: float  # monotonic time it was raised
    wall: float = 0.0  # epoch seconds, filled in by the daemon for the message


def alert_doc(a: Alert) -> dict[str, object]:
    """An alert as the spool keeps it (epoch time: monotonic time does not survive a restart)."""
    return {
        "severity": str(a.severity),
        "check": a.check,
        "text": a.text,
        "incident": a.incident,
        "wall": a.wall,
    }


def alert_from_doc(d: object, now: float, wall_now: float) -> Alert | None:
    """The alert a spool entry describes, or None if it is not one (a torn or foreign file
    must not stop the watchdog)."""
    if not isinstance(d, dict):
        return None
    try:
        severity = Severity(d["severity"])
        check, text, incident = (str(d[k]) for k in ("check", "text", "incident"))
        wall = float(d["wall"])
    except (KeyError, TypeError, ValueError):
        return None
    return Alert(severity, check, text, incident, now - max(0.0, wall_now - wall), wall)


def _dur(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


class IncidentTracker:
    """Turns one check's statuses into alerts, de-duplicated per incident."""

    def __init__(self, check: str, critical_after: float, recover_after: int) -> None:
        self.check = check
        self.critical_after = critical_after
        self.recover_after = recover_after
        self.count = 0  # incidents so far (for the incident id)
        self.started: float | None = None  # None: no incident open
        self.down_since: float | None = None
        self.critical_sent = False
        self.warning_sent = False
        self.ok_streak = 0

    @property
    def incident(self) -> str:
        return f"{self.check}#{self.count}"

    def _alert(self, severity: Severity, text: str, now: float) -> Alert:
        return Alert(severity, self.check, text, self.incident, now)

    def observe(self, status: Status, now: float, detail: str) -> list[Alert]:
        if status in (Status.OK, Status.IDLE):
            return self._ok(status, now)
        self.ok_streak = 0
        if self.started is None:
            self.count += 1
            self.started = now
        if status is Status.WARNING:
            self.down_since = None
            if not self.warning_sent and not self.critical_sent:
                self.warning_sent = True
                return [self._alert(Severity.WARNING, f"{self.check}: {detail}", now)]
            return []
        if self.down_since is None:
            self.down_since = now
        if not self.critical_sent and now - self.down_since >= self.critical_after:
            self.critical_sent = True
            text = f"{self.check} is down for {_dur(now - self.down_since)}: {detail}"
            return [self._alert(Severity.CRITICAL, text, now)]
        return []

    def state_doc(self, now: float, wall_now: float) -> dict[str, object]:
        """What must survive a restart: the incident count, and the open incident (so it
        is not alerted again, and its INFO still follows). Times as epoch seconds."""
        doc: dict[str, object] = {"count": self.count}

        def wall(mono: float) -> int:  # whole seconds: the file changes with the state only
            return round(wall_now - (now - mono))

        if self.started is not None:
            doc["started"] = wall(self.started)
            doc["down_since"] = None if self.down_since is None else wall(self.down_since)
            doc["critical_sent"] = self.critical_sent
            doc["warning_sent"] = self.warning_sent
        return doc

    def resume(self, doc: object, now: float, wall_now: float) -> None:
        """Take back what state_doc saved; anything unreadable is ignored."""
        if not isinstance(doc, dict):
            return
        count = doc.get("count")
        if isinstance(count, int) and count >= 0:
            self.count = count
        started = doc.get("started")
        if not isinstance(started, int | float):
            return
        self.started = now - max(0.0, wall_now - started)
        down = doc.get("down_since")
        self.down_since = now - max(0.0, wall_now - down) if isinstance(down, int | float) else None
        self.critical_sent = doc.get("critical_sent") is True
        self.warning_sent = doc.get("warning_sent") is True

    def _ok(self, status: Status, now: float) -> list[Alert]:
        if self.started is None:
            return []
        self.ok_streak += 1
        self.down_since = None
        if self.ok_streak < self.recover_after and status is Status.OK:
            return []
        sent = self.critical_sent or self.warning_sent
        lasted = now - self.started
        self.started = None
        self.critical_sent = self.warning_sent = False
        self.ok_streak = 0
        if not sent:
            return []
        how = "is no longer checked" if status is Status.IDLE else "recovered"
        return [self._alert(Severity.INFO, f"{self.check} {how} after {_dur(lasted)}", now)]


class Outbox:
    """One channel's queue, rate limit (a token bucket) and retry backoff."""

    def __init__(self, capacity: int, rate_per_min: int, backoff: Backoff) -> None:
        self.capacity = capacity
        self.rate_per_min = rate_per_min
        self.backoff = backoff
        self.queue: deque[Alert] = deque()
        self.tokens = float(rate_per_min)
        self._refilled: float | None = None
        self.retry_at = 0.0
        self.in_flight = False
        self.sent = 0
        self.failed = 0  # failed attempts (each is retried)
        self.dropped = 0
        self.last_error = ""

    def _refill(self, now: float) -> None:
        if self._refilled is not None:
            rate = self.rate_per_min / 60.0
            self.tokens = min(float(self.rate_per_min), self.tokens + (now - self._refilled) * rate)
        self._refilled = now

    def push(self, alert: Alert) -> Alert | None:
        """Queue an alert; returns the one dropped to make room, if any."""
        dropped = None
        if len(self.queue) >= self.capacity:
            dropped = self._drop_one()
        if dropped is None and len(self.queue) >= self.capacity:
            # everything queued is in flight: make room by not queueing the oldest-in-wait
            self.dropped += 1
            return alert
        self.queue.append(alert)
        return dropped

    def _drop_one(self) -> Alert | None:
        first = 1 if self.in_flight else 0
        for severity in (Severity.INFO, Severity.WARNING, Severity.CRITICAL):
            for i in range(first, len(self.queue)):
                if self.queue[i].severity is severity:
                    victim = self.queue[i]
                    del self.queue[i]
                    self.dropped += 1
                    return victim
        return None

    def due(self, now: float) -> float | None:
        """When the head may be sent (now or later), None if nothing waits."""
        if not self.queue or self.in_flight:
            return None
        self._refill(now)
        at = max(now, self.retry_at)
        if self.tokens < 1 - 1e-9:  # float rounding of the refill must not cost a second
            at = max(at, now + (1 - self.tokens) * 60.0 / self.rate_per_min)
        return at

    def take(self, now: float) -> Alert | None:
        """The head, if it may be sent now; it stays queued until sent() or failed()."""
        due = self.due(now)
        if due is None or due > now:
            return None
        self.tokens -= 1
        self.in_flight = True
        return self.queue[0]

    def done(self, now: float) -> None:
        self.queue.popleft()
        self.in_flight = False
        self.sent += 1
        self.backoff.reset()
        self.last_error = ""

    def fail(self, now: float, error: str) -> None:
        self.in_flight = False
        self.failed += 1
        self.last_error = error
        self.retry_at = now + self.backoff.failed()
