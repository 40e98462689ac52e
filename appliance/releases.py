"""Installed releases under /opt/aipbx/releases (DESIGN decision 5): install an artifact
(verify, unpack, link the shared dirs), list them, and remove the old ones beyond `keep`
that no color runs.

A release is immutable and named NAME-VERSION; it records the sha256 of the artifact it was
unpacked from. Installing an artifact whose release is already there reuses it only when
it is the same artifact: another one with the same name and version is refused (exit 2).
A release installed before releases kept that record is reused when the artifact's
manifest is byte for byte the installed one, with a warning (docs/DECISIONS.md §8)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from appliance import safefs, shared, validate
from appliance.config import Config
from appliance.errors import UsageError
from appliance.paths import Paths
from appliance.release import archive
from appliance.release.checksum import verify
from appliance.release.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    load_manifest,
    parse_manifest,
)
from appliance.release.unpack import recorded_sha256, unpack

log = logging.getLogger("aipbx.releases")

SERVICE_USER = shared.SERVICE_USER


@dataclass(frozen=True)
class Installed:
    dirname: str
    manifest: Manifest
    path: Path
    mtime: float


def peek_manifest(artifact: Path) -> Manifest:
    """The manifest, which `release pack` puts first in the artifact, without unpacking."""
    return parse_manifest(peek_manifest_text(artifact), f"{artifact}:{MANIFEST_NAME}")


def peek_manifest_text(artifact: Path) -> str:
    """The manifest's text, read from the artifact's first member (bounded, UTF-8)."""
    with archive.open_artifact(artifact) as art:
        first = art.tar.next()
        if first is None or first.name.lstrip("./") != MANIFEST_NAME or not first.isfile():
            raise UsageError(
                f"{artifact}: {MANIFEST_NAME} is not the first member",
                hint="build artifacts with `aipbxctl release pack`",
            )
        if first.size > MAX_MANIFEST_BYTES:
            raise UsageError(f"{artifact}: {MANIFEST_NAME} larger than {MAX_MANIFEST_BYTES} bytes")
        f = art.tar.extractfile(first)
        assert f is not None
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{artifact}:{MANIFEST_NAME}: not UTF-8 text (byte {e.start})",
            hint="build artifacts with `aipbxctl release pack`",
        ) from None


def link_shared(paths: Paths, release: Path, m: Manifest) -> None:
    """Link the release's shared dirs to /var/lib/aipbx/shared/<name>/<dir>; what it ships
    in them is kept aside and put there each time it starts (appliance.shared)."""
    shared.link(paths, release, m)


def install(
    paths: Paths,
    cfg: Config,
    artifact: Path,
    *,
    key: Path | None = None,
    digest: str | None = None,
) -> Installed:
    """Verify and unpack an artifact (`digest`: already verified by the caller, its sha256);
    an installed release of the same name-version is reused only when it came from this
    very artifact (see the module doc)."""
    if digest is None:
        digest = verify(artifact, key=key)
    text = peek_manifest_text(artifact)
    m = parse_manifest(text, f"{artifact}:{MANIFEST_NAME}")
    paths.releases.mkdir(parents=True, exist_ok=True)
    existing = paths.releases / m.release_dirname
    if existing.is_dir():
        check_same(existing, artifact, digest, text)
        return get(paths, m.release_dirname)
    path = unpack(
        artifact,
        paths.releases,
        max_bytes=validate.size_bytes(cfg.releases.max_unpacked_size),
        sha256=digest,
    )
    link_shared(paths, path, m)
    return get(paths, path.name)


def same_artifact(recorded: str | None, digest: str, installed_text: str, text: str) -> str:
    """Pure: whether an artifact (sha256 `digest`, manifest `text`) is the one an installed
    release came from: "same", "other", or "unrecorded-same" (installed before releases
    recorded their artifact, and the manifests are the same bytes)."""
    if recorded is not None:
        return "same" if recorded == digest else "other"
    return "unrecorded-same" if installed_text == text else "other"


def check_same(existing: Path, artifact: Path, digest: str, text: str) -> None:
    """Refuse (exit 2) an artifact with the name and version of an installed release but
    other content."""
    recorded = recorded_sha256(existing)
    try:
        installed_text = safefs.read_input_text(existing / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except (OSError, UsageError):
        installed_text = ""
    verdict = same_artifact(recorded, digest, installed_text, text)
    if verdict == "same":
        return
    if verdict == "unrecorded-same":
        log.warning(
            "%s was installed before releases recorded their artifact: its manifest is the "
            "same as %s's, so it is reused as it is (sha256 of this artifact %s…; not "
            "compared file by file)",
            existing.name,
            artifact.name,
            digest[:16],
            extra={"fields": {"action": "install", "release": existing.name}},
        )
        return
    was = (
        f"from an artifact with sha256 {recorded[:16]}…"
        if recorded
        else "before releases recorded their artifact, with another manifest"
    )
    raise UsageError(
        f"{existing.name} is already installed ({was}); {artifact.name} (sha256 "
        f"{digest[:16]}…) has the same name and version but other content: refused",
        hint="a release is immutable: pack the new build with a new version "
        "(`aipbxctl release pack --version`)",
    )


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


LEFTOVERS = (".unpack-", ".remove-")  # what an interrupted unpack or gc leaves


def gc(
    paths: Paths, keep: int, in_use: set[str], failed: frozenset[str] = frozenset()
) -> list[str]:
    """Remove the releases beyond `keep` (to_remove), and what an interrupted unpack or gc
    left (the caller holds the mutation lock: nothing else unpacks meanwhile). A tree is
    removed iteratively, at any depth (safefs.remove_tree)."""
    removed = []
    for r in to_remove(installed(paths), keep, in_use, failed):
        # Rename first: a half-removed tree never looks like a release.
        doomed = paths.releases / f".remove-{r.dirname}"
        os.rename(r.path, doomed)
        safefs.remove_tree(doomed)
        removed.append(r.dirname)
    try:
        with os.scandir(paths.releases) as it:
            stale = [e.name for e in it if e.name.startswith(LEFTOVERS)]
    except FileNotFoundError:
        stale = []
    for name in stale:
        safefs.remove_tree(paths.releases / name, ignore_errors=True)
    return removed
