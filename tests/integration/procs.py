"""Helpers for integration tests: free loopback ports, processes we start and stop by PID."""

from __future__ import annotations

import glob
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Debian's PostgreSQL server binaries (initdb, postgres), newest major first.
PG_BIN = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def as_postgres(argv: list[str], input: str | None = None) -> None:
    """Run argv as the postgres user (initdb, psql), failing loudly."""
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        text=True,
        input=input,
        capture_output=True,
        check=True,
    )
