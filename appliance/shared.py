"""A release's shared directories (docs/DECISIONS.md, "What a shared directory is").

A shared dir holds data the app writes. It lives outside every release, at
/var/lib/aipbx/shared/<name>/<dir>, is linked into each release at <release>/<dir>, survives
upgrades and rollbacks, and everything in it belongs to the backend's user (_aipbx).

Files a release ships inside a shared dir are that release's. `link` (at install) moves
them to <release>/.aipbx-shipped/<dir> and puts the link in their place; `ship` (each time
the release goes on a color) puts them into the shared dir: a file the app has not changed
since a release shipped it is replaced, one the app changed is kept (with a warning). What
was shipped (path -> sha256, release) is recorded in
/var/lib/aipbx/shared/<name>/.aipbx-shipped.json, in a directory only root may write.

The shared dir is the app's, so root never follows a link in it: every entry is reached
from a directory fd opened with O_NOFOLLOW, starting from /var/lib/aipbx (root's). A new
file is written under a temporary name, given to _aipbx through its fd, then renamed over
the old entry (a symlink planted there is replaced, never written through). A shared dir
that is a symlink, or whose path goes through one, is refused."""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import json
import logging
import os
import pwd
import secrets
import stat
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

from appliance.errors import AipbxError, UsageError
from appliance.fsutil import atomic_symlink, atomic_write, write_all
from appliance.paths import Paths
from appliance.release.manifest import Kind, Manifest
from appliance.safefs import open_dir_at, sha256_fd

log = logging.getLogger("aipbx.shared")

SERVICE_USER = "_aipbx"
# In a release: what it ships into its shared dirs, moved aside by `link`.
STORE = ".aipbx-shipped"
# In /var/lib/aipbx/shared/<name>/ (root's): what was shipped.
RECORD_NAME = ".aipbx-shipped.json"
RECORD_FORMAT = 1

CHUNK = 1 << 20
MAX_DEPTH = 256
REFUSED_HINT = (
    "root never follows a link in the app's data: make it a plain directory "
    "(move the data into it), then run again"
)


# --- what to do with one shipped file (pure) ---------------------------------------------


class Do(StrEnum):
    SHIP = "shipped"  # not there: put there
    REPLACE = "replaced"  # an earlier release's copy, unchanged since: replaced
    SAME = "same"  # already these bytes
    KEEP = "kept"  # changed by the app since shipped, or there before any record: kept
    BLOCKED = "blocked"  # not a regular file there (a directory, a symlink): left alone


@dataclass(frozen=True)
class Found:
    """What is at a shipped file's path in the shared dir."""

    kind: Literal["absent", "file", "other"]
    sha256: str = ""


ABSENT = Found("absent")
OTHER = Found("other")


def decide(new: str, recorded: str | None, found: Found) -> Do:
    """The release ships bytes `new` at a path where a release last shipped `recorded`
    (None: no record) and `found` is there now."""
    if found.kind == "absent":
        return Do.SHIP
    if found.kind == "other":
        return Do.BLOCKED
    if found.sha256 == new:
        return Do.SAME
    if recorded is not None and found.sha256 == recorded:
        return Do.REPLACE
    return Do.KEEP


@dataclass(frozen=True)
class Entry:
    sha256: str
    release: str


def recorded_after(old: Entry | None, do: Do, new: str, release: str) -> Entry | None:
    """The record of a path once `do` was done: the release's bytes when they are there,
    else what was recorded (so a file the app changed stays "changed")."""
    if do in (Do.SHIP, Do.REPLACE, Do.SAME):
        return Entry(new, release)
    return old


def warning(path: str, do: Do, old: Entry | None, release: str) -> str | None:
    if do is Do.KEEP:
        if old is None:
            why = "it was there before any release's copy was recorded"
        else:
            why = f"the app changed it since {old.release} shipped it"
        return (
            f"{path}: {why}; the app's file is kept, not {release}'s "
            "(delete it to get the release's at the next start)"
        )
    if do is Do.BLOCKED:
        return f"{path}: not a regular file (a directory or a symlink); {release}'s not shipped"
    return None


Record = dict[str, dict[str, Entry]]  # shared dir -> path inside it -> what was shipped


def parse_record(text: str) -> Record:
    """The record file's content; ValueError when it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a format {RECORD_FORMAT} record")
    out: Record = {}
    for d, files in dict(data.get("dirs", {})).items():
        out[str(d)] = {
            str(p): Entry(str(e["sha256"]), str(e["release"])) for p, e in dict(files).items()
        }
    return out


def render_record(record: Mapping[str, Mapping[str, Entry]]) -> str:
    dirs = {
        d: {p: {"sha256": e.sha256, "release": e.release} for p, e in sorted(files.items())}
        for d, files in sorted(record.items())
    }
    return json.dumps({"format": RECORD_FORMAT, "dirs": dirs}, indent=1) + "\n"


def shipped_mode(mode: int) -> int:
    """A shipped file is the app's: 0640, or 0750 when executable (the unit's UMask=0027)."""
    return 0o750 if mode & 0o111 else 0o640


# --- the report --------------------------------------------------------------------------


@dataclass
class Report:
    counts: Counter[Do] = field(default_factory=Counter)
    given: int = 0  # root-owned entries given to the app
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("%s", text, extra={"fields": {"action": "ship"}})

    def summary(self) -> str:
        parts = [f"{self.counts[d]} {d}" for d in Do if self.counts[d]]
        if self.given:
            parts.append(f"{self.given} root-owned entries given to {SERVICE_USER}")
        if self.warnings:
            parts.append(f"{len(self.warnings)} warning(s)")
        return ", ".join(parts) or "nothing shipped"


# --- link (at install; again before a start: idempotent) ---------------------------------


def link(paths: Paths, release: Path, m: Manifest) -> None:
    """Replace each shared dir of the release by a link to /var/lib/aipbx/shared/<name>/<dir>,
    moving what the release ships there to <release>/.aipbx-shipped/<dir>. The release tree
    is root's (unpacked by root from a verified artifact)."""
    if m.kind is Kind.FRONTEND:
        return  # an SPA build's assets belong to the release; nothing writes into it
    for rel in m.shared_dirs:
        target = paths.shared / m.name / rel
        inside = release / rel
        if inside.is_symlink():
            if os.readlink(inside) == str(target):
                continue
            raise UsageError(
                f"{release.name}: {rel} is a symlink in the release; a shared dir must be a "
                "directory or absent",
                hint="pack the directory itself (or nothing) at that path",
            )
        if inside.exists():
            store = release / STORE / rel
            if not inside.is_dir():
                raise UsageError(
                    f"{release.name}: {rel} is a file; a shared dir must be a directory",
                    hint="fix the release's shared_dirs (`release pack --shared-dir`)",
                )
            if os.path.lexists(store):
                raise UsageError(
                    f"{release.name}: holds both {rel} and {STORE}/{rel}",
                    hint=f"{STORE} is the appliance's: pack the built app dir, not a release",
                )
            store.parent.mkdir(parents=True, exist_ok=True)
            os.rename(inside, store)
        inside.parent.mkdir(parents=True, exist_ok=True)
        atomic_symlink(target, inside)


# --- ship (each time a release goes on a color) ------------------------------------------


def service_owner() -> tuple[int, int]:
    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError:
        raise AipbxError(
            f"there is no user {SERVICE_USER}", hint="reinstall aipbx-appliance: it creates it"
        ) from None


def ship(
    paths: Paths,
    release: Path,
    m: Manifest,
    *,
    owner: tuple[int, int] | None = None,
    files: bool = True,
) -> Report:
    """Make the release's shared dirs ready for it to start: each exists, is the app's (and
    so is everything in it), and holds the files the release ships (see the module doc).
    files=False only makes them the app's (a repair: nothing shipped, nothing recorded)."""
    report = Report()
    if m.kind is Kind.FRONTEND or not m.shared_dirs:
        return report
    if files:
        link(paths, release, m)
    uid, gid = owner if owner is not None else service_owner()
    top = paths.shared / m.name
    try:
        with _root_dirs(paths, m.name, gid) as top_fd:
            record = _load_record(top_fd, top / RECORD_NAME, report)
            for d in m.shared_dirs:
                leaf, given = _open_shared_dir(top_fd, d, uid, gid, top)
                try:
                    report.given += given + _give_to_app(leaf, uid, gid, f"{top}/{d}", report)
                    if not files:
                        continue
                    shipper = _Shipper(leaf, uid, gid, d, release.name, report)
                    try:
                        record[d] = shipper.ship(release / STORE / d, record.get(d, {}))
                    finally:
                        shipper.close()
                finally:
                    os.close(leaf)
            if files:
                atomic_write(top / RECORD_NAME, render_record(record), mode=0o600, uid=0, gid=0)
    except OSError as e:
        raise AipbxError(
            f"cannot prepare the shared dirs of {release.name} in {top}: {e}",
            hint="`aipbxctl doctor` checks disk space",
        ) from e
    return report


def repair_in_use(paths: Paths, *, owner: tuple[int, int] | None = None) -> list[str]:
    """What `setup` and the package's install run: the shared dirs of the releases the
    colors run are made the app's again (an install that the old appliance seeded as root
    is fixed without a deploy). Nothing is shipped. A problem is logged, not raised: the
    next deploy refuses it with its error."""
    from appliance import releases, state

    out = []
    for dirname in sorted(set(state.load(paths.state).colors.values())):
        try:
            rel = releases.get(paths, dirname)
            report = ship(paths, rel.path, rel.manifest, owner=owner, files=False)
        except AipbxError as e:
            log.warning("the shared dirs of %s: %s", dirname, e.message)
            continue
        if report.given:
            out.append(
                f"gave {report.given} root-owned entries in the shared dirs of {dirname} "
                f"to {SERVICE_USER}"
            )
    return out


def _refused(where: Path | str, e: OSError) -> AipbxError:
    return AipbxError(
        f"{where}: a symlink or not a directory ({e.strerror}): refused", hint=REFUSED_HINT
    )


def _dir(parent_fd: int, name: str, where: Path | str, owner: tuple[int, int]) -> int:
    """A fd of directory `name` in parent_fd, created (0750, owner) when missing; a symlink
    or anything but a directory there is refused."""
    try:
        return open_dir_at(name, parent_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refused(where, e) from None
        raise
    with contextlib.suppress(FileExistsError):  # made meanwhile: opened (and checked) below
        os.mkdir(name, 0o750, dir_fd=parent_fd)
    try:
        fd = open_dir_at(name, parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refused(where, e) from None
        raise
    st = os.fstat(fd)
    if st.st_uid == 0 and (st.st_uid, st.st_gid) != owner:
        os.fchown(fd, *owner)
    return fd


@contextlib.contextmanager
def _root_dirs(paths: Paths, name: str, gid: int) -> Iterator[int]:
    """The fd of /var/lib/aipbx/shared/<name>, made root's (0750 root:_aipbx) like shared/
    itself: the app may pass through them, not change them."""
    paths.var.mkdir(parents=True, exist_ok=True)
    var_fd = os.open(paths.var, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = [var_fd]
    try:
        for comp, where in (("shared", paths.shared), (name, paths.shared / name)):
            fd = _dir(fds[-1], comp, where, (0, gid))
            fds.append(fd)
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (0, gid):
                os.fchown(fd, 0, gid)
            if stat.S_IMODE(st.st_mode) != 0o750:
                os.fchmod(fd, 0o750)
        yield fds[-1]
    finally:
        for fd in fds:
            os.close(fd)


def _open_shared_dir(top_fd: int, d: str, uid: int, gid: int, top: Path) -> tuple[int, int]:
    """The fd of shared dir `d` (a relative path) under top_fd: directories between are
    created root's, the shared dir itself the app's; and 1 if it was not the app's yet."""
    parts = d.split("/")
    fd = os.dup(top_fd)
    try:
        for i, comp in enumerate(parts):
            last = i == len(parts) - 1
            where = top.joinpath(*parts[: i + 1])
            nfd = _dir(fd, comp, where, (uid, gid) if last else (0, gid))
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        given = (st.st_uid, st.st_gid) != (uid, gid)
        if given:
            os.fchown(fd, uid, gid)
    except BaseException:
        os.close(fd)
        raise
    return fd, int(given)


def _give_to_app(
    dir_fd: int, uid: int, gid: int, where: str, report: Report, depth: int = 0
) -> int:
    """Give every root-owned entry under dir_fd to the app (what the appliance seeded as root
    before it shipped as the app's user), never following a link: directories are opened
    O_NOFOLLOW, other entries changed with lchown semantics. A root-owned file with more
    than one link is left (it may be another root file linked in). Returns how many."""
    given = 0
    if depth > MAX_DEPTH:
        report.warn(f"{where}: deeper than {MAX_DEPTH} levels; ownership below not checked")
        return 0
    with os.scandir(dir_fd) as it:
        names = [e.name for e in it]
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = open_dir_at(name, dir_fd)
            except OSError:
                continue  # replaced meanwhile: not ours to follow
            try:
                if os.fstat(sub).st_uid == 0:
                    os.fchown(sub, uid, gid)
                    given += 1
                given += _give_to_app(sub, uid, gid, f"{where}/{name}", report, depth + 1)
            finally:
                os.close(sub)
        elif st.st_uid == 0:
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                report.warn(f"{where}/{name}: root's, with {st.st_nlink} links; left as it is")
                continue
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            given += 1
    return given


def _load_record(top_fd: int, where: Path, report: Report) -> Record:
    try:
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top_fd)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        raw = f.read(64 << 20)
    try:
        return parse_record(raw.decode())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        report.warn(f"{where}: unreadable ({e}); every shipped file counts as unrecorded")
        return {}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Blocked(Exception):
    """A directory on the way is a symlink or not a directory."""


class _Shipper:
    """Puts one release's shipped files into one shared dir (its fd), as the app's."""

    def __init__(self, leaf: int, uid: int, gid: int, d: str, release: str, report: Report):
        self.leaf, self.uid, self.gid = leaf, uid, gid
        self.d, self.release, self.report = d, release, report
        self.dirs: dict[tuple[str, ...], int] = {}
        self.blocked: set[str] = set()  # directories on the way that are not: warned once

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()

    def ship(self, store: Path, recorded: Mapping[str, Entry]) -> dict[str, Entry]:
        out = dict(recorded)  # paths only an earlier release shipped keep their record
        if not store.is_dir():
            return out  # ships nothing (or installed before releases kept what they ship)
        for top, dirnames, filenames in _walk(store):
            rel_top = top.relative_to(store)
            for name in dirnames:
                parts = (*rel_top.parts, name)
                try:
                    self._dir_fd(parts)
                except _Blocked as e:
                    self._warn_blocked(str(e))
            for name in filenames:
                src = top / name
                rel = "/".join((*rel_top.parts, name))
                st = src.lstat()
                if not stat.S_ISREG(st.st_mode):
                    self.report.warn(
                        f"{self.d}/{rel}: a symlink in {self.release}; only files are shipped"
                    )
                    continue
                entry = self._one(src, st, rel, out.get(rel))
                if entry is None:
                    out.pop(rel, None)
                else:
                    out[rel] = entry
        return out

    def _one(self, src: Path, st: os.stat_result, rel: str, old: Entry | None) -> Entry | None:
        parts = tuple(rel.split("/"))
        new = _sha256(src)
        try:
            parent = self._dir_fd(parts[:-1])
        except _Blocked as e:
            self._warn_blocked(str(e))
            self.report.counts[Do.BLOCKED] += 1
            return old
        do = decide(new, old.sha256 if old else None, self._found(parent, parts[-1]))
        if do in (Do.SHIP, Do.REPLACE):
            self._write(parent, parts[-1], src, st)
        self.report.counts[do] += 1
        text = warning(f"{self.d}/{rel}", do, old, self.release)
        if text:
            self.report.warn(text)
        return recorded_after(old, do, new, self.release)

    def _warn_blocked(self, where: str) -> None:
        if where not in self.blocked:
            self.blocked.add(where)
            self.report.warn(
                f"{self.d}/{where}: a symlink or not a directory; "
                f"{self.release}'s files in it not shipped"
            )

    def _dir_fd(self, parts: tuple[str, ...]) -> int:
        """The fd of a directory inside the shared dir, created as the app's when missing;
        _Blocked when a component is a symlink or not a directory."""
        if not parts:
            return self.leaf
        if parts in self.dirs:
            return self.dirs[parts]
        parent = self._dir_fd(parts[:-1])
        try:
            fd = _dir(parent, parts[-1], "/".join(parts), (self.uid, self.gid))
        except AipbxError:
            raise _Blocked("/".join(parts)) from None
        self.dirs[parts] = fd
        return fd

    def _found(self, parent: int, name: str) -> Found:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return ABSENT
        if not stat.S_ISREG(st.st_mode):
            return OTHER
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            return ABSENT
        except OSError:
            return OTHER
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return OTHER  # replaced meanwhile
            return Found("file", sha256_fd(fd))
        finally:
            os.close(fd)

    def _write(self, parent: int, name: str, src: Path, st: os.stat_result) -> None:
        """A new file, the app's from its creation, renamed over `name` (whatever entry is
        there is replaced, not written through)."""
        tmp = f".aipbx-ship.{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=parent)
        try:
            try:
                os.fchown(fd, self.uid, self.gid)
                with src.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        write_all(fd, chunk)
                os.fchmod(fd, shipped_mode(st.st_mode))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
        os.fsync(parent)


def _walk(store: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk of the release's (root's) store, sorted, links not followed: symlinks to
    directories are listed with the files (and refused there)."""
    for top, dirnames, filenames in os.walk(store):
        topp = Path(top)
        links = [n for n in dirnames if (topp / n).is_symlink()]
        dirnames[:] = sorted(n for n in dirnames if n not in links)
        yield topp, list(dirnames), sorted([*filenames, *links])
