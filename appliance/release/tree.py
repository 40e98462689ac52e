"""Creating a release's entries under one root, never through a link.

Every entry is created with *at() calls on directory fds opened O_NOFOLLOW | O_DIRECTORY
from the root down, one component at a time, so no write goes through a symlink, whatever
the archive put where: a member whose path crosses a link or a file is refused.

Opening those fds afresh for each member was most of an unpack's cost (the real backend:
123,000 openat for 55,500 entries, 74 % of its system-call time). So the tree keeps the
fds of one chain of directories, from the root to the last one used: a member in the same
directory costs no openat, one in a sibling or a child one per component below what it
shares with the chain, one higher up none. An archive in depth-first order (as `release
pack` and tar write them) opens each directory once, and no order costs more than a fresh
walk (one openat per component, at most MAX_DEPTH of them). The chain holds at most
MAX_DEPTH + 1 fds.

A cached fd names the right directory for as long as the unpack runs: the tree is private
(root's, in a directory only root writes), and an unpack only adds entries; it never
renames, replaces or removes one, so the directory a path reached when its fd was opened
is the one that path reaches until the end.

Modes: a file or directory is created with its final mode (0644 or 0755, release_mode)
when the process umask leaves those bits alone (022, 002, 0); otherwise it is created
private and fchmod-ed through its fd."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from appliance.errors import UsageError
from appliance.fsutil import write_all
from appliance.safefs import DIR_FLAGS

REBUILD_HINT = "the artifact is not a safe release; build it with `aipbxctl release pack`"
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_MODE = 0o755


def release_mode(mode: int) -> int:
    """Files in a release are readable by the service user; executables stay executable."""
    return 0o755 if mode & 0o111 else 0o644


def process_umask() -> int | None:
    """This process's umask, read without changing it (os.umask would, for every thread);
    None when the kernel does not say (then every mode is set through the fd)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _crossed(path: tuple[str, ...], e: OSError) -> UsageError:
    return UsageError(
        f"{'/'.join(path)}: path goes through a symlink or a file ({e.strerror})",
        hint=REBUILD_HINT,
    )


class Tree:
    """Creates entries under `root_fd` (an fd of a private, empty directory; the tree does
    not own it). The fds of the chain of directories last used are kept (see the module
    doc); close() closes them."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._names: list[str] = []  # the chain: root_fd / names[0] / names[1] / …
        self._fds: list[int] = [root_fd]  # _fds[i]: the directory of names[:i]
        mask = process_umask()
        # Creation modes come out exact when the umask strips none of 0755's bits.
        self.exact = mask is not None and mask & DIR_MODE == 0

    def close(self) -> None:
        self._truncate(0)

    # --- directories -----------------------------------------------------------------------

    def _truncate(self, n: int) -> None:
        while len(self._names) > n:
            self._names.pop()
            os.close(self._fds.pop())

    def _shared(self, parts: tuple[str, ...]) -> int:
        """How many leading components parts shares with the chain."""
        n = 0
        for have, want in zip(self._names, parts, strict=False):
            if have != want:
                break
            n += 1
        return n

    def _open_in(self, dir_fd: int, parts: tuple[str, ...], i: int, *, create: bool) -> int:
        """A new fd of directory parts[:i+1], in dir_fd (the fd of parts[:i]); created 0755
        when missing and `create`; FileNotFoundError when missing otherwise."""
        comp = parts[i]
        try:
            return os.open(comp, DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, a file
                raise _crossed(parts, e) from None
            raise
        os.mkdir(comp, DIR_MODE, dir_fd=dir_fd)
        fd = os.open(comp, DIR_FLAGS, dir_fd=dir_fd)
        if not self.exact:
            try:
                os.fchmod(fd, DIR_MODE)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def dir_fd(self, parts: tuple[str, ...], *, create: bool) -> int:
        """The fd of directory `parts` (created when missing and `create`), borrowed from
        the chain: valid until the next call that moves the chain."""
        n = self._shared(parts)
        self._truncate(n)
        for i in range(n, len(parts)):
            fd = self._open_in(self._fds[-1], parts, i, create=create)
            self._names.append(parts[i])
            self._fds.append(fd)
        return self._fds[-1]

    def _lookup(self, parts: tuple[str, ...]) -> tuple[int, bool]:
        """(fd, owned) of existing directory `parts`, leaving the chain where it is: the
        chain's own fd when parts is on it, else a new fd (the caller closes it)."""
        n = self._shared(parts)
        if n == len(parts):
            return self._fds[n], False
        fd = self._fds[n]
        owned = False
        try:
            for i in range(n, len(parts)):
                nfd = self._open_in(fd, parts, i, create=False)
                if owned:
                    os.close(fd)
                fd, owned = nfd, True
        except BaseException:
            if owned:
                os.close(fd)
            raise
        return fd, True

    def parent(self, parts: tuple[str, ...]) -> int:
        """The fd of parts' parent directory (created if missing), borrowed from the chain."""
        return self.dir_fd(parts[:-1], create=True)

    def mkdir(self, parts: tuple[str, ...]) -> None:
        """Directory `parts` (0755), with any parent missing; one already there is kept."""
        pfd = self.parent(parts)
        try:
            os.mkdir(parts[-1], DIR_MODE, dir_fd=pfd)
        except FileExistsError:
            self.dir_fd(parts, create=False)  # refused unless it is a directory
            return
        if not self.exact:
            self.dir_fd(parts, create=False)
            os.fchmod(self._fds[-1], DIR_MODE)

    # --- files and links -------------------------------------------------------------------

    def write(self, parts: tuple[str, ...], data: Iterable[bytes], mode: int, mtime: float) -> int:
        """Create a new file (never overwriting anything) from data; returns bytes written."""
        perm = release_mode(mode)
        try:
            fd = os.open(
                parts[-1], FILE_FLAGS, perm if self.exact else 0o600, dir_fd=self.parent(parts)
            )
        except FileExistsError:
            raise UsageError(f"{'/'.join(parts)}: duplicate member", hint=REBUILD_HINT) from None
        written = 0
        try:
            for chunk in data:
                written += write_all(fd, chunk)
            if not self.exact:
                os.fchmod(fd, perm)
            os.utime(fd, (mtime, mtime) if 0 <= mtime < 2**33 else None)
        finally:
            os.close(fd)
        return written

    def symlink(self, parts: tuple[str, ...], target: str) -> None:
        try:
            os.symlink(target, parts[-1], dir_fd=self.parent(parts))
        except FileExistsError:
            raise UsageError(f"{'/'.join(parts)}: duplicate member", hint=REBUILD_HINT) from None

    def hardlink(self, parts: tuple[str, ...], target: tuple[str, ...]) -> None:
        """A hard link `parts` to `target`, which must be a regular file made earlier."""
        name = "/".join(parts)
        dst_fd = self.parent(parts)
        try:
            tfd, owned = self._lookup(target[:-1])
        except FileNotFoundError:
            tfd, owned = -1, False
        try:
            try:
                st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False) if tfd >= 0 else None
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise UsageError(
                    f"{name}: hardlink target {'/'.join(target)} is not an earlier file",
                    hint=REBUILD_HINT,
                )
            try:
                os.link(
                    target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=dst_fd, follow_symlinks=False
                )
            except FileExistsError:
                raise UsageError(f"{name}: duplicate member", hint=REBUILD_HINT) from None
        finally:
            if owned:
                os.close(tfd)
