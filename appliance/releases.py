"""Installed releases under /opt/aipbx/releases (DESIGN decision 5): install an artifact
(verify, unpack, link the shared dirs), list them, and remove the old ones beyond `keep`
that no color runs."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from appliance import validate
from appliance.config import Config
from appliance.errors import UsageError
from appliance.fsutil import atomic_symlink
from appliance.paths import Paths
from appliance.release.checksum import verify
from appliance.release.manifest import (
    MANIFEST_NAME,
    Kind,
    Manifest,
    load_manifest,
    parse_manifest,
)
from appliance.release.unpack import unpack

SERVICE_USER = "_aipbx"


@dataclass(frozen=True)
class Installed:
    dirname: str
    manifest: Manifest
    path: Path
    mtime: float


def peek_manifest(artifact: Path) -> Manifest:
    """The manifest, which `release pack` puts first in the artifact, without unpacking."""
    try:
        with tarfile.open(artifact, mode="r|gz") as tar:
            first = tar.next()
            if first is None or first.name.lstrip("./") != MANIFEST_NAME or not first.isfile():
                raise UsageError(
                    f"{artifact}: {MANIFEST_NAME} is not the first member",
                    hint="build artifacts with `aipbxctl release pack`",
                )
            f = tar.extractfile(first)
            assert f is not None
            return parse_manifest(f.read(65536).decode(), f"{artifact}:{MANIFEST_NAME}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UsageError(f"{artifact}: not a readable .tar.gz ({e})") from None


def _owner() -> tuple[int, int]:
    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError:
        return -1, -1


def link_shared(paths: Paths, release: Path, m: Manifest) -> None:
    """Persistent dirs the app writes live under /var/lib/aipbx/shared/<name>/<dir> and are
    linked into the release (Capistrano's linked dirs). What a build ships in such a dir
    seeds the shared one once, never overwriting what the app wrote."""
    if m.kind is Kind.FRONTEND:
        return  # an SPA build's assets belong to the release; nothing writes into it
    uid, gid = _owner()
    for rel in m.shared_dirs:
        target = paths.shared / m.name / rel
        if not target.exists():
            target.mkdir(parents=True, mode=0o750)
            if uid != -1:
                os.chown(target, uid, gid)
        inside = release / rel
        if inside.is_symlink():
            continue
        if inside.is_dir():
            for item in inside.iterdir():
                dest = target / item.name
                if not dest.exists():
                    shutil.copytree(item, dest, symlinks=True) if item.is_dir() else shutil.copy2(
                        item, dest
                    )
            shutil.rmtree(inside)
        inside.parent.mkdir(parents=True, exist_ok=True)
        atomic_symlink(target, inside)


def install(paths: Paths, cfg: Config, artifact: Path, *, key: Path | None = None) -> Installed:
    """Verify and unpack an artifact; an already installed version is reused (releases are
    immutable: the same name-version is the same tree)."""
    if not artifact.is_file():
        raise UsageError(f"{artifact}: no such file")
    verify(artifact, key=key)
    m = peek_manifest(artifact)
    paths.releases.mkdir(parents=True, exist_ok=True)
    existing = paths.releases / m.release_dirname
    if existing.is_dir():
        return get(paths, m.release_dirname)
    path = unpack(
        artifact, paths.releases, max_bytes=validate.size_bytes(cfg.releases.max_unpacked_size)
    )
    link_shared(paths, path, m)
    return get(paths, path.name)


def get(paths: Paths, dirname: str) -> Installed:
    path = paths.releases / dirname
    if not (path / MANIFEST_NAME).is_file():
        raise UsageError(
            f"release {dirname} is not installed",
            hint="`aipbxctl releases` lists what is installed",
        )
    return Installed(dirname, load_manifest(path / MANIFEST_NAME), path, path.stat().st_mtime)


def installed(paths: Paths) -> list[Installed]:
    if not paths.releases.is_dir():
        return []
    out = []
    for p in paths.releases.iterdir():
        if p.name.startswith(".") or not (p / MANIFEST_NAME).is_file():
            continue
        out.append(get(paths, p.name))
    return sorted(out, key=lambda r: r.mtime)


def find(paths: Paths, version_or_dir: str, *, prefer_name: str | None = None) -> Installed:
    """A release by its dir name or by its version (of the app `prefer_name` when several
    apps have that version)."""
    matches = [r for r in installed(paths) if version_or_dir in (r.dirname, r.manifest.version)]
    if len(matches) > 1 and prefer_name:
        matches = [r for r in matches if r.manifest.name == prefer_name] or matches
    if len(matches) != 1:
        raise UsageError(
            f"no single installed release matches {version_or_dir!r}"
            + (f" ({len(matches)} do)" if matches else ""),
            hint="`aipbxctl releases` lists what is installed",
        )
    return matches[0]


def to_remove(all_releases: list[Installed], keep: int, in_use: set[str]) -> list[Installed]:
    """Pure: beyond the newest `keep` of each kind, those no color or frontend uses."""
    out: list[Installed] = []
    for kind in {r.manifest.kind for r in all_releases}:
        mine = [r for r in all_releases if r.manifest.kind == kind]
        mine.sort(key=lambda r: r.mtime, reverse=True)
        out += [r for r in mine[keep:] if r.dirname not in in_use]
    return out


def gc(paths: Paths, keep: int, in_use: set[str]) -> list[str]:
    removed = []
    for r in to_remove(installed(paths), keep, in_use):
        # Rename first: a half-removed tree never looks like a release.
        doomed = paths.releases / f".remove-{r.dirname}"
        os.rename(r.path, doomed)
        shutil.rmtree(doomed)
        removed.append(r.dirname)
    return removed
