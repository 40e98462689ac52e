"""What an unpack costs in system calls (issue 11, item 14), with its safety kept: the
directory fds are cached along one chain (appliance.release.tree), so a member costs about
one openat whatever its depth; modes come out right under any umask; the release reaches
the disk by syncfs of its own file system before its name appears; nothing stays open.
Counted through a wrapper around the os module the tree uses, never timed."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import AipbxError, UsageError
from appliance.release import tree as tree_mod
from appliance.release import unpack as unpack_mod
from appliance.release.manifest import MANIFEST_NAME
from appliance.release.pack import pack
from appliance.release.unpack import MAX_DEPTH, syncfs, unpack

MB = 1 << 20
MANIFEST = b'name = "t"\nversion = "1.0"\nkind = "backend"\ncommand = ["x"]\n'


class CountingOs:
    """The os module as appliance.release.tree sees it, counting what it opens."""

    def __init__(self, *, write_at_most: int | None = None) -> None:
        self.dir_opens = self.file_opens = self.mkdirs = self.fchmods = 0
        self.write_at_most = write_at_most

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_DIRECTORY:
            self.dir_opens += 1
        else:
            self.file_opens += 1
        return os.open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(self, path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        self.mkdirs += 1
        os.mkdir(path, mode, dir_fd=dir_fd)

    def fchmod(self, fd: int, mode: int) -> None:
        self.fchmods += 1
        os.fchmod(fd, mode)

    def write(self, fd: int, data: Any) -> int:
        if self.write_at_most is not None:
            data = memoryview(data)[: self.write_at_most]  # a short write, as on a full disk
        return os.write(fd, data)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingOs:
    c = CountingOs()
    monkeypatch.setattr(tree_mod, "os", c)
    return c


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _tree(src: Path, dirs: list[str], files_per_dir: int) -> tuple[int, int]:
    """Directories `dirs` under src, each with files; (directories, files) made."""
    src.mkdir()
    (src / MANIFEST_NAME).write_bytes(MANIFEST)
    files = 1
    for d in dirs:
        (src / d).mkdir(parents=True, exist_ok=True)
        for i in range(files_per_dir):
            (src / d / f"f{i}.js").write_text(f"{d}/{i}\n")
            files += 1
    made = {p for d in dirs for p in [Path(d), *Path(d).parents] if str(p) != "."}
    return len(made), files


def _pack_and_unpack(tmp_path: Path, dirs: list[str], files_per_dir: int) -> tuple[Path, int, int]:
    src = tmp_path / "src"
    n_dirs, n_files = _tree(src, dirs, files_per_dir)
    artifact = pack(src, tmp_path / "out", version="1.0")
    dest = unpack(artifact, tmp_path / "releases", max_bytes=100 * MB)
    return dest, n_dirs, n_files


def test_a_deep_tree_opens_each_directory_once(tmp_path: Path, counting: CountingOs) -> None:
    deep = "/".join(f"d{i}" for i in range(MAX_DEPTH - 1))  # the deepest a file may be
    dirs = ["/".join(deep.split("/")[: i + 1]) for i in range(MAX_DEPTH - 1)]
    dest, n_dirs, n_files = _pack_and_unpack(tmp_path, dirs, files_per_dir=3)
    assert (dest / deep / "f2.js").read_text() == f"{deep}/2\n"
    assert counting.file_opens == n_files  # one openat per file, whatever its depth
    assert counting.mkdirs == n_dirs
    assert counting.dir_opens == n_dirs  # each directory entered once (was ~depth per file)


def test_many_siblings_open_each_directory_once(tmp_path: Path, counting: CountingOs) -> None:
    dirs = [f"node_modules/pkg{i:03}/lib" for i in range(150)]
    dest, n_dirs, n_files = _pack_and_unpack(tmp_path, dirs, files_per_dir=2)
    assert (dest / "node_modules/pkg149/lib/f1.js").read_text() == "node_modules/pkg149/lib/1\n"
    assert counting.file_opens == n_files
    assert counting.dir_opens == n_dirs
    assert counting.dir_opens + counting.file_opens <= 1.01 * (n_dirs + n_files) + 1


def _raw_artifact(
    path: Path, members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]
) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        ti = tarfile.TarInfo(MANIFEST_NAME)
        ti.size = len(MANIFEST)
        tar.addfile(ti, io.BytesIO(MANIFEST))
        for m in members:
            if isinstance(m, tuple):
                m[0].size = len(m[1])
                tar.addfile(m[0], io.BytesIO(m[1]))
            else:
                tar.addfile(m)
    return path


def _reg(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    return ti, data


def test_any_order_costs_no_more_than_a_walk_per_member(
    tmp_path: Path, counting: CountingOs
) -> None:
    """Members alternating between two deep branches (no tool writes that order): each
    switch re-opens the new branch, never more than its depth, and every file lands."""
    depth = 20
    left = "/".join(f"l{i}" for i in range(depth))
    right = "/".join(f"r{i}" for i in range(depth))
    members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = []
    for i in range(10):
        members += [_reg(f"{left}/a{i}", b"L"), _reg(f"{right}/b{i}", b"R")]
    artifact = _raw_artifact(tmp_path / "zigzag.tar.gz", members)
    before = _open_fds()
    dest = unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert _open_fds() == before
    assert (dest / left / "a9").read_bytes() == b"L"
    assert (dest / right / "b9").read_bytes() == b"R"
    # at most depth openat per member, and one more per directory it creates (the first,
    # failed, openat); a fresh walk from the root, as before, cost depth per member too
    assert counting.dir_opens <= depth * len(members) + counting.mkdirs
    assert counting.file_opens == len(members) + 1


def test_hardlinks_on_and_off_the_chain(tmp_path: Path) -> None:
    link = tarfile.TarInfo("a/b/same")
    link.type, link.linkname = tarfile.LNKTYPE, "a/b/f"
    other = tarfile.TarInfo("c/d/other")
    other.type, other.linkname = tarfile.LNKTYPE, "a/b/f"
    up = tarfile.TarInfo("a/b/up")
    up.type, up.linkname = tarfile.LNKTYPE, MANIFEST_NAME
    artifact = _raw_artifact(tmp_path / "links.tar.gz", [_reg("a/b/f", b"data"), link, other, up])
    before = _open_fds()
    dest = unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert _open_fds() == before
    ino = (dest / "a/b/f").stat().st_ino
    assert (dest / "a/b/same").stat().st_ino == ino == (dest / "c/d/other").stat().st_ino
    assert (dest / "a/b/up").read_bytes() == MANIFEST


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027, 0o077, 0o777])
def test_modes_under_any_umask(tmp_path: Path, counting: CountingOs, mask: int) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / MANIFEST_NAME).write_bytes(MANIFEST)
    (src / "bin/run").write_text("#!/bin/sh\n")
    os.chmod(src / "bin/run", 0o700)
    (src / "secret.json").write_text("{}")
    os.chmod(src / "secret.json", 0o600)
    artifact = pack(src, tmp_path / "out", version="1.0")
    with umask(mask):
        dest = unpack(artifact, tmp_path / "releases", max_bytes=MB)

    def mode(rel: str) -> int:
        return stat.S_IMODE(os.lstat(dest / rel).st_mode)

    assert (mode("bin"), mode("bin/run"), mode("secret.json")) == (0o755, 0o755, 0o644)
    # created with the final mode when the umask allows it; else set through the fd
    assert (counting.fchmods == 0) == (mask & 0o755 == 0)


def test_process_umask_is_read_without_changing_it() -> None:
    with umask(0o027):
        assert tree_mod.process_umask() == 0o027
        assert os.umask(0o027) == 0o027


def test_a_short_write_is_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree_mod, "os", CountingOs(write_at_most=7))
    data = bytes(range(256)) * 40
    artifact = _raw_artifact(tmp_path / "a.tar.gz", [_reg("f", data)])
    dest = unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert (dest / "f").read_bytes() == data


def test_the_release_is_written_out_before_its_name_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []

    def recording(fd: int) -> None:
        where = os.readlink(f"/proc/self/fd/{fd}")
        assert Path(where).name.startswith(".unpack-")
        assert os.listdir(tmp_path / "releases") == [Path(where).name]  # not renamed yet
        assert (Path(where) / "f").read_bytes() == b"x"
        synced.append(where)
        syncfs(fd)

    def no_sync() -> None:
        raise AssertionError("sync(2) writes out every file system")

    monkeypatch.setattr(unpack_mod, "syncfs", recording)
    monkeypatch.setattr(os, "sync", no_sync)
    artifact = _raw_artifact(tmp_path / "a.tar.gz", [_reg("f")])
    dest = unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert len(synced) == 1 and os.listdir(tmp_path / "releases") == [dest.name]


def test_syncfs(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="syncfs: Bad file descriptor"):
        syncfs(-1)


def test_a_failed_syncfs_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "syncfs: Input/output error")

    monkeypatch.setattr(unpack_mod, "syncfs", failing)
    artifact = _raw_artifact(tmp_path / "a.tar.gz", [_reg("f")])
    with pytest.raises(AipbxError, match="Input/output error"):
        unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert os.listdir(tmp_path / "releases") == []


def test_no_fd_is_left_open_by_a_refusal(tmp_path: Path) -> None:
    through = tarfile.TarInfo("a/b/c/l")
    through.type, through.linkname = tarfile.SYMTYPE, "."
    artifact = _raw_artifact(tmp_path / "a.tar.gz", [_reg("a/b/c/f"), through, _reg("a/b/c/l/x")])
    before = _open_fds()
    with pytest.raises(UsageError, match="a/b/c/l: path goes through a symlink"):
        unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert _open_fds() == before
    assert os.listdir(tmp_path / "releases") == []


# --- what the forward-only reader refuses ----------------------------------------------------


def _header(name: str, kind: bytes, size_field: bytes) -> bytes:
    """A header whose size field is `size_field` (12 bytes, e.g. a negative base-256)."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = kind, 0o644
    buf = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    buf[124:136] = size_field
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf)


def _manifest_member() -> bytes:
    ti = tarfile.TarInfo(MANIFEST_NAME)
    ti.size, ti.mode = len(MANIFEST), 0o644
    return ti.tobuf(tarfile.GNU_FORMAT) + MANIFEST + b"\0" * (-len(MANIFEST) % 512)


NEGATIVE = b"\xff" * 11 + b"\x00"  # -256 in base-256
BACK = b"\xff" * 10 + b"\xfc\x00"  # -1024: two blocks back
END = b"\0" * 1024


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_header("f", tarfile.REGTYPE, NEGATIVE) + END, "f: a negative size (-256) refused"),
        (_header("p", tarfile.XHDTYPE, NEGATIVE) + END, "not a valid .tar.gz"),
        (_header("p", tarfile.XHDTYPE, BACK) + END, "a read without a bound"),
        (_header("l", tarfile.GNUTYPE_LONGNAME, BACK) + END, "a read without a bound"),
        (_header("f", tarfile.REGTYPE, b"%011o\0" % 5000) + b"x" * 512, "ends inside it"),
    ],
    ids=["negative-file", "negative-pax", "pax-back", "longname-back", "data-cut-short"],
)
def test_sizes_that_do_not_add_up(tmp_path: Path, raw: bytes, message: str) -> None:
    artifact = tmp_path / "a.tar.gz"
    artifact.write_bytes(gzip.compress(_manifest_member() + raw, compresslevel=1))
    with pytest.raises(UsageError) as e:
        unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert message in e.value.message and "\n" not in e.value.message
    assert os.listdir(tmp_path / "releases") == []
