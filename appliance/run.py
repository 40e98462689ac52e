"""The one way this package starts a process: argv lists only, never a shell; the command is
logged with secrets masked; a failure raises CommandError with argv, exit code and stderr."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from appliance.errors import CommandError

log = logging.getLogger("aipbx.run")


def masked(argv: Sequence[str], secrets: Sequence[str] = ()) -> list[str]:
    out = []
    for arg in argv:
        for s in secrets:
            if s:
                arg = arg.replace(s, "***")
        out.append(arg)
    return out


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    secrets: Sequence[str] = (),
    timeout: float | None = 300,
    hint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capturing text output. `env` is added to the current environment."""
    shown = masked(argv, secrets)
    log.debug("+ %s", shlex.join(shown))
    full_env = {**os.environ, **env} if env else None
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(shown, 127, f"{argv[0]}: not found", hint=hint) from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(shown, -1, f"timed out after {timeout}s", hint=hint) from e
    if check and proc.returncode != 0:
        stderr = masked([proc.stderr or proc.stdout], secrets)[0]
        raise CommandError(shown, proc.returncode, stderr, hint=hint)
    return proc
