"""Deadlines that a clock jump neither ends nor prolongs: seconds of CLOCK_BOOTTIME (counts
from boot, suspend included, never set by anyone) and the boot they belong to
(/proc/sys/kernel/random/boot_id). A deadline recorded in another boot has passed: the
processes it waited for (the old color, its connections, its calls) went with that boot.

The wall clock is kept beside it only to show a time to people (`status`); no decision
reads it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Now:
    boot_id: str
    boottime: float  # CLOCK_BOOTTIME seconds
    wall: float  # time.time(), for display only


@dataclass(frozen=True)
class Deadline:
    boot_id: str
    at: float  # CLOCK_BOOTTIME seconds in boot `boot_id`
    wall: float = 0.0  # the wall clock's idea of `at` when it was recorded: display only

    def left(self, now: Now) -> float:
        """Pure: seconds until the deadline; 0 once it passed or in another boot."""
        if now.boot_id != self.boot_id:
            return 0.0
        return max(0.0, self.at - now.boottime)

    def same_boot(self, now: Now) -> bool:
        return now.boot_id == self.boot_id

    def to_doc(self) -> dict[str, object]:
        return {"boot_id": self.boot_id, "boottime": self.at, "deadline": self.wall}

    @staticmethod
    def from_doc(doc: Mapping[str, Any]) -> Deadline:
        """The record to_doc wrote (ValueError, TypeError, KeyError when it is not one).
        One without a boot_id (written by an appliance before boot-time deadlines: wall
        clock only) belongs to no boot: it has passed."""
        wall = float(doc.get("deadline") or 0.0)
        if "boot_id" not in doc:
            return Deadline("", 0.0, wall)
        return Deadline(str(doc["boot_id"]), float(doc["boottime"]), wall)


def in_seconds(now: Now, seconds: float) -> Deadline:
    """Pure: the deadline `seconds` from `now`."""
    return Deadline(now.boot_id, now.boottime + seconds, now.wall + seconds)


INIT_STAT = Path("/proc/1/stat")


def boot_id() -> str:
    """The kernel's boot id, and when PID 1 started (clock ticks after the kernel's boot):
    a container (systemd-nspawn) shares the host's kernel and its boot id, but its own
    PID 1 starts again at each of its boots."""
    try:
        kernel = BOOT_ID.read_text().strip()
    except OSError:  # no /proc: every deadline of this process's boot still compares equal
        return "unknown"
    try:
        # field 22 (starttime), counted after the command's closing parenthesis
        init_start = INIT_STAT.read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return kernel
    return f"{kernel}/{init_start}"


_BOOT_ID: str | None = None


def now() -> Now:
    global _BOOT_ID
    if _BOOT_ID is None:
        _BOOT_ID = boot_id()
    return Now(_BOOT_ID, time.clock_gettime(time.CLOCK_BOOTTIME), time.time())


def sleep(seconds: float) -> None:
    """The rollouts' sleep (one name for tests to replace, with now)."""
    time.sleep(seconds)
