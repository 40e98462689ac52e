"""The watchdog's own failure, told from a service's: an error that says the watchdog
could not check (no file descriptor, memory, port, thread or process to check with, or
not allowed to) says nothing about the service checked. Such a check is UNKNOWN, and
UNKNOWN never restarts anything: a local user who exhausts the watchdog's resources must
not make it restart healthy services.

Pure: an exception in, a reason (or None: the service's failure) out."""

from __future__ import annotations

import errno

# errno values that describe the caller's resources or rights, never the peer's answer.
# From socket(), connect() setup, open(), fork()/exec() and thread creation.
OWN_ERRNOS = {
    errno.EMFILE: "no file descriptor left in the watchdog (EMFILE)",
    errno.ENFILE: "no file descriptor left on the host (ENFILE)",
    errno.ENOMEM: "out of memory (ENOMEM)",
    errno.ENOBUFS: "out of socket buffers (ENOBUFS)",
    # connect() on Linux: no free local port for the connection.
    errno.EADDRNOTAVAIL: "no free local port (EADDRNOTAVAIL)",
    # fork(): the process limit; a TCP connect(): no free local port either.
    errno.EAGAIN: "no process or port left (EAGAIN)",
    errno.EPERM: "not permitted (EPERM)",
    errno.EACCES: "permission denied (EACCES)",
}


def _chain(e: BaseException) -> list[BaseException]:
    """e, then what it was raised from (a CommandError from the OSError of a failed fork).
    Not __context__: a service's error raised while handling another is the service's."""
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__
    return seen


def own_fault(e: BaseException) -> str | None:
    """Why the watchdog itself could not check, or None when the error is the service's
    (refused, reset, timed out, a bad answer)."""
    for x in _chain(e):
        if isinstance(x, MemoryError):
            return "out of memory (MemoryError)"
        if isinstance(x, RuntimeError) and "can't start new thread" in str(x):
            return "cannot start a thread"
        if isinstance(x, OSError) and x.errno in OWN_ERRNOS:
            return OWN_ERRNOS[x.errno]
    return None
