"""Hostile artifacts (issue 11, item 5): each is a one-line UsageError (exit 2), never a
traceback, a hang or a memory blow-up, and leaves nothing under releases/."""

from __future__ import annotations

import gzip
import io
import os
import resource
import signal
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import releases
from appliance.errors import ExitCode, UsageError
from appliance.paths import Paths
from appliance.release import archive
from appliance.release.checksum import checksum_line, sha256_file, verify
from appliance.release.manifest import MANIFEST_NAME, parse_manifest
from appliance.release.unpack import MAX_DEPTH, RECORD_NAME, unpack
from appliance.safefs import remove_tree

MB = 1 << 20
MANIFEST = b'name = "evil"\nversion = "1.0"\nkind = "backend"\ncommand = ["x"]\n'


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    def boom(*_: object) -> None:
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode = kind, len(data), 0o644
    pad = (-len(data)) % tarfile.BLOCKSIZE
    return ti.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * pad


def _header(kind: bytes, size: int, name: str = "././@PaxHeader") -> bytes:
    """A bare header block that declares `size` bytes of data (which do not follow)."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = kind, size
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _pax(records: dict[str, str]) -> bytes:
    body = b""
    for k, v in records.items():
        rec = f" {k}={v}\n".encode()
        n = len(rec)
        while len(str(n + len(str(n))).encode()) + len(rec) != n:
            n = len(str(n)) + len(rec)
        body += str(n).encode() + rec
    return _member("././@PaxHeader", body, tarfile.XHDTYPE)


END = b"\0" * (2 * tarfile.BLOCKSIZE)


def _artifact(path: Path, raw_tar: bytes, *, trailer: bytes = b"") -> Path:
    path.write_bytes(gzip.compress(raw_tar, compresslevel=1) + trailer)
    _sums(path)
    return path


def _sums(path: Path) -> None:
    path.with_name(f"{path.name}.sha256").write_text(checksum_line(sha256_file(path), path.name))


def _refused(path: Path, tmp_path: Path, match: str, *, first: bool = False) -> None:
    """Refused (UsageError, one line) by unpack, and by peek when the bad part is the first
    member (peek reads no further); nothing left."""
    rel = tmp_path / "releases"
    dos: list[Callable[[], object]] = [lambda: unpack(path, rel, max_bytes=10 * MB)]
    if first:
        dos.append(lambda: releases.peek_manifest(path))
    for do in dos:
        with pytest.raises(UsageError) as e:
            do()
        assert match in e.value.message, e.value.message
        assert "\n" not in e.value.message and e.value.exit_code == ExitCode.USAGE
    assert not rel.exists() or os.listdir(rel) == []


# --- the manifest --------------------------------------------------------------------------


def test_a_manifest_that_is_not_utf8(tmp_path: Path) -> None:
    raw = _member(MANIFEST_NAME, b'name = "\xff\xfe"\n') + END
    _refused(_artifact(tmp_path / "a.tar.gz", raw), tmp_path, "not UTF-8", first=True)


def test_a_manifest_nested_deeply(tmp_path: Path) -> None:
    deep = b"x = " + b"[" * 30_000 + b"]" * 30_000 + b"\n"
    with pytest.raises(UsageError, match="nested too deeply"):
        parse_manifest(deep.decode())
    raw = _member(MANIFEST_NAME, MANIFEST + deep) + END
    _refused(_artifact(tmp_path / "a.tar.gz", raw), tmp_path, "nested too deeply", first=True)


# --- trees -----------------------------------------------------------------------------------


def test_a_tree_deeper_than_the_bound(tmp_path: Path) -> None:
    name = "/".join(["d"] * (MAX_DEPTH + 1)) + "/f"
    raw = _member(MANIFEST_NAME, MANIFEST) + _member(name, b"x") + END
    _refused(_artifact(tmp_path / "a.tar.gz", raw), tmp_path, "directories deep refused")


def test_a_tree_deep_enough_to_break_recursion(tmp_path: Path) -> None:
    name = "/".join(["d"] * 3000) + "/f"  # a PAX path of 6 KB
    raw = _member(MANIFEST_NAME, MANIFEST) + _pax({"path": name}) + _member("x", b"x") + END
    _refused(_artifact(tmp_path / "a.tar.gz", raw), tmp_path, "longer than 4095 bytes")


def test_a_chain_of_links_too_long_to_resolve(tmp_path: Path) -> None:
    members = [_member(MANIFEST_NAME, MANIFEST), _member("end", b"x")]
    for i in range(1200):
        ti = tarfile.TarInfo(f"l{i}")
        ti.type, ti.linkname = tarfile.SYMTYPE, f"l{i + 1}" if i < 1199 else "end"
        members.append(ti.tobuf(tarfile.GNU_FORMAT))
    raw = b"".join(members) + END
    with pytest.raises(UsageError, match="symlink chain too long"):
        unpack(_artifact(tmp_path / "a.tar.gz", raw), tmp_path / "rel", max_bytes=MB)
    assert os.listdir(tmp_path / "rel") == []


def _deep_tree(top: Path, depth: int) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)


def test_gc_removes_a_release_of_any_depth_and_what_an_unpack_left(tmp_path: Path) -> None:
    """Installed before the depth bound (or left by a killed unpack): gc still removes it."""
    paths = Paths(tmp_path)
    for v in ("1", "2"):
        rel = paths.releases / f"evil-{v}"
        rel.mkdir(parents=True)
        (rel / MANIFEST_NAME).write_bytes(MANIFEST.replace(b'"1.0"', f'"{v}"'.encode()))
        os.utime(rel, (int(v), int(v)))
        _deep_tree(rel, 2000)
    left = paths.releases / ".unpack-x1y2"
    left.mkdir()
    _deep_tree(left, 2000)
    assert releases.gc(paths, 1, in_use=set()) == ["evil-1"]
    assert sorted(os.listdir(paths.releases)) == ["evil-2"]
    remove_tree(paths.releases)  # pytest's own cleanup recurses


# --- headers ----------------------------------------------------------------------------------


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    raw = _header(tarfile.XHDTYPE, 4 << 30) + b"\0" * 4096
    path = _artifact(tmp_path / "a.tar.gz", raw)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(path, tmp_path, "an extended header of 4294967296 bytes", first=True)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024  # not the 4 GB the header asked for


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
def test_other_huge_extended_headers(tmp_path: Path, kind: bytes) -> None:
    raw = _member(MANIFEST_NAME, MANIFEST) + _header(kind, 1 << 31, "././@LongLink") + END
    _refused(_artifact(tmp_path / "a.tar.gz", raw), tmp_path, "extended header of")


def test_a_chain_of_extended_headers(tmp_path: Path) -> None:
    raw = _member(MANIFEST_NAME, MANIFEST) + _pax({"comment": "x"}) * 3000 + _member("f") + END
    _refused(_artifact(tmp_path / "a.tar.gz", raw), tmp_path, "more than 4 extended headers")


def test_sparse_members(tmp_path: Path) -> None:
    raw = _member(MANIFEST_NAME, MANIFEST) + _member("s", b"x", tarfile.GNUTYPE_SPARSE) + END
    _refused(_artifact(tmp_path / "a.tar.gz", raw), tmp_path, "sparse member")
    pax = _pax({"GNU.sparse.map": "0,1", "GNU.sparse.size": "1"})
    raw = _member(MANIFEST_NAME, MANIFEST) + pax + _member("s", b"x") + END
    _refused(_artifact(tmp_path / "b.tar.gz", raw), tmp_path, "sparse member")


# --- gzip -------------------------------------------------------------------------------------


def test_a_bad_crc_is_refused(tmp_path: Path) -> None:
    good = gzip.compress(_member(MANIFEST_NAME, MANIFEST) + _member("f", b"data") + END)
    crc, size = struct.unpack("<II", good[-8:])
    path = tmp_path / "a.tar.gz"
    path.write_bytes(good[:-8] + struct.pack("<II", crc ^ 1, size))
    _sums(path)
    assert verify(path)  # the checksum file matches: only gzip's CRC is wrong
    with pytest.raises(UsageError, match="CRC check failed"):
        unpack(path, tmp_path / "rel", max_bytes=MB)
    assert os.listdir(tmp_path / "rel") == []


def test_what_follows_the_tar_end(tmp_path: Path) -> None:
    raw = _member(MANIFEST_NAME, MANIFEST) + END
    ok = _artifact(tmp_path / "ok.tar.gz", raw + b"\0" * 10240)  # record padding: fine
    assert unpack(ok, tmp_path / "rel", max_bytes=MB).name == "evil-1.0"
    big = _artifact(tmp_path / "big.tar.gz", raw + b"\0" * (2 * MB))
    with pytest.raises(UsageError, match="after the tar archive's end"):
        unpack(big, tmp_path / "rel2", max_bytes=10 * MB)
    junk = _artifact(tmp_path / "junk.tar.gz", raw, trailer=b"not gzip")
    with pytest.raises(UsageError, match="not a valid .tar.gz"):
        unpack(junk, tmp_path / "rel3", max_bytes=MB)


def test_an_artifact_changed_after_its_check_is_refused(tmp_path: Path) -> None:
    path = _artifact(tmp_path / "a.tar.gz", _member(MANIFEST_NAME, MANIFEST) + END)
    with pytest.raises(UsageError, match="changed while it was installed"):
        unpack(path, tmp_path / "rel", max_bytes=MB, sha256="0" * 64)
    assert os.listdir(tmp_path / "rel") == []


def test_the_record_name_is_the_appliances(tmp_path: Path) -> None:
    raw = _member(MANIFEST_NAME, MANIFEST) + _member(RECORD_NAME, b"{}") + END
    with pytest.raises(UsageError, match="a name of the appliance's refused"):
        unpack(_artifact(tmp_path / "a.tar.gz", raw), tmp_path / "rel", max_bytes=MB)


def test_archive_errors_are_one_line(tmp_path: Path) -> None:
    for exc in (zlib.error("x"), EOFError("x"), tarfile.ReadError("x"), RecursionError()):
        with pytest.raises(UsageError), archive.errors(tmp_path / "a.tar.gz"):
            raise exc


# --- the .sha256 and the artifact itself ------------------------------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "huge"])
def test_a_sha256_that_is_not_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    path = _artifact(tmp_path / "a.tar.gz", _member(MANIFEST_NAME, MANIFEST) + END)
    sums = tmp_path / "a.tar.gz.sha256"
    sums.unlink()
    if kind == "device":
        sums.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(sums)
    elif kind == "directory":
        sums.mkdir()
    else:
        sums.write_bytes(b"0" * (1 << 20))
    with pytest.raises(UsageError) as e:
        verify(path)
    assert "\n" not in e.value.message
    assert ("not a regular file" if kind != "huge" else "larger than") in e.value.message


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_an_artifact_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "a.tar.gz"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(UsageError, match="not a regular file"):
        verify(path)
    with pytest.raises(UsageError, match="not a regular file"):
        releases.peek_manifest(path)


def test_an_empty_or_garbage_artifact(tmp_path: Path) -> None:
    (tmp_path / "e.tar.gz").write_bytes(b"")
    (tmp_path / "g.tar.gz").write_bytes(io.BytesIO(b"\x1f\x8b garbage").getvalue())
    for name in ("e.tar.gz", "g.tar.gz"):
        with pytest.raises(UsageError, match="not a valid .tar.gz"):
            releases.peek_manifest(tmp_path / name)
