"""What the watchdog writes to the journal at each transition: a check's state, a breaker,
the watchdog's own trouble. Structured: `fields` become AIPBX_CHECK, AIPBX_STATE,
AIPBX_BREAKER, AIPBX_UNIT, AIPBX_ACTION... (appliance.log)."""

from __future__ import annotations

import logging

from appliance.watchdog.alerts import Alert, Severity
from appliance.watchdog.breaker import BreakerState, Transition
from appliance.watchdog.model import Result, Status

log = logging.getLogger("aipbx.watchdog")

STATUS_LEVEL = {
    Status.CRITICAL: logging.ERROR,
    Status.WARNING: logging.WARNING,
    Status.OK: logging.INFO,
    Status.IDLE: logging.INFO,
    # The watchdog's own trouble, said once at CRITICAL by own_fault(); per check, less.
    Status.UNKNOWN: logging.WARNING,
}


def status(check: str, unit: str | None, result: Result, old: Status) -> None:
    new = result.status
    if new is Status.OK and old in (Status.CRITICAL, Status.WARNING):
        text = f"{check} is ok again ({result.detail})"
    elif new in (Status.OK, Status.IDLE):
        text = f"{check}: {new} ({result.detail})"
    elif new is Status.UNKNOWN:
        text = f"{check}: unknown: the watchdog cannot check: {result.error}"
    else:
        text = f"{check}: {new}: {result.error}"
    fields = {"check": check, "state": str(new), "previous": str(old)}
    if unit:
        fields["unit"] = unit
    log.log(STATUS_LEVEL[new], text, extra={"fields": fields})


def breaker(
    check: str, unit: str | None, result: Result, t: Transition | None, *, settling: bool
) -> None:
    if t is None:
        return
    if t.new is BreakerState.OPEN:
        level, why = logging.WARNING, f"after {t.failures} failures: {result.error}"
    elif t.new is BreakerState.HALF_OPEN:
        level, why = logging.INFO, "restarted, probing" if settling else "cool-down over, probing"
    else:
        level, why = logging.INFO, "closed"
    fields = {"check": check, "state": str(result.status), "breaker": str(t.new)}
    if unit:
        fields["unit"] = unit
    log.log(level, f"{check}: breaker {t.old} -> {t.new} ({why})", extra={"fields": fields})


def own_fault(alert: Alert) -> None:
    """The watchdog impaired (CRITICAL, once per incident) or whole again (INFO)."""
    impaired = alert.severity is Severity.CRITICAL
    fields = {
        "check": "watchdog",
        "state": "impaired" if impaired else "ok",
        "action": "own_fault" if impaired else "own_fault_over",
        "incident": alert.incident,
    }
    level = logging.CRITICAL if impaired else logging.INFO
    log.log(level, "%s", alert.text, extra={"fields": fields})
