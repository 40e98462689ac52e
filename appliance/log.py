"""Logging: to the journal with structured AIPBX_* fields when journald is there, to stderr
for the operator. `audit()` records every change an operator makes (DESIGN decision 14)."""

from __future__ import annotations

import logging
import os
import pwd
import sys
from typing import Any

AUDIT = logging.getLogger("aipbx.audit")


class _JournalFields(logging.Filter):
    """Copy `extra={"fields": {...}}` into upper-case AIPBX_ journal fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, Any] = getattr(record, "fields", {}) or {}
        for k, v in fields.items():
            setattr(record, f"AIPBX_{k.upper()}", str(v))
        return True


def setup(verbose: bool = False, *, identifier: str = "aipbxctl", stderr: bool = True) -> None:
    root = logging.getLogger("aipbx")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    if stderr:
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(logging.DEBUG if verbose else logging.WARNING)
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    if os.path.exists("/run/systemd/journal/socket"):
        try:
            from systemd.journal import JournalHandler

            jh = JournalHandler(SYSLOG_IDENTIFIER=identifier)
            jh.setLevel(logging.INFO)
            jh.addFilter(_JournalFields())
            root.addHandler(jh)
        except ImportError:
            pass


def operator() -> str:
    """Who acts: the sudo caller when there is one, else the effective user."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def audit(action: str, outcome: str, **details: Any) -> None:
    fields = {"action": action, "outcome": outcome, "operator": operator(), **details}
    detail = " ".join(f"{k}={v}" for k, v in details.items())
    level = logging.INFO if outcome in ("ok", "unchanged") else logging.ERROR
    AUDIT.log(
        level,
        "audit: %s by %s: %s%s",
        action,
        fields["operator"],
        outcome,
        f" ({detail})" if detail else "",
        extra={"fields": {"audit": "1", **fields}},
    )
