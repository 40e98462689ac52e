"""Cleaning up after a test session that was killed before it cleaned up.

Every machine keeps a state file (`write_state`) in its work directory under the cache:
the session that owns it, its systemd-nspawn, the container's init, each with its kernel
start time. `sweep_stale_machines()` stops and removes the machines whose session is gone,
killing a process only if its PID still names the process that session started.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.system.harness import HarnessError, log
from tests.system.mounts import mounts_under, remove_tree, umount
from tests.system.processes import container_init, kill_exact, start_time, wait_gone


def write_state(
    workdir: Path, *, nspawn_pid: int | None, pid1: int | None, root: Path, storage: str
) -> None:
    """Record (atomically) what a sweep would need to clean up the machine in `workdir`."""
    me = os.getpid()
    state = {
        "owner": [me, start_time(me)],
        "nspawn": [nspawn_pid, start_time(nspawn_pid)] if nspawn_pid else None,
        "pid1": [pid1, start_time(pid1)] if pid1 else None,
        "root": str(root),
        "storage": storage,
    }
    tmp = workdir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, workdir / "state.json")


def sweep_stale_machines(cache_dir: Path) -> None:
    """Stop and remove machines left by a session that was killed before it cleaned up.
    A process is only killed if its PID still names the process that session started."""
    for workdir in sorted(cache_dir.resolve().glob("machine-*")):
        try:
            state = json.loads((workdir / "state.json").read_text())
        except (OSError, ValueError):
            if time.time() - workdir.stat().st_mtime < 600:
                continue  # a parallel session may be creating it right now
            state = {}
        owner = state.get("owner") or [0, None]
        if owner[1] is not None and start_time(owner[0]) == owner[1]:
            continue  # its session is alive (maybe a parallel run)
        log(f"cleaning up {workdir}, left by a session that is gone")
        procs: list[tuple[int, int | None]] = []
        if state.get("pid1"):
            procs.append((state["pid1"][0], state["pid1"][1]))
        if state.get("nspawn"):
            nspawn_pid, nspawn_start = state["nspawn"]
            if start_time(nspawn_pid) == nspawn_start:
                # An init not recorded yet (the session died during boot) dies first too.
                init = container_init(nspawn_pid, booted=False)
                if init is not None:
                    procs.append((init, start_time(init)))
            procs.append((nspawn_pid, nspawn_start))
        for pid, start in procs:
            kill_exact(pid, start)
            if not wait_gone(pid, start, 10):
                raise HarnessError(f"leftover process {pid} of {workdir} survived SIGKILL")
        for point in reversed(mounts_under(workdir)):
            umount(Path(point))
        remove_tree(workdir)
