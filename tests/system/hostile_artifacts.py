"""Hostile release artifacts for test_hostile.py, built on the host in the format `aipbxctl
release pack` makes (a gzipped PAX tar with the manifest aipbx-release.toml first, and a
`.sha256` in sha256sum's format beside it): a manifest that is not UTF-8, one nested 30,000
deep, a first member declaring a 4 GiB PAX header, a tar whose gzip CRC is flipped (its
.sha256 recomputed), and a good one (whose .sha256 the test replaces by a fifo...)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import IO, cast

MANIFEST = "aipbx-release.toml"
CHUNK = 1 << 20


def manifest(name: str, version: str = "1.0.0") -> bytes:
    return (
        f'name = "{name}"\nversion = "{version}"\nkind = "backend"\n'
        'command = ["sleep", "infinity"]\n'
    ).encode()


def write_sums(artifact: Path) -> Path:
    """`<artifact>.sha256` as sha256sum (and release pack) writes it."""
    h = hashlib.sha256()
    with artifact.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    sums = artifact.with_name(f"{artifact.name}.sha256")
    sums.write_text(f"{h.hexdigest()}  {artifact.name}\n")
    return sums


def tar_gz(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A .tar.gz (PAX, members owned by root) of regular files, and its .sha256."""
    with (
        gzip.GzipFile(path, "wb", mtime=0) as gz,
        tarfile.open(fileobj=cast(IO[bytes], gz), mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            ti.uname = ti.gname = "root"
            tar.addfile(ti, io.BytesIO(data))
    write_sums(path)
    return path


def good(out: Path) -> Path:
    """A valid (never deployed) release: the test makes its .sha256 hostile."""
    return tar_gz(
        out / "hostile-sum-1.0.0.tar.gz", [(MANIFEST, manifest("hostile-sum")), ("a.txt", b"a\n")]
    )


def non_utf8_manifest(out: Path) -> Path:
    text = manifest("hostile-utf8") + b"# caf\xe9 \xff\xfe\n"
    return tar_gz(out / "hostile-utf8-1.0.0.tar.gz", [(MANIFEST, text)])


def nested_manifest(out: Path, depth: int = 30_000) -> Path:
    text = manifest("hostile-nested") + b"deep = " + b"[" * depth + b"\n"
    return tar_gz(out / "hostile-nested-1.0.0.tar.gz", [(MANIFEST, text)])


def huge_pax_header(out: Path, declared: int = 4 << 30, present: int = 512 << 20) -> Path:
    """The first member is a PAX extended header declaring `declared` bytes, followed by
    `present` zero bytes (compressed to ~0.5 MB): a reader that reads the header whole
    holds at least `present` bytes in memory before it can refuse anything."""
    path = out / "hostile-pax-1.0.0.tar.gz"
    ti = tarfile.TarInfo(f"PaxHeaders.0/{MANIFEST}")
    ti.type = tarfile.XHDTYPE
    ti.size = declared
    ti.mode, ti.mtime = 0o644, 1_700_000_000
    zeros = bytes(CHUNK)
    with gzip.GzipFile(path, "wb", mtime=0) as gz:
        gz.write(ti.tobuf(format=tarfile.USTAR_FORMAT))
        for _ in range(present // CHUNK):
            gz.write(zeros)
    write_sums(path)
    return path


def flipped_crc(out: Path) -> Path:
    """A valid release whose gzip trailer has a wrong CRC32, with a .sha256 of the file as
    it is (so only gzip's own check can tell). 2 MiB of random data after the manifest: the
    error shows only at the end of the stream, while the release is being unpacked."""
    path = tar_gz(
        out / "hostile-crc-1.0.0.tar.gz",
        [(MANIFEST, manifest("hostile-crc")), ("payload.bin", os.urandom(2 << 20))],
    )
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the trailer: CRC32, then ISIZE, each 4 bytes little-endian
    path.write_bytes(bytes(raw))
    write_sums(path)
    return path
