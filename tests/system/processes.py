"""Host processes the harness started, told apart from a reused PID by their start time.

Only processes the harness started are ever signalled, always by PID, and only after
checking the PID still names the same process (`kill_exact`). `container_init` finds the
host PID of a container's init among the descendants of its systemd-nspawn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (to tell a PID from a reused one), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def descendants(pid: int) -> Iterator[int]:
    # /proc/<pid>/task/*/children needs CONFIG_PROC_CHILDREN, which not every kernel has:
    # build the tree from every process's parent instead.
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    todo = list(kids.get(pid, []))
    while todo:
        kid = todo.pop()
        yield kid
        todo += kids.get(kid, [])


def container_init(nspawn_pid: int, *, booted: bool = True) -> int | None:
    """The host PID of the container's init: the descendant of nspawn that is PID 1 in its
    own PID namespace. With `booted`, only once it has exec'd systemd (before that it is
    still nspawn's code and entering it would race the namespace setup)."""
    for pid in descendants(nspawn_pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) > 1 and ids[-1] == "1" and (comm == "systemd" or not booted):
                    return pid
    return None


def kill_exact(pid: int, start: int | None, sig: int = signal.SIGKILL) -> None:
    """Signal `pid` only if it is still the process that started at `start`."""
    if start is not None and start_time(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while start is not None and start_time(pid) == start:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
