"""Check and unpack a release artifact into an immutable release directory.

`unpack` streams the tar.gz member by member into `releases/.unpack-<random>` — nothing whole in
memory, nothing written through a symlink — then renames it to `releases/<name>-<version>`.
Anything unsafe is refused with a UsageError and leaves nothing under releases/. Every read
is bounded (appliance.release.archive: header sizes, gzip's CRC; here: members, bytes,
path depth and length), and the sha256 of the bytes unpacked is compared with the one
verified, so a file changed after its check is refused. The release records the sha256 of
the artifact it came from (RECORD_NAME), so that another artifact with the same name and
version is told apart (appliance.releases.install)."""

from __future__ import annotations

import errno
import json
import os
import stat
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any

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
from appliance.safefs import remove_tree

CHUNK = 1024 * 1024
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


def release_mode(mode: int) -> int:
    """Files in a release are readable by the service user; executables stay executable."""
    return 0o755 if mode & 0o111 else 0o644


def refusal(member: tarfile.TarInfo) -> str | None:
    """Why a member of this type is refused, or None if its type is allowed."""
    if member.ischr() or member.isblk():
        return "device node refused"
    if member.isfifo():
        return "fifo refused"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return f"member type {member.type!r} refused"
    return None


class _Tree:
    """Creates entries under one root with *at() calls on directory fds opened O_NOFOLLOW, so
    no write ever goes through a symlink, whatever the archive put where."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self._cached: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None
        os.close(self.root_fd)

    def open_dir(self, parts: tuple[str, ...], *, create: bool) -> int:
        """A new fd for directory `parts`, creating missing ones (0755) when create."""
        fd = os.dup(self.root_fd)
        try:
            for comp in parts:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                try:
                    nfd = os.open(comp, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, flags, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):  # a symlink, a file
                        raise
                    raise UsageError(
                        f"{'/'.join(parts)}: path goes through a symlink or a file ({e.strerror})",
                        hint=REBUILD_HINT,
                    ) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, parts: tuple[str, ...]) -> int:
        """The fd of parts' parent directory (created if missing); owned by the tree."""
        parent = parts[:-1]
        if self._cached is None or self._cached[0] != parent:
            fd = self.open_dir(parent, create=True)
            if self._cached is not None:
                os.close(self._cached[1])
            self._cached = (parent, fd)
        return self._cached[1]

    def mkdir(self, parts: tuple[str, ...]) -> None:
        os.close(self.open_dir(parts, create=True))

    def write(self, parts: tuple[str, ...], data: IO[bytes], mode: int, mtime: float) -> int:
        """Create a new file (never overwriting anything) from data; returns bytes written."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, 0o600, dir_fd=self.parent(parts))
        except FileExistsError:
            raise UsageError(f"{'/'.join(parts)}: duplicate member", hint=REBUILD_HINT) from None
        written = 0
        try:
            while chunk := data.read(CHUNK):
                written += os.write(fd, chunk)
            os.fchmod(fd, release_mode(mode))
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
        name = "/".join(parts)
        try:
            tfd = self.open_dir(target[:-1], create=False)
        except FileNotFoundError:
            tfd = -1
        try:
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False) if tfd >= 0 else None
        except FileNotFoundError:
            st = None
        try:
            if st is None or not stat.S_ISREG(st.st_mode):
                raise UsageError(
                    f"{name}: hardlink target {'/'.join(target)} is not an earlier file",
                    hint=REBUILD_HINT,
                )
            dst_fd = self.parent(parts)
            try:
                os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=dst_fd)
            except FileExistsError:
                raise UsageError(f"{name}: duplicate member", hint=REBUILD_HINT) from None
        finally:
            if tfd >= 0:
                os.close(tfd)

    def read_manifest(self, source: str) -> Manifest:
        fd = os.open(MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.root_fd)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        try:
            return parse_manifest(raw.decode(), source)
        except UnicodeDecodeError:
            raise UsageError(f"{source}: not UTF-8 text", hint=REBUILD_HINT) from None


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
    tar: tarfile.TarFile, tree: _Tree, root: Path, limits: _Limits, releases_dir: Path
) -> Manifest:
    manifest: Manifest | None = None
    links: list[str] = []
    guard = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4: a second opinion
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
            data = tar.extractfile(member)
            assert data is not None  # a regular member always has data
            limits.add(tree.write(parts, data, member.mode, member.mtime) - member.size, name)
            if name == MANIFEST_NAME:  # first in a packed artifact: refuse a bad one early
                manifest = tree.read_manifest(f"{limits.artifact}: {MANIFEST_NAME}")
                _refuse_installed(releases_dir, manifest)
    if manifest is None:
        raise UsageError(f"{limits.artifact}: no {MANIFEST_NAME} at its top", hint=REBUILD_HINT)
    _check_links_resolve(root, links)
    return manifest


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
        tree = _Tree(tmp)
        try:
            with archive.open_artifact(artifact) as art:
                limits = _Limits(artifact, max_bytes, max_files)
                manifest = _extract(art.tar, tree, tmp, limits, releases_dir)
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
        os.sync()  # the release's files reach the disk before its name appears
        os.rename(tmp, dest)
        fsync_dir(releases_dir)
    except BaseException as e:
        remove_tree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise AipbxError(f"cannot unpack {artifact}: {e}") from e
        raise
    return dest


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
