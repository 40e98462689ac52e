"""Build a release artifact from a built app directory: `<name>-<version>.tar.gz` with the
manifest first, and `<name>-<version>.tar.gz.sha256` beside it.

The real backend's build is ~1 GB, so nothing is held whole in memory: the tar stream is
gzipped into a temp file in the output directory and hashed as the bytes are written, then
renamed into place. A failed pack leaves nothing behind."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

from appliance.errors import AipbxError, UsageError
from appliance.fsutil import atomic_write
from appliance.release.checksum import checksum_line
from appliance.release.manifest import (
    MANIFEST_NAME,
    Kind,
    Manifest,
    link_stays_inside,
    load_manifest,
    manifest_from_dict,
    manifest_to_dict,
    render_manifest,
)
from appliance.release.unpack import RECORD_NAME

# gzip -6: the size of -9 for node_modules at a fraction of the CPU time
COMPRESSLEVEL = 6
PAX = tarfile.PAX_FORMAT  # long names, large files, exact mtimes
PAX = tarfile.PAX_FORMAT  # long names, large files, exact mtimes


class HashingWriter:
    """A write-only file object that hashes (and counts) the bytes passing through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self._raw.write(view)
        return view.nbytes

    def flush(self) -> None:
        self._raw.flush()


def resolve_manifest(
    src_dir: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    kind: str | None = None,
    command: Sequence[str] | None = None,
    migrate: Sequence[str] | None = None,
    shared_dirs: Sequence[str] | None = None,
    runtime: str | None = None,
    sql_migrations: str | None = None,
    sql_baseline: str | None = None,
    required_env: Sequence[str] | None = None,
    generated_env: Sequence[str] | None = None,
) -> Manifest:
    """The manifest for src_dir: its own aipbx-release.toml, if any, with the given values
    overriding it; otherwise one made from the given values (name and version required)."""
    own = src_dir / MANIFEST_NAME
    if own.is_file():
        data = manifest_to_dict(load_manifest(own))
        source = f"{own} (with overrides)"
    else:
        if name is None or version is None:
            raise UsageError(
                f"{src_dir} has no {MANIFEST_NAME} and no name/version was given",
                hint="give --name and --version, or add an aipbx-release.toml",
            )
        data = {"kind": "backend"}
        source = "release manifest"
    overrides: dict[str, Any] = {
        "name": name,
        "version": version,
        "kind": kind,
        "command": None if command is None else list(command),
        "migrate": None if migrate is None else list(migrate),
        "shared_dirs": None if shared_dirs is None else list(shared_dirs),
        "runtime": runtime,
        # --require-env / --generate-env: replace the manifest's lists
        "required_env": None if required_env is None else list(required_env),
        "generated_env": None if generated_env is None else list(generated_env),
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    if sql_migrations is not None or sql_baseline is not None:
        # --sql-migrations DIR / --sql-baseline B: [migrations], keeping the manifest's other key
        mig = dict(data.get("migrations") or {})
        if sql_migrations is not None:
            mig["sql_dir"] = sql_migrations
        if sql_baseline is not None:
            mig["baseline"] = sql_baseline
        data["migrations"] = mig
    return manifest_from_dict(data, source)


def tar_member(rel: str, st: os.stat_result, link_target: str | None = None) -> tarfile.TarInfo:
    """The TarInfo for one source entry: owner root, modes kept without setuid, setgid or
    sticky bits. Anything but a file, a directory or a symlink is refused."""
    ti = tarfile.TarInfo(rel)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = int(st.st_mtime)
    ti.mode = stat.S_IMODE(st.st_mode) & 0o777
    if stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISREG(st.st_mode):
        ti.type = tarfile.REGTYPE
        ti.size = st.st_size
    elif stat.S_ISLNK(st.st_mode) and link_target is not None:
        ti.type = tarfile.SYMTYPE
        ti.linkname = link_target
        ti.mode = 0o777
    else:
        what = {
            stat.S_IFSOCK: "a socket",
            stat.S_IFIFO: "a fifo",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
        }.get(stat.S_IFMT(st.st_mode), "not a file, directory or symlink")
        raise UsageError(
            f"{rel}: is {what}; a release holds only files, directories and symlinks",
            hint="remove it from the build directory",
        )
    return ti


def _walk(src: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, path, lstat) of every entry under src, sorted, parents first."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(src / rel_dir if rel_dir else src) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            yield rel, entry.path, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(rel)
        stack.extend(reversed(subdirs))


def _checked_link(src: Path, rel: str, path: str) -> str:
    target = os.readlink(path)
    real = os.path.realpath(path)
    inside = real == str(src) or real.startswith(f"{src}/")
    if not link_stays_inside(rel, target) or not inside:
        raise UsageError(
            f"{rel}: symlink to {target!r} leaves the release",
            hint="a release may only link inside itself (relative links, no escaping '..')",
        )
    return target


def _write_tar(tar: tarfile.TarFile, src: Path, manifest: Manifest) -> None:
    text = render_manifest(manifest).encode()
    ti = tarfile.TarInfo(MANIFEST_NAME)
    ti.size, ti.mode, ti.mtime = len(text), 0o644, int(time.time())
    ti.uname = ti.gname = "root"
    tar.addfile(ti, io.BytesIO(text))
    for rel, path, st in _walk(src):
        if rel == MANIFEST_NAME:
            continue  # written first, rendered from the resolved manifest
        if rel == RECORD_NAME:
            continue  # an installed release's record (a release copied to be packed again)
        target = _checked_link(src, rel, path) if stat.S_ISLNK(st.st_mode) else None
        ti = tar_member(rel, st, target)
        if ti.isreg():
            with open(path, "rb") as f:
                tar.addfile(ti, f)
        else:
            tar.addfile(ti)
        # TarFile remembers every member; a million TarInfos would be the memory we avoid
        tar.members.clear()  # type: ignore[attr-defined]


def _check_sql_dir(src: Path, sql_dir: str) -> None:
    """[migrations] sql_dir is a directory of the build (not a link out of it)."""
    top, where = src.resolve(), (src / sql_dir).resolve()
    if not where.is_dir() or top not in where.parents:
        raise UsageError(
            f"[migrations] sql_dir: {sql_dir!r} is not a directory in {src}",
            hint="the directory of the app's *.sql files, e.g. migrations/postgres",
        )


def pack(
    src_dir: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    kind: str | None = None,
    command: Sequence[str] | None = None,
    migrate: Sequence[str] | None = None,
    shared_dirs: Sequence[str] | None = None,
    runtime: str | None = None,
    sql_migrations: str | None = None,
    sql_baseline: str | None = None,
    required_env: Sequence[str] | None = None,
    generated_env: Sequence[str] | None = None,
) -> Path:
    """Pack src_dir into out_dir/<name>-<version>.tar.gz (+ .sha256); returns the artifact."""
    if not src_dir.is_dir():
        raise UsageError(f"{src_dir}: not a directory", hint="give the built app directory")
    src = src_dir.resolve()
    manifest = resolve_manifest(
        src,
        name=name,
        version=version,
        kind=kind,
        command=command,
        migrate=migrate,
        shared_dirs=shared_dirs,
        runtime=runtime,
        sql_migrations=sql_migrations,
        sql_baseline=sql_baseline,
        required_env=required_env,
        generated_env=generated_env,
    )
    if manifest.migrations is not None:
        _check_sql_dir(src, manifest.migrations.sql_dir)
    if manifest.runtime is not None and not (src / manifest.runtime).is_dir():
        raise UsageError(f"runtime: {manifest.runtime!r} is not a directory in {src}")
    for d in manifest.shared_dirs if manifest.kind is Kind.BACKEND else ():
        if (src / d).is_symlink() or ((src / d).exists() and not (src / d).is_dir()):
            raise UsageError(
                f"shared dir {d!r} is not a directory in {src}",
                hint="a shared dir is a directory (what it holds is shipped) or absent",
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir.resolve()
    if out == src or src in out.parents:
        raise UsageError(
            f"{out_dir} is inside {src_dir}", hint="write the artifact outside the app directory"
        )
    artifact = out / manifest.artifact_name
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{artifact.name}.", suffix=".part")
    placed = False
    try:
        with os.fdopen(fd, "wb") as raw:
            hashed = HashingWriter(raw)
            gz = gzip.GzipFile(fileobj=hashed, mode="wb", compresslevel=COMPRESSLEVEL, mtime=0)
            with gz, tarfile.open(fileobj=cast(IO[bytes], gz), mode="w|", format=PAX) as tar:
                _write_tar(tar, src, manifest)
            raw.flush()
            os.fchmod(raw.fileno(), 0o644)
            os.fsync(raw.fileno())
        os.replace(tmp, artifact)
        placed = True
        sums = artifact.with_name(f"{artifact.name}.sha256")
        atomic_write(sums, checksum_line(hashed.sha256.hexdigest(), artifact.name))
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if placed:
            with contextlib.suppress(FileNotFoundError):
                artifact.unlink()
        if isinstance(e, OSError):
            raise AipbxError(f"cannot pack {src_dir}: {e}") from e
        raise
    return artifact
