"""Installed releases under /opt/aipbx/releases (DESIGN decision 5): install an artifact
(verify, unpack, link the shared dirs), list them, and remove the old ones beyond `keep`
that no color runs."""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from appliance import shared, validate
from appliance.config import Config
from appliance.errors import UsageError
from appliance.paths import Paths
from appliance.release.checksum import verify
from appliance.release.manifest import (
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    parse_manifest,
)
from appliance.release.unpack import unpack

SERVICE_USER = shared.SERVICE_USER


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


def link_shared(paths: Paths, release: Path, m: Manifest) -> None:
    """Link the release's shared dirs to /var/lib/aipbx/shared/<name>/<dir>; what it ships
    in them is kept aside and put there each time it starts (appliance.shared)."""
    shared.link(paths, release, m)


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


def to_remove(
    all_releases: list[Installed],
    keep: int,
    in_use: set[str],
    failed: frozenset[str] = frozenset(),
) -> list[Installed]:
    """Pure: beyond the `keep` to keep of each kind, those no color or frontend uses. The
    ones kept are the newest that did not fail, then (if room is left) the newest failed
    ones: a release whose rollout failed goes before any that went live."""
    out: list[Installed] = []
    for kind in {r.manifest.kind for r in all_releases}:
        mine = [r for r in all_releases if r.manifest.kind == kind]
        mine.sort(key=lambda r: (r.dirname not in failed, r.mtime), reverse=True)
        out += [r for r in mine[keep:] if r.dirname not in in_use]
    return out


def gc(
    paths: Paths, keep: int, in_use: set[str], failed: frozenset[str] = frozenset()
) -> list[str]:
    removed = []
    for r in to_remove(installed(paths), keep, in_use, failed):
        # Rename first: a half-removed tree never looks like a release.
        doomed = paths.releases / f".remove-{r.dirname}"
        os.rename(r.path, doomed)
        shutil.rmtree(doomed)
        removed.append(r.dirname)
    return removed
