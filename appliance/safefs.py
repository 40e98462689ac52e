"""Opening files without following another user's links, and reading them within bounds.

Root must never follow a link that a less-privileged user controls (postgres in the
backup directory, _aipbx in the shared dirs), and must never hang or run out of memory
on what it reads (a fifo, a device, a huge file). The rules here:

- A directory is opened with O_NOFOLLOW | O_DIRECTORY, and what is inside it is reached
  from its fd (*at() calls): a link planted at a name is refused (ELOOP) or replaced, never
  written, chowned or chmodded through.
- A file is opened O_NOFOLLOW | O_NONBLOCK and fstat'ed: only a regular file is read (a
  fifo cannot block the open, a device or directory is refused before a byte is read),
  and every read is bounded.
- A path an operator names (an artifact, a backup, a config file) is resolved here, not by
  the kernel: a symlink on the way is followed only when root (or this process's user)
  owns it, since only then can no other user change where it leads; the resolved path is
  then opened component by component with O_NOFOLLOW, so a link swapped in meanwhile is
  refused.
- A tree is removed iteratively, without recursion and without following links, at any
  depth (remove_tree)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path

from appliance.errors import AipbxError, UsageError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# To walk a path: needs only search permission (a 0711 directory), usable as a dir_fd.
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CHUNK = 1 << 20
MAX_HOPS = 40  # symlinks followed in one path, as the kernel's ELOOP limit


class Unsafe(AipbxError):
    """A path is a link another user controls, or not the kind of file expected: refused,
    nothing was read or changed through it."""


class BadInput(UsageError):
    """An operator-named file that cannot be input: not a regular file, too large, a link
    another user owns (exit 2)."""


def kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def shown(path: str | Path) -> str:
    """A path as an error message shows it: on one line, whatever bytes it holds."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


# --- directories, and what is in them -------------------------------------------------------


def open_dir_at(name: str, dir_fd: int | None) -> int:
    """The fd of directory `name` in dir_fd (or a path when dir_fd is None), not following a
    link at its last component; OSError (ELOOP, ENOTDIR) otherwise."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_file_at(name: str, dir_fd: int | None, *, where: str = "") -> int:
    """A read-only fd of the regular file `name` in dir_fd, not following a link, never
    blocking on a fifo (O_NONBLOCK, cleared once it is known to be a file). Unsafe when it is
    a link or not a regular file; FileNotFoundError when absent."""
    what = where or shown(name)
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Unsafe(f"{what}: a symlink; not followed") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a socket; a directory (O_RDONLY allows)
            raise Unsafe(f"{what}: not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unsafe(f"{what}: {kind_of(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dir_at(name: str, dir_fd: int, *, mode: int, owner: tuple[int, int] | None) -> int:
    """The fd of directory `name` in dir_fd, created (mode, owner) when missing; a link or a
    non-directory there is Unsafe. The owner and mode are set through the fd of the new
    directory, never by name."""
    try:
        return open_dir_at(name, dir_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Unsafe(f"{name}: a symlink or not a directory ({e.strerror})") from None
        raise
    with contextlib.suppress(FileExistsError):  # made meanwhile: opened (and checked) below
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        fd = open_dir_at(name, dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Unsafe(f"{name}: a symlink or not a directory ({e.strerror})") from None
        raise
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- paths an operator names ----------------------------------------------------------------


def resolve(path: str | Path) -> list[str]:
    """The components of path, absolute, with every symlink on the way resolved, following
    only links owned by root (or this process's user): another user's link is Unsafe. From
    the first component that does not exist on, the rest is taken as it is (opening it
    fails, or creating it makes no link)."""
    todo = [c for c in os.path.join(os.getcwd(), os.fspath(path)).split("/") if c]
    done: list[str] = []
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp == ".":
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join([*done, comp])
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            done.append(comp)
            for rest in todo:
                if rest == "..":
                    if done:
                        done.pop()
                elif rest != ".":
                    done.append(rest)
            break
        except NotADirectoryError:
            raise FileNotFoundError(errno.ENOTDIR, "Not a directory", here) from None
        if not stat.S_ISLNK(st.st_mode):
            done.append(comp)
            continue
        if not _trusted_owner(st.st_uid):
            raise Unsafe(
                f"{shown(here)}: a symlink owned by uid {st.st_uid}, not root; not followed",
                hint="name the file it points to, if that is really the one",
            )
        hops += 1
        if hops > MAX_HOPS:
            raise OSError(errno.ELOOP, "Too many levels of symbolic links", str(path))
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        todo = [c for c in target.split("/") if c] + todo
    return done


def open_path_dir(parts: list[str]) -> int:
    """An O_PATH fd (for *at calls) of the directory at absolute components `parts`, each
    opened O_NOFOLLOW from the one before: a component that became a link since it was
    resolved is refused."""
    fd = os.open("/", PATH_FLAGS)
    try:
        for i, comp in enumerate(parts):
            try:
                nfd = os.open(comp, PATH_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                where = shown("/" + "/".join(parts[: i + 1]))
                raise Unsafe(f"{where}: became a symlink while it was opened; refused") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dirs(path: str | Path, *, mode: int, owner: tuple[int, int] | None = None) -> int:
    """The fd of directory `path` (resolved as in open_input), creating what is missing: the
    directories above it 0755 (root's when root runs this), the last one `mode` and `owner`,
    each through the fd of the one above (make_dir_at), never through a link."""
    parts = resolve(path)
    if not parts:
        return os.open("/", DIR_FLAGS)
    fd = os.open("/", DIR_FLAGS)
    try:
        for i, comp in enumerate(parts):
            last = i == len(parts) - 1
            where = "/" + "/".join(parts[: i + 1])
            try:
                nfd = make_dir_at(
                    comp, fd, mode=mode if last else 0o755, owner=owner if last else None
                )
            except Unsafe as e:
                raise Unsafe(f"{where}: {e.message.split(': ', 1)[-1]}") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_input(path: str | Path) -> int:
    """A read-only fd of the regular file an operator named (see the module doc): through
    no link another user owns, never blocking. BadInput (exit 2) when it is not a regular
    file or goes through another user's link; FileNotFoundError when it does not exist."""
    try:
        parts = resolve(path)
        if not parts:
            raise Unsafe("/: a directory, not a regular file")
        dfd = open_path_dir(parts[:-1])
        try:
            return open_file_at(parts[-1], dfd, where=shown(path))
        finally:
            os.close(dfd)
    except Unsafe as e:
        raise BadInput(e.message, hint=e.hint) from None
    except NotADirectoryError:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path)) from None


def open_input_dir(path: str | Path) -> int:
    """An O_PATH fd of a directory an operator (or the configuration) names, resolved as in
    open_input; Unsafe when it is a link another user owns or not a directory."""
    parts = resolve(path)
    try:
        return open_path_dir(parts)
    except NotADirectoryError:
        raise Unsafe(f"{path}: not a directory") from None


# --- bounded reads -------------------------------------------------------------------------


class TooLarge(BadInput):
    """More bytes than the reader allows."""


def read_fd(fd: int, limit: int, *, where: str) -> bytes:
    """At most `limit` bytes of fd; TooLarge (a BadInput) when there are more."""
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = os.read(fd, min(CHUNK, limit + 1 - got))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        got += len(chunk)
    raise TooLarge(f"{where}: larger than {limit} bytes; refused")


def read_input(path: str | Path, limit: int) -> bytes:
    """The bytes of an operator-named regular file of at most `limit` bytes (open_input)."""
    fd = open_input(path)
    try:
        return read_fd(fd, limit, where=shown(path))
    finally:
        os.close(fd)


def read_input_text(path: str | Path, limit: int) -> str:
    """read_input as UTF-8 text; BadInput (naming the byte) when it is not."""
    raw = read_input(path, limit)
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise BadInput(f"{shown(path)}: not UTF-8 text (byte {e.start})") from None


def read_at(name: str, dir_fd: int, limit: int, *, where: str) -> bytes:
    """The bytes of regular file `name` in dir_fd (a directory another user may write),
    never through a link, at most `limit`. Unsafe / TooLarge / FileNotFoundError."""
    fd = open_file_at(name, dir_fd, where=where)
    try:
        return read_fd(fd, limit, where=where)
    finally:
        os.close(fd)


def sha256_fd(fd: int) -> str:
    """sha256 of what fd reads from its current offset to the end."""
    h = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
        h.update(chunk)
    return h.hexdigest()


# --- removing a tree -----------------------------------------------------------------------


def remove_tree(path: Path, *, ignore_errors: bool = False) -> None:
    """Remove directory `path` and everything in it, at any depth, without recursion and
    without following a link: each directory found below the top is first renamed up into
    the top (so none is ever deeper than one level), then emptied and removed. A link at
    `path` itself is removed, not followed."""
    try:
        _remove_tree(path)
    except OSError:
        if not ignore_errors:
            raise


def _remove_tree(path: Path) -> None:
    try:
        top = open_dir_at(str(path), None)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(path)  # a link or a file: itself, not what it points to
        return
    n = 0
    try:
        while True:
            with os.scandir(top) as it:
                names = [e.name for e in it]
            if not names:
                break
            for name in names:
                try:
                    st = os.stat(name, dir_fd=top, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=top)
                    continue
                sub = open_dir_at(name, top)
                try:
                    with os.scandir(sub) as it:
                        inner = [e.name for e in it]
                    for child in inner:
                        cst = os.stat(child, dir_fd=sub, follow_symlinks=False)
                        if not stat.S_ISDIR(cst.st_mode):
                            os.unlink(child, dir_fd=sub)
                            continue
                        while True:  # up into the top, under a name not taken
                            n += 1
                            try:
                                os.rename(child, f".rm{n}", src_dir_fd=sub, dst_dir_fd=top)
                                break
                            except OSError as e:
                                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                                    raise
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path)
