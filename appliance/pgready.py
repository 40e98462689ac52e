"""Whether PostgreSQL answers, asked before an upgrade touches the database and after a
database step failed: a stopped server must be named as such ("PostgreSQL is not
answering on 127.0.0.1:5432: start it"), not as the exit status of the tool that met it
("runuser exited with 1")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.config import Config
from appliance.errors import AipbxError, CommandError
from appliance.run import run

START_HINT = "`systemctl start postgresql` (its log: `journalctl -u postgresql@15-main`)"

# What libpq-based tools (psql, pg_dump) and drivers print when the server is not there,
# is starting or stopping, or went away mid-way.
UNREACHABLE = re.compile(
    r"could not connect to (the )?server"
    r"|connection to server .{0,160}failed: (Connection refused|No such file or directory"
    r"|Connection timed out|timeout expired|server closed the connection)"
    r"|Is the server running"
    r"|the database system is (starting up|shutting down|in recovery mode|not yet accepting)"
    r"|server closed the connection unexpectedly"
    r"|terminating connection due to administrator command"
    r"|no connection to the server"
    r"|ECONNREFUSED",
    re.IGNORECASE,
)

# pg_isready's exit codes
_WHY = {1: "it rejects connections: starting up or shutting down", 2: "no answer"}


class PostgresDown(AipbxError):
    """PostgreSQL does not answer: nothing the upgrade could do about it."""


@dataclass(frozen=True)
class Down:
    where: str  # 127.0.0.1:5432, the local socket (port 5432)
    why: str


def looks_unreachable(text: str) -> bool:
    """Pure: whether a tool's error says the server was not there (or went away)."""
    return bool(UNREACHABLE.search(text))


def probe(cfg: Config, *, timeout_s: int = 3) -> Down | None:
    """None when PostgreSQL answers on the local socket (what pg_dump and psql as postgres
    use) and on 127.0.0.1 (what a migration uses), or when pg_isready cannot tell (it is
    not installed); else where it does not answer and why."""
    found = _ask(cfg, timeout_s)
    return found if isinstance(found, Down) else None


def _ask(cfg: Config, timeout_s: int) -> Down | bool:
    """Down, True (it answers) or False (pg_isready cannot tell)."""
    port = str(cfg.database.postgres_port)
    for where, extra in (
        (f"the local socket (port {port})", []),
        (f"127.0.0.1:{port}", ["-h", "127.0.0.1"]),
    ):
        argv = ["pg_isready", "-q", "-p", port, "-t", str(timeout_s), *extra]
        try:
            code = run(argv, check=False, timeout=timeout_s + 5).returncode
        except CommandError:  # not installed, or hung past its own timeout
            return False
        if code in _WHY:
            return Down(where, _WHY[code])
        if code != 0:
            return False  # 3: no attempt (bad parameters)
    return True


def down_message(d: Down, *, verb: str = "upgrade") -> str:
    return (
        f"PostgreSQL is not answering on {d.where} ({d.why}): start it "
        f"(systemctl start postgresql) and run the {verb} again"
    )


def check(cfg: Config, *, verb: str = "upgrade", consequence: str = "nothing was changed") -> None:
    """Before an upgrade touches the database: PostgresDown when it does not answer."""
    d = probe(cfg)
    if d is not None:
        raise PostgresDown(f"{down_message(d, verb=verb)}; {consequence}", hint=START_HINT)


def explain(cfg: Config, e: AipbxError, *, consequence: str) -> PostgresDown | None:
    """A database step failed with `e`: a PostgresDown naming the server when its error
    says the server was unreachable and the server indeed does not answer now (or cannot
    be asked); None when the failure was something else."""
    text = e.message + "\n" + (e.stderr if isinstance(e, CommandError) else "")
    if not looks_unreachable(text):
        return None
    found = _ask(cfg, 3)
    if found is True:
        return None  # it answers now: the error was something else (or it is back)
    d = found or Down(f"port {cfg.database.postgres_port}", "its tools could not reach it")
    return PostgresDown(f"{down_message(d)}; {consequence}", hint=START_HINT)
