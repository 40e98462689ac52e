"""Atomic file and symlink switches and the mutation lock. Files that must survive power loss
are fsynced, then renamed over the old one, then the directory is fsynced."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from appliance.errors import AipbxError, LockedError


def write_all(fd: int, data: bytes) -> int:
    """Write all of `data` to a blocking `fd`: a short write (a full disk, a pipe) is
    continued, and raises once nothing more can be written. Returns len(data)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: str | bytes,
    *,
    mode: int = 0o644,
    uid: int = -1,
    gid: int = -1,
) -> None:
    """Write data to path via a temp file in the same directory, fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_if_changed(
    path: Path, data: str, *, mode: int = 0o644, uid: int = -1, gid: int = -1
) -> bool:
    """atomic_write unless the content, mode and owner already match; True if it wrote."""
    try:
        st = path.stat()
        same = (
            path.read_text() == data
            and (st.st_mode & 0o7777) == mode
            and (uid == -1 or st.st_uid == uid)
            and (gid == -1 or st.st_gid == gid)
        )
    except FileNotFoundError:
        same = False
    if same:
        return False
    atomic_write(path, data, mode=mode, uid=uid, gid=gid)
    return True


def atomic_symlink(target: str | Path, link: Path) -> None:
    """Point link at target with symlink(tmp) + os.replace: never unlink-then-link."""
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


@contextlib.contextmanager
def locked(
    lock_path: Path,
    what: str,
    *,
    wait: float = 0,
    owner: tuple[int, int] | None = None,
    hint: str = "wait for it to finish; `aipbxctl status` shows what runs",
) -> Iterator[None]:
    """Hold an exclusive flock for a mutation; refuse if another holds it (after `wait`
    seconds). `owner` (uid, gid) is given to the lock file so that another user's process
    (a service) shares the same lock. The lock may live in a directory that user can write
    (the backup directory): it is opened without following a link, and only a regular file
    with one name is given to `owner` (through its fd), so a link or hard link planted at
    its name never hands another file over; such a lock file is refused."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(lock_path)
    deadline = time.monotonic() + wait
    try:
        st = os.fstat(fd)
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise LockedError(
                    f"another {what} is in progress (lock {lock_path} is held)", hint=hint
                ) from e
        yield
    finally:
        os.close(fd)


def _open_lock(lock_path: Path) -> int:
    """The lock file's fd: a regular file with one link, opened O_NOFOLLOW (created when
    missing); anything else there is refused with what to remove."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    hint = f"something else than aipbxctl put it there: look at it, remove it (rm {lock_path})"
    try:
        fd = os.open(lock_path, flags, 0o600)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise AipbxError(
                f"{lock_path}: a symlink or not a regular file; refused (not followed)", hint=hint
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = (
            f"a file with {st.st_nlink} names (hard links)"
            if stat.S_ISREG(st.st_mode)
            else "not a regular file"
        )
        raise AipbxError(f"{lock_path}: {what}; refused", hint=hint)
    return fd


def lock_held(lock_path: Path, proc_locks: str | None = None) -> bool:
    """Whether some process holds a flock on lock_path, read from /proc/locks without
    taking the lock (taking it, even briefly, could make a starting upgrade say busy)."""
    try:
        st = lock_path.stat()
    except FileNotFoundError:
        return False
    text = proc_locks if proc_locks is not None else Path("/proc/locks").read_text()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; blocked waiters have "->"
        if "->" not in fields and "FLOCK" in fields and dev in fields:
            return True
    return False
