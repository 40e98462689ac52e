"""The one way this package starts a process: argv lists only, never a shell; the command is
logged with secrets masked; a failure raises CommandError with argv, exit code and stderr.

- run(): text output captured (most commands);
- run_bytes(): binary output captured, stdin from a file opened here (a pg tool run as
  postgres reads a file only root may open);
- run_as(): as another user with exactly the environment given, in a session of its own
  whose every process is killed when it ends or times out (a release's migration);
- run_pipe(): `first | second` with this process relaying between them (pg_restore into
  psql, inside a transaction committed only when the first succeeded).

A command that cannot be started raises CommandError 127 ("not found") or 126 (found but
not executable: the OS's reason); a timeout kills it and raises CommandError -1."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import selectors
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from appliance.errors import CommandError
from appliance.safefs import open_input

log = logging.getLogger("aipbx.run")

CHUNK = 1 << 20


def masked(argv: Sequence[str], secrets: Sequence[str] = ()) -> list[str]:
    out = []
    for arg in argv:
        for s in secrets:
            if s:
                arg = arg.replace(s, "***")
        out.append(arg)
    return out


def _secs(timeout: float | None) -> str:
    return f"{timeout:g}s" if timeout is not None else "no timeout"


def _not_started(
    argv: Sequence[str], shown: list[str], e: OSError, hint: str | None
) -> CommandError:
    # e.filename is argv[0], or the working directory when that is what failed.
    what = e.filename or argv[0]
    if isinstance(e, FileNotFoundError):
        return CommandError(shown, 127, f"{what}: not found", hint=hint)
    return CommandError(shown, 126, f"{what}: {e.strerror or e}", hint=hint)


def _timed_out(
    shown: list[str], timeout: float | None, hint: str | None, output: str = ""
) -> CommandError:
    why = f"timed out after {_secs(timeout)}"
    return CommandError(shown, -1, f"{output}\n{why}" if output else why, hint=hint)


def _failed(
    shown: list[str], code: int, err: bytes | str, secrets: Sequence[str], hint: str | None
) -> CommandError:
    text = err.decode(errors="replace") if isinstance(err, bytes) else err
    return CommandError(shown, code, masked([text], secrets)[0], hint=hint)


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
    proc: subprocess.CompletedProcess[str] = _complete(
        argv, shown, timeout, hint, input=input, text=True, env=full_env, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise _failed(shown, proc.returncode, proc.stderr or proc.stdout, secrets, hint)
    return proc


def _complete(
    argv: Sequence[str],
    shown: list[str],
    timeout: float | None,
    hint: str | None,
    **how: Any,
) -> subprocess.CompletedProcess[Any]:
    """subprocess.run with output captured, its start and timeout errors as CommandError;
    `how`: text, input or stdin, env, cwd."""
    try:
        return subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False, **how)
    except OSError as e:
        raise _not_started(argv, shown, e, hint) from e
    except subprocess.TimeoutExpired as e:
        raise _timed_out(shown, timeout, hint) from e


def _stdin(stack: contextlib.ExitStack[Any], stdin: Path | int | None) -> int:
    """The fd a command reads: a file opened here (closed with the stack), the caller's fd,
    or /dev/null."""
    if stdin is None:
        return subprocess.DEVNULL
    if isinstance(stdin, int):
        return stdin
    fd = open_input(stdin)
    stack.callback(os.close, fd)
    return fd


def run_bytes(
    argv: Sequence[str],
    *,
    stdin: Path | int | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    secrets: Sequence[str] = (),
    timeout: float | None = 300,
    hint: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv, capturing binary output. `stdin` is opened here, by this process (so a
    command that runs as another user needs no access to it), as a regular file through no
    link another user owns (safefs.open_input), or is an fd the caller opened (read from
    its offset); without it, /dev/null. `env`
    is added to the current environment. On a failure the error text is stderr (or stdout
    when stderr is empty), decoded."""
    shown = masked(argv, secrets)
    log.debug("+ %s%s", shlex.join(shown), f" < {stdin}" if stdin is not None else "")
    full_env = {**os.environ, **env} if env else None
    with contextlib.ExitStack() as stack:
        src = _stdin(stack, stdin)
        proc: subprocess.CompletedProcess[bytes] = _complete(
            argv, shown, timeout, hint, stdin=src, env=full_env, cwd=cwd
        )
    if check and proc.returncode != 0:
        raise _failed(shown, proc.returncode, proc.stderr or proc.stdout, secrets, hint)
    return proc


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_as(
    argv: Sequence[str],
    *,
    user: str,
    env: Mapping[str, str],
    cwd: str | Path,
    umask: int = 0o027,
    check: bool = True,
    secrets: Sequence[str] = (),
    timeout: float | None = 300,
    hint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv as `user` (its primary group, no supplementary groups: needs root) with
    exactly `env` as its environment, stdin from /dev/null, in a session and process group
    of its own. stdout and stderr go, interleaved as written, to a temporary file (a
    background process left holding them blocks nothing) returned as .stdout (.stderr is
    empty). When it ends, times out or this process is interrupted, whatever is left in its
    process group is killed. A timeout raises CommandError -1 whose stderr is the output so
    far and then "timed out after Ns"."""
    shown = masked(argv, secrets)
    log.debug("+ %s (as %s, in %s)", shlex.join(shown), user, cwd)
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise CommandError(shown, 126, f"there is no user {user}", hint=hint) from None
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                user=pw.pw_uid,
                group=pw.pw_gid,
                extra_groups=[],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=umask,
            )
        except OSError as e:
            raise _not_started(argv, shown, e, hint) from e
        timed_out = False
        try:
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _killpg(proc.pid)
                code = proc.wait()
        except BaseException:
            _killpg(proc.pid)
            proc.wait()
            raise
        finally:
            _killpg(proc.pid)  # whatever it left running in its group goes too
        output.seek(0)
        text = output.read().decode(errors="replace")
    if timed_out:
        raise _timed_out(shown, timeout, hint, masked([text], secrets)[0])
    if check and code != 0:
        raise _failed(shown, code, text, secrets, hint)
    return subprocess.CompletedProcess(list(argv), code, text, "")


class PipelineError(CommandError):
    """A process of run_pipe failed; `stage` is 0 for the first, 1 for the second."""

    def __init__(
        self,
        stage: int,
        argv: Sequence[str],
        returncode: int,
        stderr: str,
        *,
        hint: str | None = None,
    ) -> None:
        super().__init__(argv, returncode, stderr, hint=hint)
        self.stage = stage


class _Expired(Exception):
    """The deadline of run_pipe has passed."""


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left (None: no deadline); _Expired once it has passed."""
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise _Expired
        return left


class _Fd:
    """A non-blocking pipe end, waited on until a deadline."""

    def __init__(self, f: IO[bytes], event: int, deadline: _Deadline) -> None:
        self.fd = f.fileno()
        os.set_blocking(self.fd, False)
        self.deadline = deadline
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, event)

    def wait(self) -> None:
        while not self.sel.select(self.deadline.left()):
            pass

    def read(self) -> bytes:
        while True:
            self.wait()
            with contextlib.suppress(BlockingIOError):
                return os.read(self.fd, CHUNK)

    def write(self, data: bytes) -> None:
        """BrokenPipeError when the reader has gone."""
        view = memoryview(data)
        while view:
            self.wait()
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        self.sel.close()


def run_pipe(
    first: Sequence[str],
    second: Sequence[str],
    *,
    stdin: Path | int | None = None,
    head: bytes = b"",
    tail: bytes = b"",
    secrets: Sequence[str] = (),
    timeout: float | None = 300,
    hint: str | None = None,
) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
    """`first | second`, with this process relaying between them. `stdin` (opened here, as
    in run_bytes; else /dev/null) is the first's input. The second reads `head`, then all
    the first writes, then `tail` only once the first has exited 0: a second that treats an
    input ending early as "abort" (psql inside BEGIN without COMMIT) never gets a partial
    stream completed. The stderr of each, and the second's stdout, are captured (the first's
    .stdout is empty: it went to the second).

    Both are always waited for. A failure raises PipelineError for the process that failed
    first: the first's own failure (not its kill here because the second stopped reading)
    before the second's; a second that exits 0 without reading all its input has failed
    too. On a timeout, or an exception here, both are killed and this process's ends of
    their pipes closed (so what they started sees EOF or EPIPE)."""
    shown = (masked(first, secrets), masked(second, secrets))
    log.debug(
        "+ %s%s | %s",
        shlex.join(shown[0]),
        f" < {stdin}" if stdin is not None else "",
        shlex.join(shown[1]),
    )
    deadline = _Deadline(timeout)
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        src = _stdin(stack, stdin)
        errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(2)]
        out = stack.enter_context(tempfile.TemporaryFile())
        streams: list[tuple[IO[bytes] | int, int, IO[bytes]]] = [
            (src, subprocess.PIPE, errs[0]),
            (subprocess.PIPE, out.fileno(), errs[1]),
        ]
        unread = killed_first = False  # the second did not get all; the first was killed here
        try:
            for stage, argv in enumerate((first, second)):
                p_in, p_out, p_err = streams[stage]
                try:
                    procs.append(
                        subprocess.Popen(list(argv), stdin=p_in, stdout=p_out, stderr=p_err)
                    )
                except OSError as e:
                    why = _not_started(argv, shown[stage], e, hint)
                    raise PipelineError(
                        stage, why.argv, why.returncode, why.stderr, hint=hint
                    ) from e
            p1, p2 = procs
            assert p1.stdout is not None and p2.stdin is not None
            reader = _Fd(p1.stdout, selectors.EVENT_READ, deadline)
            writer = _Fd(p2.stdin, selectors.EVENT_WRITE, deadline)
            stack.callback(reader.close)
            stack.callback(writer.close)
            try:
                writer.write(head)
                while chunk := reader.read():
                    writer.write(chunk)
            except BrokenPipeError:
                unread = killed_first = True  # the first has nowhere to write any more
                p1.kill()
            p1.stdout.close()
            rc1 = p1.wait(deadline.left())
            if not unread and rc1 == 0:
                try:
                    writer.write(tail)
                except BrokenPipeError:
                    unread = True
            with contextlib.suppress(BrokenPipeError):
                p2.stdin.close()
            rc2 = p2.wait(deadline.left())
        except (_Expired, subprocess.TimeoutExpired):
            stage = 0 if procs[0].poll() is None else 1
            _stop(procs)
            raise PipelineError(
                stage, shown[stage], -1, f"timed out after {_secs(timeout)}", hint=hint
            ) from None
        except BaseException:
            _stop(procs)
            raise
        err = []
        for f in errs:
            f.seek(0)
            err.append(masked([f.read().decode(errors="replace")], secrets)[0])
        out.seek(0)
        stdout = out.read()
    if rc1 != 0 and not (killed_first and rc1 == -signal.SIGKILL):
        raise PipelineError(0, shown[0], rc1, err[0], hint=hint)
    if rc2 != 0:
        raise PipelineError(1, shown[1], rc2, err[1], hint=hint)
    if unread:
        text = f"{err[1]}\nit stopped reading its input before the end"
        raise PipelineError(1, shown[1], rc2, text.lstrip(), hint=hint)
    return (
        subprocess.CompletedProcess(list(first), rc1, b"", err[0].encode()),
        subprocess.CompletedProcess(list(second), rc2, stdout, err[1].encode()),
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill and reap; close this process's ends of their pipes."""
    for p in procs:
        p.kill()
    for p in procs:
        for f in (p.stdin, p.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        p.wait()
