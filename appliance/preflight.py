"""What an upgrade checks before it changes anything: room on the disks it writes to, and
whether the artifact is older than the live release (a downgrade: its migrations may not
go back). The needs are worked out by pure functions; the checks read the file systems.

Room: unpacking needs about the tar's size (gzip's trailer gives it, modulo 4 GiB) plus
the file system's rounding of each file, on /opt/aipbx; state.json, the shared files a
release ships and the journal need a little on /var/lib/aipbx. When both are one file
system the needs add up."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance import safefs, versions
from appliance.errors import AipbxError
from appliance.paths import Paths
from appliance.release.manifest import Manifest

log = logging.getLogger("aipbx.upgrade")

MIB = 1 << 20
STATE_ROOM = 32 * MIB  # /var/lib/aipbx: state.json, shipped shared files, records
UNPACK_SLACK = 64 * MIB  # /opt/aipbx beyond the estimate
MIN_INODES = 1024


class NoSpace(AipbxError):
    """Not enough room to start: nothing was changed."""


@dataclass(frozen=True)
class Room:
    path: Path  # where it was measured
    dev: int
    free: int  # bytes an unprivileged writer may still use (f_bavail)
    inodes: int  # -1 when the file system does not count them


@dataclass(frozen=True)
class Need:
    path: Path
    bytes: int
    inodes: int
    what: str


def unpacked_estimate(compressed: int, isize: int | None) -> int:
    """Pure: bytes an artifact unpacks to, from its size and gzip's ISIZE (the tar's size
    mod 2**32). A tar is never smaller than its gzip by much, so an ISIZE below the
    compressed size has wrapped (or is unknown): then the size, doubled, at least."""
    if isize is None:
        return compressed * 2
    tar = isize
    while tar < compressed * 0.9:  # wrapped past 4 GiB, once or more
        tar += 1 << 32
    return tar + tar // 8  # each file rounded up to a block


def needs(paths: Paths, unpack_bytes: int) -> list[Need]:
    """Pure: what an upgrade needs; unpack_bytes 0 when nothing is unpacked (the release
    is installed, or a rollback)."""
    out = [Need(paths.var, STATE_ROOM, 64, "state and shared files")]
    if unpack_bytes:
        files = max(MIN_INODES, unpack_bytes // (64 * 1024))
        out.append(Need(paths.releases, unpack_bytes + UNPACK_SLACK, files, "the new release"))
    return out


def shortfalls(needs_: list[Need], rooms: dict[Path, Room]) -> list[str]:
    """Pure: one line per file system that lacks room for what is asked of it (needs on
    the same file system add up)."""
    by_dev: dict[int, list[Need]] = {}
    for n in needs_:
        by_dev.setdefault(rooms[n.path].dev, []).append(n)
    out = []
    for group in by_dev.values():
        room = rooms[group[0].path]
        want = sum(n.bytes for n in group)
        files = sum(n.inodes for n in group)
        what = " and ".join(n.what for n in group)
        if room.free < want:
            out.append(
                f"{room.path} has {room.free // MIB} MiB free, {what} need about "
                f"{-(-want // MIB)} MiB"
            )
        elif 0 <= room.inodes < files:
            out.append(f"{room.path} has {room.inodes} free inodes, {what} need about {files}")
    return out


def measure(path: Path) -> Room:
    """The room on the file system `path` is (or will be) on: its nearest existing
    ancestor's."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    inodes = st.f_favail if st.f_files else -1
    return Room(p, os.stat(p).st_dev, st.f_bavail * st.f_frsize, inodes)


def gzip_isize(artifact: Path) -> int | None:
    """gzip's ISIZE: the last 4 bytes, little-endian (None when it cannot be read)."""
    try:
        fd = safefs.open_input(artifact)
    except (OSError, AipbxError):
        return None
    try:
        size = os.fstat(fd).st_size
        if size < 18:
            return None
        return int.from_bytes(os.pread(fd, 4, size - 4), "little")
    except OSError:
        return None
    finally:
        os.close(fd)


def check_space(paths: Paths, *, unpack_bytes: int = 0, verb: str = "upgrade") -> None:
    """NoSpace (exit 1, nothing changed) when a file system the rollout writes to lacks
    room."""
    want = needs(paths, unpack_bytes)
    rooms = {n.path: measure(n.path) for n in want}
    short = shortfalls(want, rooms)
    if short:
        raise NoSpace(
            f"not enough disk space to {verb}: {'; '.join(short)}; nothing was changed",
            hint="free space there (`df -h`; `aipbxctl releases` lists the installed "
            "releases, failed ones are removed first; old journals: `journalctl "
            "--vacuum-size=…`), then run it again",
        )


def unpack_need(paths: Paths, artifact: Path, m: Manifest) -> int:
    """Bytes unpacking `artifact` will write (0 when its release is installed already)."""
    if (paths.releases / m.release_dirname).is_dir():
        return 0
    try:
        compressed = artifact.stat().st_size
    except OSError:
        return 0
    return unpacked_estimate(compressed, gzip_isize(artifact))


# --- downgrades ----------------------------------------------------------------------------


def downgrade(new: Manifest, live: Manifest | None) -> str | None:
    """Pure: the warning when `new` is an older version of the live app, else None."""
    if live is None or live.name != new.name or live.kind != new.kind:
        return None
    if not versions.is_downgrade(new.version, live.version):
        return None
    return (
        f"{new.release_dirname} is older than the live {live.release_dirname}: a downgrade. "
        "Its code may not read what the newer release's migrations wrote, and the "
        "migrations are not undone"
    )


def confirm_downgrade(warning: str, confirm: Callable[[str], None]) -> None:
    log.warning("%s", warning, extra={"fields": {"action": "downgrade"}})
    confirm(f"{warning}; deploy it anyway")
