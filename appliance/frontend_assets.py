"""Earlier frontend releases' files, for the tabs opened before a frontend upgrade.

A single-page app loads its code-split chunks lazily, by content-hashed names: a tab opened
on release N asks for `412.3f2a9c.js` long after N+1 is live, and N+1 has no such file
(the page then breaks with a ChunkLoadError until reloaded). nginx serves the live
frontend from `/opt/aipbx/frontend/current`; what it does not find there it looks up in
`/opt/aipbx/frontend/assets`, a tree of links to the files of every other installed
frontend release (newest first when two have the same path; hashed names mean the same
content anyway). HTML is left out: an old `index.html` is never served again.

`assets` is a symlink to a `.assets-<n>` directory built beside it and switched
atomically, so nginx never sees a half-built tree and needs no reload. The tree is built
before `current` switches (it then holds the release being replaced) and again after
garbage collection (a removed release's files leave it). Which releases stay installed,
and so for how long an old tab keeps working, is `[releases] keep` (per kind)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance import safefs
from appliance.fsutil import atomic_symlink, fsync_dir
from appliance.release.manifest import MANIFEST_NAME

LINK = "assets"
_BUILT = ".assets-"
_SKIP_SUFFIXES = (".html", ".htm")


@dataclass(frozen=True)
class Source:
    """One earlier release: its dir name and where its files are."""

    dirname: str
    root: Path


def release_files(root: Path) -> list[str]:
    """The regular files under `root`, as relative paths, links and HTML left out (a
    release's tree is root's and immutable: walking it follows no link)."""
    out: list[str] = []
    for top, dirs, files in os.walk(root, followlinks=False):
        rel_top = os.path.relpath(top, root)
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(top, d)))
        for name in sorted(files):
            full = os.path.join(top, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            rel = name if rel_top == "." else os.path.join(rel_top, name)
            if rel == MANIFEST_NAME or name.lower().endswith(_SKIP_SUFFIXES):
                continue
            out.append(rel)
    return out


def plan(sources: Iterable[tuple[Source, list[str]]]) -> dict[str, Path]:
    """Pure: relative path -> the file the link points at; the first source (the newest
    release) wins a path two releases have."""
    links: dict[str, Path] = {}
    for src, files in sources:
        for rel in files:
            links.setdefault(rel, src.root / rel)
    return links


def rebuild(frontend_dir: Path, sources: list[Source]) -> int:
    """Build the links of `sources` (newest first) in a new directory, point `assets` at it,
    remove the directories built before. Returns the number of links."""
    links = plan((s, release_files(s.root)) for s in sources)
    frontend_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    while (frontend_dir / f"{_BUILT}{n}").exists() or (frontend_dir / f"{_BUILT}{n}").is_symlink():
        n += 1
    built = frontend_dir / f"{_BUILT}{n}"
    built.mkdir(mode=0o755)
    for rel, target in links.items():
        link = built / rel
        link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.symlink(target, link)
    fsync_dir(built)
    atomic_symlink(built.name, frontend_dir / LINK)
    for old in frontend_dir.iterdir():
        if old.name.startswith(_BUILT) and old.name != built.name:
            with contextlib.suppress(OSError):
                safefs.remove_tree(old)
    return len(links)
