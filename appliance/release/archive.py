"""Reading a release artifact (a .tar.gz) within bounds.

tarfile alone trusts its input in three ways that cost memory or a traceback: it reads a
PAX or GNU long-name header whole, whatever size it declares (4 GB of RAM for one header);
it processes a chain of such headers recursively (a RecursionError); and its stream mode
never checks gzip's CRC and length. Here the artifact is opened as a regular file only
(appliance.safefs), decompressed by gzip.GzipFile (which checks each member's CRC32 and
length at its end), and read by a TarFile whose headers are bounded: an extended header
larger than MAX_HEADER, more than MAX_CHAIN of them before a member, or any sparse member
is refused before it is read. `finish` reads what follows the tar's end (at most
MAX_TRAILER bytes once decompressed) so that the CRC is checked, and the sha256 of every
byte read from the file is known: what was unpacked is what was verified."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from appliance import safefs
from appliance.errors import UsageError

MAX_HEADER = 1 << 20  # a PAX / GNU long name header; a real one is a few hundred bytes
MAX_CHAIN = 4  # extended headers before one member (a global, a PAX, a long name, link)
MAX_TRAILER = 1 << 20  # decompressed bytes after the tar's end (zero padding)
CHUNK = 1 << 20
REBUILD_HINT = "the artifact is not a safe release; build it with `aipbxctl release pack`"

_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class Refused(tarfile.TarError):
    """A header this reader will not process (tarfile lets a TarError that is not a
    HeaderError through TarFile.next unchanged)."""


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized or chained extended headers and sparse members."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise Refused(f"{self.name!r}: a sparse member (pack makes none)")
        if self.type in _EXTENDED:
            if self.size > MAX_HEADER:
                raise Refused(f"an extended header of {self.size} bytes (more than {MAX_HEADER})")
            depth = getattr(tarfile_, "_aipbx_chain", 0) + 1
            if depth > MAX_CHAIN:
                raise Refused(f"more than {MAX_CHAIN} extended headers before one member")
            tarfile_._aipbx_chain = depth  # type: ignore[attr-defined]
            try:
                return super()._proc_member(tarfile_)  # type: ignore[misc]
            finally:
                tarfile_._aipbx_chain = depth - 1  # type: ignore[attr-defined]
        return super()._proc_member(tarfile_)  # type: ignore[misc]

    def _proc_gnusparse_00(self, *args: Any) -> None:
        raise Refused("a sparse member (pack makes none)")

    _proc_gnusparse_01 = _proc_gnusparse_00
    _proc_gnusparse_10 = _proc_gnusparse_00


class _Hashing:
    """A read-only file object over an fd that hashes every byte it returns."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = os.read(self.fd, CHUNK if n is None or n < 0 else min(n, CHUNK))
        self.sha256.update(data)
        return data

    def readable(self) -> bool:
        return True


class Artifact:
    """An open artifact: `tar` streams its members; `finish()` checks the rest."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._raw = _Hashing(fd)
        self._gz = gzip.GzipFile(fileobj=cast(IO[bytes], self._raw), mode="rb")
        self.tar = tarfile.open(  # noqa: SIM115  # closed by open_artifact
            fileobj=cast(IO[bytes], self._gz), mode="r|", tarinfo=BoundedTarInfo
        )

    def finish(self) -> str:
        """Read the rest of the file (gzip's CRC and length are checked at the end of each
        member; at most MAX_TRAILER decompressed bytes may follow the tar's end); returns
        the sha256 of the whole file as read."""
        extra = 0
        while chunk := self._gz.read(CHUNK):
            extra += len(chunk)
            if extra > MAX_TRAILER:
                raise Refused(f"more than {MAX_TRAILER} bytes after the tar archive's end")
        while self._raw.read(CHUNK):  # nothing should be left; read it to hash it
            pass
        return self._raw.sha256.hexdigest()


@contextlib.contextmanager
def open_artifact(path: Path) -> Iterator[Artifact]:
    """An artifact opened for streaming (see the module doc). Refusals, a bad gzip stream
    or tar header, and a file that is not a regular one are UsageErrors (exit 2)."""
    try:
        fd = safefs.open_input(path)
    except FileNotFoundError:
        raise UsageError(f"{safefs.shown(path)}: no such file") from None
    try:
        with errors(path):
            art = Artifact(path, fd)
            try:
                yield art
            finally:
                with contextlib.suppress(Exception):
                    art.tar.close()
    finally:
        os.close(fd)


@contextlib.contextmanager
def errors(path: Path) -> Iterator[None]:
    """What reading an artifact may raise, as one-line UsageErrors."""
    try:
        yield
    except Refused as e:
        raise UsageError(f"{path.name}: {e}: refused", hint=REBUILD_HINT) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UsageError(f"{path.name}: not a valid .tar.gz: {e}", hint=REBUILD_HINT) from None
    except RecursionError:
        raise UsageError(f"{path.name}: nested too deeply: refused", hint=REBUILD_HINT) from None
