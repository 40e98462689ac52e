"""Helpers for integration tests: free loopback ports, processes we start and stop by PID."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def postgres_cluster(workdir: Path) -> Iterator[int]:
    """A throwaway PostgreSQL (initdb in workdir, which postgres must own) on 127.0.0.1 and a
    socket in workdir, local peer and SCRAM over TCP as Debian's cluster; yields its port."""
    port = free_port()
    pwfile = workdir / "pw"
    pwfile.write_text("superpw\n")
    os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    as_postgres(
        [
            str(PG_BIN / "initdb"),
            "-D",
            str(workdir / "data"),
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        ]
    )
    server = [str(PG_BIN / "postgres"), "-D", str(workdir / "data"), "-p", str(port)]
    server += ["-k", str(workdir), "-c", "listen_addresses=127.0.0.1"]
    proc = subprocess.Popen(["runuser", "-u", "postgres", "--", *server])
    try:
        wait_for(lambda: port_open(port), what="postgres")
        yield port
    finally:
        stop(proc)


def create_app_database(workdir: Path, port: int, role: str, database: str, password: str) -> None:
    """The app's role (SCRAM) and its database, as `aipbxctl setup` makes them."""
    sql = (
        "SET password_encryption = 'scram-sha-256';\n"
        f"CREATE ROLE {role} LOGIN PASSWORD '{password.replace(chr(39), chr(39) * 2)}';\n"
        f"CREATE DATABASE {database} OWNER {role};\n"
    )
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(workdir), "-p", str(port)]
    as_postgres([*argv, "-d", "postgres"], input=sql)
