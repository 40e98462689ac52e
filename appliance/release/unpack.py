"""Check and unpack a release artifact into an immutable release directory.

`unpack` streams the tar.gz member by member into `releases/.unpack-<random>` — nothing whole in
memory, nothing written through a symlink (appliance.release.tree) — then renames it to
`releases/<name>-<version>`. Anything unsafe is refused with a UsageError and leaves nothing
under releases/. Every read is bounded (appliance.release.archive: header sizes, gzip's CRC;
here: members, bytes, path depth and length), and the sha256 of the bytes unpacked is
compared with the one verified, so a file changed after its check is refused. The release
records the sha256 of the artifact it came from (RECORD_NAME), so that another artifact
with the same name and version is told apart (appliance.releases.install).

Before the rename the release's file system is written out with syncfs(2): a power cut
leaves the old name or the whole release, never a half one. Not sync(2), which writes out
every file system on the host (PostgreSQL's among them) and waits for all of them; not an
fsync per file and directory, which took 3 times the wall time and twice the CPU of the
whole unpack on the real backend (55,500 entries) for the same guarantee."""

from __future__ import annotations

import ctypes
import json
import os
import stat
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.errors import AipbxError, UsageError
from appliance.fsutil import fsync_dir
from appliance.release import archive
from appliance.release.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    link_stays_inside,
    parse_manifest,
)
from appliance.release.tree import Tree
from appliance.safefs import DIR_FLAGS, remove_tree

REBUILD_HINT = archive.REBUILD_HINT
MAX_DEPTH = 64  # path components of a member (the real backend's deepest: 11)
MAX_NAME = 4095  # bytes of a member's path (PATH_MAX less the NUL)
# In a release: the sha256 of the artifact it was unpacked from (root's, 0644).
RECORD_NAME = ".aipbx-artifact.json"


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name; () for the top itself ('.', './')."""
    if not name or "\0" in name:
        raise UsageError(f"member {name!r}: empty or NUL in its name", hint=REBUILD_HINT)
    if name.startswith("/"):
        raise UsageError(f"{name}: absolute path refused", hint=REBUILD_HINT)
    if len(name.encode(errors="surrogateescape")) > MAX_NAME:
        raise UsageError(
            f"{name[:60]}…: a member path longer than {MAX_NAME} bytes refused", hint=REBUILD_HINT
        )
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UsageError(f"{name}: '..' in a member path refused", hint=REBUILD_HINT)
    if len(parts) > MAX_DEPTH:
        raise UsageError(
            f"{'/'.join(parts[:3])}/…: a member {len(parts)} directories deep refused "
            f"(at most {MAX_DEPTH})",
            hint=REBUILD_HINT,
        )
    if parts and parts[0] == RECORD_NAME:
        raise UsageError(f"{name}: a name of the appliance's refused", hint=REBUILD_HINT)
    return parts


def refusal(member: tarfile.TarInfo) -> str | None:
    """Why a member of this type is refused, or None if its type is allowed."""
    if member.ischr() or member.isblk():
        return "device node refused"
    if member.isfifo():
        return "fifo refused"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return f"member type {member.type!r} refused"
    if member.size < 0:  # tarfile reads a negative base-256 size as it is
        return f"a negative size ({member.size})"
    return None


def check_member(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The path of a member that may be unpacked; a UsageError for anything unsafe."""
    parts = member_parts(member.name)
    name = "/".join(parts) or "."
    why = refusal(member)
    if why is None and not parts and not member.isdir():
        why = "not a directory at the release top"
    if why is None and member.issym() and not link_stays_inside(name, member.linkname):
        why = f"symlink to {member.linkname!r} leaves the release"
    if why is None and member.islnk():
        try:
            if not member_parts(member.linkname):
                why = "hardlink to the release top"
        except UsageError:
            why = f"hardlink to {member.linkname!r} leaves the release"
    if why is not None:
        raise UsageError(f"{name}: {why} refused", hint=REBUILD_HINT)
    return parts


class _Limits:
    """Counts members and bytes against the limits as they stream by."""

    def __init__(self, artifact: Path, max_bytes: int, max_files: int) -> None:
        self.artifact, self.max_bytes, self.max_files = artifact.name, max_bytes, max_files
        self.bytes = self.files = 0

    def member(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise UsageError(
                f"{self.artifact}: more than {self.max_files} members refused", hint=REBUILD_HINT
            )

    def add(self, size: int, name: str) -> None:
        self.bytes += size
        if self.bytes > self.max_bytes:
            raise UsageError(
                f"{self.artifact}: unpacks to more than {self.max_bytes} bytes (at {name})",
                hint="a size bomb, or a release larger than the configured limit",
            )


def _extract(
    art: archive.Artifact, tree: Tree, root: Path, limits: _Limits, releases_dir: Path
) -> Manifest:
    manifest: Manifest | None = None
    links: list[str] = []
    guard = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4: a second opinion
    tar = art.tar
    while (member := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # kept otherwise: memory for nothing
        limits.member()
        parts = check_member(member)
        name = "/".join(parts)
        if guard is not None:
            try:
                guard(member, str(root))
            except tarfile.TarError as e:
                raise UsageError(f"{name or '.'}: {e}", hint=REBUILD_HINT) from None
        if not parts:
            continue  # the top itself
        if member.isdir():
            tree.mkdir(parts)
        elif member.issym():
            tree.symlink(parts, member.linkname)
            links.append(name)
        elif member.islnk():
            tree.hardlink(parts, member_parts(member.linkname))
        else:
            limits.add(member.size, name)  # declared size: refused before a byte is written
            if name == MANIFEST_NAME and member.size > MAX_MANIFEST_BYTES:
                raise UsageError(f"{name}: larger than {MAX_MANIFEST_BYTES} bytes refused")
            written = tree.write(parts, art.data(member), member.mode, member.mtime)
            limits.add(written - member.size, name)
            if name == MANIFEST_NAME:  # first in a packed artifact: refuse a bad one early
                manifest = _read_manifest(tree.root_fd, f"{limits.artifact}: {MANIFEST_NAME}")
                _refuse_installed(releases_dir, manifest)
    if manifest is None:
        raise UsageError(f"{limits.artifact}: no {MANIFEST_NAME} at its top", hint=REBUILD_HINT)
    _check_links_resolve(root, links)
    return manifest


def _read_manifest(root_fd: int, source: str) -> Manifest:
    fd = os.open(MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        return parse_manifest(raw.decode(), source)
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not UTF-8 text", hint=REBUILD_HINT) from None


def _refuse_installed(releases_dir: Path, manifest: Manifest) -> None:
    if os.path.lexists(releases_dir / manifest.release_dirname):
        raise UsageError(
            f"{manifest.release_dirname}: already installed in {releases_dir}",
            hint="a release is immutable: build the new one with a new version",
        )


def _check_links_resolve(root: Path, links: list[str]) -> None:
    """Each link checked alone stays inside; a chain (`a -> .`, `b -> a/..`) may not."""
    top = os.path.realpath(root)
    for name in links:
        try:
            real = os.path.realpath(root / name)
        except (RecursionError, OSError):  # a chain of links longer than Python can follow
            raise UsageError(f"{name}: a symlink chain too long", hint=REBUILD_HINT) from None
        if real != top and not real.startswith(f"{top}/"):
            raise UsageError(f"{name}: symlink resolves outside the release", hint=REBUILD_HINT)


def unpack(
    artifact: Path,
    releases_dir: Path,
    *,
    max_bytes: int,
    max_files: int = 500_000,
    sha256: str | None = None,
) -> Path:
    """Unpack artifact to releases_dir/<name>-<version>; returns that directory. With
    `sha256` (the verified one), bytes that are not those are refused."""
    releases_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=releases_dir, prefix=".unpack-"))
    try:
        os.chmod(tmp, 0o755)
        root_fd = os.open(tmp, DIR_FLAGS)
        try:
            tree = Tree(root_fd)
            try:
                with archive.open_artifact(artifact) as art:
                    limits = _Limits(artifact, max_bytes, max_files)
                    manifest = _extract(art, tree, tmp, limits, releases_dir)
                    digest = art.finish()
            finally:
                tree.close()
            if sha256 is not None and digest != sha256:
                raise UsageError(
                    f"{artifact.name} changed while it was installed: sha256 {digest[:16]}…, "
                    f"verified as {sha256[:16]}…",
                    hint="copy the artifact again (nothing else may write it), then upgrade",
                )
            _record(tmp, artifact, digest)
            _refuse_installed(releases_dir, manifest)
            dest = releases_dir / manifest.release_dirname
            syncfs(root_fd)  # the release's files reach the disk before its name appears
        finally:
            os.close(root_fd)
        os.rename(tmp, dest)
        fsync_dir(releases_dir)
    except BaseException as e:
        remove_tree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise AipbxError(f"cannot unpack {artifact}: {e}") from e
        raise
    return dest


def syncfs(fd: int) -> None:
    """Write out the file system that holds fd (syncfs(2)): what the unpack wrote, and no
    other file system's dirty pages as sync(2) would write. os.sync when the C library has
    no syncfs."""
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    if call(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def _record(tree: Path, artifact: Path, digest: str) -> None:
    """What the release was unpacked from, written into it before it gets its name."""
    doc: dict[str, Any] = {"sha256": digest, "artifact": artifact.name, "installed": time.time()}
    fd = os.open(tree / RECORD_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, sort_keys=True) + "\n")
        os.fchmod(f.fileno(), 0o644)


def recorded_sha256(release: Path) -> str | None:
    """The sha256 of the artifact a release was unpacked from; None when it has no record
    (installed before releases kept one) or the record is unreadable."""
    try:
        fd = os.open(release / RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        doc = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    sha = doc.get("sha256") if isinstance(doc, dict) else None
    return sha if isinstance(sha, str) and len(sha) == 64 else None
