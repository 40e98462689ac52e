"""The tree of links to earlier frontend releases' files (appliance.frontend_assets)."""

from __future__ import annotations

import os
from pathlib import Path

from appliance import frontend_assets as fa


def _release(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_release_files_leave_out_html_the_manifest_and_links(tmp_path: Path) -> None:
    r = _release(
        tmp_path / "r",
        {
            "index.html": "i",
            "pricing/index.html": "p",
            "aipbx-release.toml": "m",
            "main.1a2b.js": "m",
            "css/main.3c4d.css": "c",
            "412.5e6f.js": "c",
        },
    )
    os.symlink("main.1a2b.js", r / "alias.js")
    os.symlink("/etc", r / "etc")
    assert fa.release_files(r) == ["412.5e6f.js", "main.1a2b.js", "css/main.3c4d.css"]


def test_the_newest_release_wins_a_shared_path() -> None:
    new, old = fa.Source("n", Path("/r/n")), fa.Source("o", Path("/r/o"))
    links = fa.plan([(new, ["a.js", "favicon.ico"]), (old, ["b.js", "favicon.ico"])])
    assert links == {
        "a.js": Path("/r/n/a.js"),
        "favicon.ico": Path("/r/n/favicon.ico"),
        "b.js": Path("/r/o/b.js"),
    }


def test_rebuild_switches_the_link_and_removes_earlier_trees(tmp_path: Path) -> None:
    front = tmp_path / "frontend"
    n = _release(tmp_path / "releases/n", {"index.html": "n", "1.aaaa.js": "n1", "css/m.css": "n"})
    o = _release(tmp_path / "releases/o", {"index.html": "o", "1.bbbb.js": "o1"})
    assert fa.rebuild(front, [fa.Source("n", n), fa.Source("o", o)]) == 3
    assets = front / fa.LINK
    assert (assets / "1.bbbb.js").read_text() == "o1"
    assert (assets / "css/m.css").read_text() == "n"
    assert not (assets / "index.html").exists()
    first = os.readlink(assets)
    # o is collected: its files leave; the earlier tree is gone, only one remains
    assert fa.rebuild(front, [fa.Source("n", n)]) == 2
    assert not (assets / "1.bbbb.js").exists() and (assets / "1.aaaa.js").exists()
    assert os.readlink(assets) != first
    assert sorted(p.name for p in front.iterdir()) == [os.readlink(assets), "assets"]
    # nothing earlier: an empty tree, still a directory nginx can look in
    assert fa.rebuild(front, []) == 0 and assets.is_dir()


def test_a_tree_left_by_a_crash_is_removed_at_the_next_rebuild(tmp_path: Path) -> None:
    front = tmp_path / "frontend"
    (front / ".assets-7/x").mkdir(parents=True)
    fa.rebuild(front, [])
    assert sorted(p.name for p in front.iterdir()) == [".assets-0", "assets"]
