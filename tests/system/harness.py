"""What the system-test harness needs from the host, and how it reports.

`harness_problem()` says why the harness cannot run here (callers turn that into a failure,
never a skip); `HarnessError` is raised when it cannot do its job; `log` is its progress on
stderr. Shared by the rootfs builder (rootfs.py) and the booted machine (machine.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# The host's apt sources: they name the Debian mirror the rootfs is built from.
HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# The environment every systemd-nspawn the harness starts runs with.
NSPAWN_ENV = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}


class HarnessError(RuntimeError):
    """The system-test harness cannot do its job (not root, tool missing, boot failed)."""


def log(msg: str) -> None:
    print(f"[machine] {msg}", file=sys.stderr, flush=True)


def harness_problem() -> str | None:
    """Why the harness cannot run here, or None. Callers turn this into a failure."""
    if os.geteuid() != 0:
        return "system tests need root (debootstrap, mount, systemd-nspawn, nsenter)"
    missing = [
        tool
        for tool in ("debootstrap", "systemd-nspawn", "nsenter", "mount", "umount", "cp")
        if shutil.which(tool) is None
    ]
    if missing:
        return (
            f"missing tools: {', '.join(missing)} "
            "(apt-get install -y debootstrap systemd-container util-linux)"
        )
    if not HOST_SOURCES.is_file():
        return f"{HOST_SOURCES} not found: it names the Debian mirror the rootfs is built from"
    return None
