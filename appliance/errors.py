"""The one error hierarchy. Every expected failure is an AipbxError carrying a one-line
message, an optional hint for the operator and the exit code scripts can rely on."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # an operation failed (a step, a command, a check)
    USAGE = 2  # bad input: arguments, configuration, an artifact that is refused
    BUSY = 3  # another mutation holds the lock
    NOT_SETUP = 4  # the appliance has not been set up yet
    UNHEALTHY = 5  # doctor/status found problems


class AipbxError(Exception):
    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(AipbxError):
    """Invalid aipbx.toml (or another input file); message is `file:line: what is wrong`."""

    exit_code = ExitCode.USAGE


class UsageError(AipbxError):
    exit_code = ExitCode.USAGE


class LockedError(AipbxError):
    exit_code = ExitCode.BUSY


class NotSetUpError(AipbxError):
    exit_code = ExitCode.NOT_SETUP


class CommandError(AipbxError):
    """A subprocess failed. Carries the (masked) argv, its exit code and stderr."""

    def __init__(
        self, argv: Sequence[str], returncode: int, stderr: str, *, hint: str | None = None
    ) -> None:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{argv[0]} exited with {returncode}: {tail}", hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class NginxConfigError(AipbxError):
    """`nginx -t` refused a rendered configuration; nothing was reloaded."""
