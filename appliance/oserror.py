"""An OSError that reached a command (a full disk under state.json, a read-only file
system, an I/O error) as one line with a hint, never a traceback."""

from __future__ import annotations

import errno

from appliance.errors import AipbxError

_HINTS = {
    errno.ENOSPC: "free space on that file system (`df -h`; `aipbxctl releases` lists old "
    "releases; `journalctl --vacuum-size=…`)",
    errno.EDQUOT: "a disk quota is full: raise it or free space",
    errno.EROFS: "the file system is read-only: `mount` and the kernel log say why",
    errno.EIO: "an I/O error: the kernel log (`journalctl -k`) says which disk",
    errno.EACCES: "permission denied: run it as root (sudo)",
    errno.EPERM: "not permitted: run it as root (sudo)",
}


def as_error(e: OSError, *, doing: str = "") -> AipbxError:
    """One line: what failed, on which file, why; and what to do."""
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    why = e.strerror or str(e)
    parts = [p for p in (doing, str(where) if where else "", why) if p]
    return AipbxError(": ".join(parts), hint=_HINTS.get(e.errno or 0))
