"""Shared directories (appliance.shared): what a release ships into them, what the app
wrote, ownership, and links root must never follow. Runs as root (ownership is checked
with a scratch uid that no user has)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import cast

import pytest

from appliance import releases, shared
from appliance.errors import AipbxError, UsageError
from appliance.paths import Paths
from appliance.release.manifest import (
    MANIFEST_NAME,
    Kind,
    Manifest,
    manifest_from_dict,
    render_manifest,
)
from appliance.release.pack import pack
from appliance.release.unpack import unpack
from appliance.shared import ABSENT, OTHER, Do, Entry, Found, decide

APP = (54321, 54322)  # the scratch uid/gid standing for _aipbx
DIRS = ("static", "tts_voices")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(version: str, dirs: tuple[str, ...] = DIRS) -> Manifest:
    return Manifest(
        name="app", version=version, kind=Kind.BACKEND, command=("x",), shared_dirs=dirs
    )


def _release(
    paths: Paths, version: str, files: dict[str, bytes], dirs: tuple[str, ...] = DIRS
) -> tuple[Path, Manifest]:
    """An installed (unpacked, linked) release shipping `files` (paths from the top)."""
    path = paths.releases / f"app-{version}"
    path.mkdir(parents=True)
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    m = _manifest(version, dirs)
    (path / MANIFEST_NAME).write_text(render_manifest(m))
    releases.link_shared(paths, path, m)
    return path, m


def _ship(paths: Paths, rel: tuple[Path, Manifest]) -> shared.Report:
    return shared.ship(paths, rel[0], rel[1], owner=APP)


def _record(paths: Paths) -> dict[str, dict[str, dict[str, str]]]:
    data = json.loads((paths.shared / "app" / shared.RECORD_NAME).read_text())
    assert data["format"] == 1
    return dict(data["dirs"])


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(root=tmp_path)


# --- the decision, pure ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recorded", "found", "do"),
    [
        (None, ABSENT, Do.SHIP),
        ("a", ABSENT, Do.SHIP),  # deleted since: the release needs its file
        ("a", Found("file", "new"), Do.SAME),
        ("a", Found("file", "a"), Do.REPLACE),  # unchanged since a release shipped it
        ("a", Found("file", "app"), Do.KEEP),  # the app changed it
        (None, Found("file", "old"), Do.KEEP),  # there before any record
        ("a", OTHER, Do.BLOCKED),  # a directory or a symlink: never written through
    ],
)
def test_decide(recorded: str | None, found: Found, do: Do) -> None:
    assert decide("new", recorded, found) is do


def test_the_record_of_a_kept_file_stays_what_was_shipped() -> None:
    old = Entry("a", "app-1")
    assert shared.recorded_after(old, Do.KEEP, "b", "app-2") == old
    assert shared.recorded_after(None, Do.KEEP, "b", "app-2") is None
    assert shared.recorded_after(old, Do.REPLACE, "b", "app-2") == Entry("b", "app-2")
    record = {"static": {"x": Entry("a", "app-1")}}
    assert shared.parse_record(shared.render_record(record)) == record
    with pytest.raises(ValueError):
        shared.parse_record('{"format": 99}')


# --- link ----------------------------------------------------------------------------------


def test_link_keeps_what_the_release_ships_aside_and_links_the_shared_dir(paths: Paths) -> None:
    path, m = _release(paths, "1", {"static/fonts/a.ttf": b"font", "dist/main.js": b"js"})
    target = paths.shared / "app" / "static"
    assert os.readlink(path / "static") == str(target)
    assert os.readlink(path / "tts_voices") == str(paths.shared / "app" / "tts_voices")
    assert (path / shared.STORE / "static/fonts/a.ttf").read_bytes() == b"font"
    releases.link_shared(paths, path, m)  # again (install, then each start): no change
    assert (path / shared.STORE / "static/fonts/a.ttf").read_bytes() == b"font"


def test_link_refuses_a_shared_dir_that_is_a_file_or_a_foreign_link(paths: Paths) -> None:
    path, m = _release(paths, "1", {"static": b"a file"}, dirs=("tts_voices",))
    with pytest.raises(UsageError, match="static is a file"):
        releases.link_shared(paths, path, _manifest("1", ("static",)))
    (path / "dist").mkdir()
    (path / "pub").symlink_to("dist")
    with pytest.raises(UsageError, match="pub is a symlink in the release"):
        releases.link_shared(paths, path, _manifest("1", ("pub",)))
    assert m.shared_dirs == ("tts_voices",)


def test_a_frontend_has_no_shared_dirs(paths: Paths) -> None:
    path = paths.releases / "spa-1"
    (path / "static").mkdir(parents=True)
    m = Manifest(name="spa", version="1", kind=Kind.FRONTEND)
    assert shared.ship(paths, path, m, owner=APP).summary() == "nothing shipped"
    assert (path / "static").is_dir() and not (path / "static").is_symlink()
    assert not paths.shared.exists()


# --- ship ----------------------------------------------------------------------------------


@needs_root
def test_ship_new_files_and_dirs_as_the_apps(paths: Paths) -> None:
    rel = _release(
        paths,
        "1",
        {"static/fonts/a.ttf": b"font", "static/stamp.jpg": b"jpg", "static/org-documents/.k": b""},
    )
    os.unlink(rel[0] / shared.STORE / "static/org-documents/.k")  # an empty dir shipped
    os.chmod(rel[0] / shared.STORE / "static/fonts/a.ttf", 0o755)
    report = _ship(paths, rel)
    assert report.counts[Do.SHIP] == 2 and not report.warnings
    s = paths.shared / "app" / "static"
    assert (s / "fonts/a.ttf").read_bytes() == b"font"
    for p in (s, s / "fonts", s / "org-documents", paths.shared / "app" / "tts_voices"):
        st = p.lstat()
        assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) == APP, p
    for p, mode in ((s / "fonts/a.ttf", 0o750), (s / "stamp.jpg", 0o640)):
        st = p.lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*APP, mode), p
    # the dirs above are root's: the app passes through, cannot rename or plant links
    for p in (paths.shared, paths.shared / "app"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, APP[1], 0o750), p
    record_file = paths.shared / "app" / shared.RECORD_NAME
    assert (record_file.stat().st_uid, stat.S_IMODE(record_file.stat().st_mode)) == (0, 0o600)
    assert _record(paths)["static"]["fonts/a.ttf"] == {"sha256": _sha(b"font"), "release": "app-1"}
    assert not [n for n in os.listdir(s) if n.startswith(".aipbx-ship")]  # no temp file left


@needs_root
def test_next_release_replaces_unchanged_files_keeps_the_apps_and_rollback_reships(
    paths: Paths,
) -> None:
    v1 = _release(paths, "1", {"static/w.js": b"w1", "static/edited.css": b"c1"})
    _ship(paths, v1)
    s = paths.shared / "app" / "static"
    (s / "upload.jpg").write_bytes(b"the app's upload")  # the app writes
    (s / "edited.css").write_bytes(b"the app's edit")  # the app changes a shipped file
    v2 = _release(
        paths, "2", {"static/w.js": b"w2", "static/edited.css": b"c2", "static/new.txt": b"n"}
    )
    report = _ship(paths, v2)
    assert (s / "w.js").read_bytes() == b"w2"
    assert (s / "edited.css").read_bytes() == b"the app's edit"
    assert (s / "upload.jpg").read_bytes() == b"the app's upload"
    assert (report.counts[Do.REPLACE], report.counts[Do.KEEP], report.counts[Do.SHIP]) == (1, 1, 1)
    assert len(report.warnings) == 1 and "static/edited.css" in report.warnings[0]
    assert "app-1 shipped it" in report.warnings[0]
    assert (s / "w.js").stat().st_uid == APP[0]

    _ship(paths, v1)  # rollback to 1: its files go back, what only 2 shipped stays
    assert (s / "w.js").read_bytes() == b"w1"
    assert (s / "new.txt").read_bytes() == b"n"
    assert (s / "edited.css").read_bytes() == b"the app's edit"
    assert (s / "upload.jpg").read_bytes() == b"the app's upload"
    rec = _record(paths)["static"]
    assert rec["w.js"] == {"sha256": _sha(b"w1"), "release": "app-1"}
    assert rec["new.txt"]["release"] == "app-2"  # still "shipped, unchanged" for a later 2
    assert rec["edited.css"] == {"sha256": _sha(b"c1"), "release": "app-1"}
    _ship(paths, v2)
    assert (s / "new.txt").read_bytes() == b"n" and (s / "w.js").read_bytes() == b"w2"


@needs_root
def test_an_unrecorded_file_that_differs_is_kept(paths: Paths) -> None:
    s = paths.shared / "app" / "static"
    s.mkdir(parents=True)
    (s / "w.js").write_bytes(b"seeded once by an older appliance")
    (s / "same.js").write_bytes(b"same")
    report = _ship(paths, _release(paths, "1", {"static/w.js": b"w1", "static/same.js": b"same"}))
    assert (s / "w.js").read_bytes() == b"seeded once by an older appliance"
    assert report.counts[Do.KEEP] == 1 and report.counts[Do.SAME] == 1
    assert "before any release's copy was recorded" in report.warnings[0]
    assert set(_record(paths)["static"]) == {"same.js"}


@needs_root
def test_a_symlink_planted_in_the_shared_dir_is_not_followed(paths: Paths, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"root's")
    (outside / "dir").mkdir()
    s = paths.shared / "app" / "static"
    s.mkdir(parents=True)
    os.chown(s, *APP)
    (s / "w.js").symlink_to(outside / "passwd")  # where a shipped file goes
    (s / "fonts").symlink_to(outside / "dir")  # where a shipped dir goes
    (s / "link").symlink_to(outside)  # anywhere
    os.lchown(s / "link", 0, 0)  # root-owned: given to the app, the target is not
    rel = _release(paths, "1", {"static/w.js": b"w1", "static/fonts/a.ttf": b"font"})
    report = _ship(paths, rel)

    assert (outside / "passwd").read_bytes() == b"root's"
    assert os.listdir(outside / "dir") == []
    for p in (outside, outside / "passwd", outside / "dir"):
        assert p.stat().st_uid == 0, p
    # the app's links are the app's: left as they are, the release's files not shipped there
    assert (s / "w.js").is_symlink() and (s / "fonts").is_symlink()
    assert report.counts[Do.BLOCKED] == 2 and report.counts.total() == 2
    assert len(report.warnings) == 2
    assert report.warnings[0].startswith("static/fonts: a symlink or not a directory")
    assert report.warnings[1].startswith("static/w.js: not a regular file")
    assert (s / "link").lstat().st_uid == APP[0]


@needs_root
def test_a_hardlinked_root_file_is_not_given_to_the_app(paths: Paths, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    s = paths.shared / "app" / "static"
    s.mkdir(parents=True)
    os.link(secret, s / "h")
    report = _ship(paths, _release(paths, "1", {}))
    assert secret.stat().st_uid == 0 and any("2 links" in w for w in report.warnings)


@pytest.mark.parametrize("where", ["static", "app"])
def test_a_shared_dir_that_is_a_symlink_is_refused(
    paths: Paths, tmp_path: Path, where: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    top = paths.shared / "app"
    if where == "static":
        top.mkdir(parents=True)
        (top / "static").symlink_to(outside)
        refused = top / "static"
    else:
        paths.shared.mkdir(parents=True)
        top.symlink_to(outside)
        refused = top
    rel = _release(paths, "1", {"static/w.js": b"w1"})
    with pytest.raises(AipbxError, match=f"{refused}: a symlink or not a directory"):
        _ship(paths, rel)
    assert os.listdir(outside) == [] and outside.stat().st_uid == 0


@needs_root
def test_a_nested_shared_dir_goes_through_no_link(paths: Paths, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    top = paths.shared / "app"
    top.mkdir(parents=True)
    (top / "public").symlink_to(outside)
    rel = _release(paths, "1", {"public/uploads/a": b"a"}, dirs=("public/uploads",))
    with pytest.raises(AipbxError, match="public: a symlink or not a directory"):
        _ship(paths, rel)
    assert os.listdir(outside) == []
    (top / "public").unlink()
    _ship(paths, rel)
    st = (top / "public").lstat()
    assert (st.st_uid, st.st_gid) == (0, APP[1])  # root's: the app cannot swap it for a link
    assert (top / "public/uploads").lstat().st_uid == APP[0]
    assert (top / "public/uploads/a").read_bytes() == b"a"


@needs_root
def test_an_existing_install_is_given_to_the_app(paths: Paths) -> None:
    """What the old appliance left: shared/ owned by the app, subdirs it seeded as root."""
    paths.shared.mkdir(parents=True)
    os.chown(paths.shared, *APP)
    s = paths.shared / "app" / "static"
    (s / "org-documents").mkdir(parents=True)
    (s / "invoice.jpg").write_bytes(b"jpg")
    os.chown(s, *APP)
    old = paths.releases / "app-0"  # installed by the old appliance: linked, nothing aside
    old.mkdir(parents=True)
    (old / "static").symlink_to(s)
    report = shared.ship(paths, old, _manifest("0", ("static",)), owner=APP)
    assert report.given == 2 and report.counts.total() == 0
    for p in (s / "org-documents", s / "invoice.jpg"):
        assert (p.stat().st_uid, p.stat().st_gid) == APP, p
    assert (paths.shared.stat().st_uid, paths.shared.stat().st_gid) == (0, APP[1])
    assert (paths.shared / "app").stat().st_uid == 0


def test_an_unreadable_record_keeps_every_differing_file(paths: Paths) -> None:
    rel = _release(paths, "1", {"static/w.js": b"w1"})
    _ship(paths, rel)
    (paths.shared / "app" / shared.RECORD_NAME).write_text("{not json")
    (paths.shared / "app/static/w.js").write_bytes(b"changed")
    report = _ship(paths, rel)
    assert (paths.shared / "app/static/w.js").read_bytes() == b"changed"
    assert any("unreadable" in w for w in report.warnings)


# --- manifest and pack ---------------------------------------------------------------------


def _with_dirs(dirs: object) -> dict[str, object]:
    return {"name": "a", "version": "1", "kind": "backend", "command": ["x"], "shared_dirs": dirs}


@pytest.mark.parametrize(
    ("dirs", "error"),
    [
        (["static", "static/org-documents"], "'static/org-documents' is inside 'static'"),
        (["public/a", "public"], "'public/a' is inside 'public'"),
        ([".aipbx-shipped"], "is the appliance's name"),
        ([".aipbx-shipped.json/x"], "is the appliance's name"),
        (["../x"], "must stay inside"),
        (["a", "a/"], "lists a directory twice"),
    ],
)
def test_manifest_refuses_bad_shared_dirs(dirs: list[str], error: str) -> None:
    with pytest.raises(UsageError, match=error):
        manifest_from_dict(_with_dirs(dirs))


def test_manifest_shared_dirs_default_and_sibling_prefixes() -> None:
    m = manifest_from_dict({"name": "a", "version": "1", "kind": "backend", "command": ["x"]})
    assert m.shared_dirs == ("static", "public")
    assert manifest_from_dict(_with_dirs(["st", "static"])).shared_dirs == ("st", "static")
    assert manifest_from_dict(_with_dirs([])).shared_dirs == ()


def test_pack_shared_dir_option(tmp_path: Path) -> None:
    from appliance.actions.rollout import release_pack
    from appliance.cli import parser

    src = tmp_path / "app"
    (src / "static/fonts").mkdir(parents=True)
    (src / "static/fonts/a.ttf").write_bytes(b"font")
    (src / "public").mkdir()
    (src / "public/w.js").write_bytes(b"w")
    argv = ["release", "pack", str(src), "--name", "app", "--version", "1", "--command", "x"]
    argv += ["--shared-dir", "static", "--shared-dir", "tts_voices", "-o", str(tmp_path)]
    artifact = release_pack(vars(parser().parse_args(argv)))
    paths = Paths(root=tmp_path / "root")
    path = unpack(artifact, paths.releases, max_bytes=1 << 20)
    m = releases.get(paths, path.name).manifest
    assert m.shared_dirs == ("static", "tts_voices")
    releases.link_shared(paths, path, m)
    assert (path / "public/w.js").read_bytes() == b"w"  # the release's own, not shared
    assert (path / "static").is_symlink() and (path / "tts_voices").is_symlink()
    assert (path / shared.STORE / "static/fonts/a.ttf").read_bytes() == b"font"

    (src / "tts_voices").symlink_to("static")
    with pytest.raises(UsageError, match="shared dir 'tts_voices' is not a directory"):
        pack(src, tmp_path, name="app", version="2", command=["x"], shared_dirs=DIRS)


# --- when: before a color starts, and back when a release is refused ----------------------


class _Units:
    """Services that records restarts and what the shared dir held at that moment."""

    def __init__(self, shared_file: Path) -> None:
        self.shared_file = shared_file
        self.seen: list[bytes] = []
        self.active = False

    def is_active(self, unit: str) -> bool:
        return self.active

    def restart(self, unit: str) -> None:
        self.seen.append(self.shared_file.read_bytes())

    def state(self, unit: str) -> object:
        from appliance.services import UnitState

        return UnitState(unit, "active", "running", "enabled", "", 1)

    def __getattr__(self, name: str) -> object:
        return lambda *a, **k: None  # stop, reset_failed, enable, ...


@needs_root
def test_a_color_starts_with_its_release_files_and_a_refused_one_gives_them_back(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import config, health, state, upgrade
    from appliance.colors import Color
    from appliance.services import Services

    monkeypatch.setattr(shared, "service_owner", lambda: APP)
    monkeypatch.setattr(upgrade, "forget_flows", lambda cfg, color: "")
    healthy = [True]
    monkeypatch.setattr(health, "wait_healthy", lambda *a, **k: (healthy[0], "probe"))
    v1 = _release(paths, "1", {"static/w.js": b"w1"})
    v2 = _release(paths, "2", {"static/w.js": b"w2"})
    w = paths.shared / "app/static/w.js"
    units = _Units(w)
    lines: list[str] = []
    services = cast(Services, units)
    ctx = upgrade.Ctx(paths, config.Config(), services, upgrade.Timeline(out=lines.append))
    (paths.colors).mkdir(parents=True)
    opts = upgrade.Options(probation_s=0, drain_s=0)

    upgrade._start_and_gate(ctx, Color.BLUE, releases.get(paths, v1[0].name), opts)
    assert units.seen == [b"w1"]
    state.save(paths.state, ctx.load().with_(live_color=Color.BLUE))
    healthy[0] = False
    with pytest.raises(upgrade.UpgradeFailed):
        upgrade._start_and_gate(ctx, Color.GREEN, releases.get(paths, v2[0].name), opts)
    assert units.seen == [b"w1", b"w2"]  # it started with its own
    assert w.read_bytes() == b"w1"  # refused: the live release's are back
    assert [s["step"] for s in ctx.tl.steps].count("shared") == 3


@needs_root
def test_an_instant_rollback_puts_the_older_files_back_before_the_switch(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import config, state, upgrade
    from appliance.colors import Color
    from appliance.services import Services

    monkeypatch.setattr(shared, "service_owner", lambda: APP)
    v1 = _release(paths, "1", {"static/w.js": b"w1"})
    v2 = _release(paths, "2", {"static/w.js": b"w2"})
    _ship(paths, v1)
    _ship(paths, v2)
    w = paths.shared / "app/static/w.js"
    at_switch: list[bytes] = []

    def switch_to(ctx: upgrade.Ctx, color: Color | None, *, why: str, **_: object) -> float:
        at_switch.append(w.read_bytes())
        return 1.0

    monkeypatch.setattr(upgrade, "_switch_to", switch_to)
    units = _Units(w)
    units.active = True
    ctx = upgrade.Ctx(paths, config.Config(), cast(Services, units), upgrade.Timeline(out=print))
    st = state.State(
        live_color=Color.GREEN,
        previous_color=Color.BLUE,
        colors={"blue": v1[0].name, "green": v2[0].name},
    )
    state.save(paths.state, st)
    figures = upgrade.rollback(ctx, None, upgrade.Options(probation_s=0, drain_s=0))
    assert figures["instant"] is True and at_switch == [b"w1"]


@needs_root
def test_setup_gives_the_running_releases_shared_dirs_to_the_app(paths: Paths) -> None:
    from appliance import state

    assert shared.repair_in_use(paths, owner=APP) == []  # nothing deployed
    rel = _release(paths, "1", {"static/w.js": b"w1"})
    s = paths.shared / "app" / "static"
    (s / "org-documents").mkdir(parents=True)  # seeded as root by an older appliance
    state.save(paths.state, state.State(colors={"blue": rel[0].name}))
    assert shared.repair_in_use(paths, owner=APP) == [
        "gave 2 root-owned entries in the shared dirs of app-1 to _aipbx"
    ]
    assert (s / "org-documents").stat().st_uid == APP[0]
    assert not (s / "w.js").exists()  # a repair ships nothing
    assert shared.repair_in_use(paths, owner=APP) == []  # a second run changes nothing
