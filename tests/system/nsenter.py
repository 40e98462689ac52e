"""Running a command inside a booted container from the host, with nsenter.

The host runs no systemd, so machinectl and `systemd-run -M` are not available
(shared/PACKAGING.md): `run_inside` enters all the namespaces of the container's init and
runs the command with a clean environment, killing it whole on a timeout.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run_inside(
    pid1: int,
    name: str,
    argv: list[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv in the namespaces of host PID `pid1`, the init of the machine `name` (named
    in errors). A non-zero exit (with `check`) or a timeout is an AssertionError."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    full = [
        "nsenter",
        "-t",
        str(pid1),
        "-a",
        "--",
        "env",
        "-i",
        f"PATH={CONTAINER_PATH}",
        "LANG=C.UTF-8",
        "HOME=/root",
        *extra,
        *argv,
    ]
    # A session of its own, so a timeout kills nsenter *and* its child in the container.
    proc = subprocess.Popen(
        full,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"in {name}: {shlex.join(argv)} timed out after {timeout:.0f} s\n"
            f"--- stdout\n{out}--- stderr\n{err}"
        ) from None
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and result.returncode != 0:
        raise AssertionError(
            f"in {name}: {shlex.join(argv)} exited with {result.returncode}\n"
            f"--- stdout\n{out}--- stderr\n{err}"
        )
    return result
