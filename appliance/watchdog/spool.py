"""The watchdog's alerting state on disk, so a restart (a package upgrade, WatchdogSec=,
a crash, a power cut) loses no alert and repeats none: the alerts not yet delivered, per
channel, and each check's open incident (an incident alerted before the restart is not
alerted again, and its INFO still follows with the same incident id).

One small JSON file in /var/lib/aipbx/watchdog (the only directory the watchdog's unit
may write), replaced atomically (fsync, rename) whenever it would change: alerts are rare,
so are the writes. The file an older appliance kept in /var/lib/aipbx (`legacy`) is read
when the new one does not exist yet, and then written in the new place. A file that
cannot be read is reported once and ignored; it must never keep the watchdog from
supervising."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from appliance.fsutil import atomic_write

log = logging.getLogger("aipbx.watchdog")

SCHEMA = "aipbx-watchdog-alerts/1"


class Spool:
    def __init__(self, path: Path, legacy: Path | None = None) -> None:
        self.path = path
        self.legacy = legacy
        self._written: str | None = None
        self._saved: dict[str, Any] | None = None  # the doc behind _written, once saved
        self._failing = False

    def load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            if self.legacy is None:
                return {}
            return Spool(self.legacy).load()  # _written stays unset: saved anew at once
        except OSError as e:
            log.error("cannot read %s: %s; starting without it", self.path, e)
            return {}
        try:
            doc = json.loads(text)
        except ValueError:
            log.error("%s is not JSON; starting without it", self.path)
            return {}
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            log.error("%s is not a %s file; starting without it", self.path, SCHEMA)
            return {}
        self._written = text
        return doc

    def save(self, monitor: dict[str, Any], queues: dict[str, Any]) -> None:
        doc = {"schema": SCHEMA, "monitor": monitor, "queues": queues}
        if doc == self._saved:  # called every round: compared, not serialized, first
            return
        text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
        if text == self._written:
            self._saved = doc
            return
        try:
            if not self.path.parent.is_dir():  # systemd makes it (StateDirectory=)
                self.path.parent.mkdir(mode=0o700)
            atomic_write(self.path, text, mode=0o600)
        except OSError as e:
            if not self._failing:  # once per streak of failures, not every round
                log.error("cannot write %s: %s; alerts would not survive a restart", self.path, e)
            self._failing = True
            return
        if self._failing:
            log.info("%s is written again", self.path)
        self._failing = False
        self._written = text
        self._saved = doc
