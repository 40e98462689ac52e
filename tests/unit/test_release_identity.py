"""The same name and version, other content (issue 11, item 7): an installed release is
reused only for the artifact it came from; another one is refused (exit 2) and the
installed tree is left as it is."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from appliance import config, releases
from appliance.errors import ExitCode, UsageError
from appliance.paths import Paths
from appliance.release import unpack as unpack_mod
from appliance.release.checksum import verify
from appliance.release.pack import pack
from appliance.release.unpack import RECORD_NAME, recorded_sha256

CFG = config.parse("")


def _build(tmp_path: Path, body: str, name: str = "src") -> Path:
    src = tmp_path / name
    (src / "dist").mkdir(parents=True)
    (src / "dist" / "main.js").write_text(body)
    return src


def _pack(src: Path, out: Path, command: str = "node dist/main.js") -> Path:
    return pack(src, out, name="app", version="1.0.0", command=command.split())


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "root")


def test_the_same_artifact_again_reuses_the_release(
    paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = _pack(_build(tmp_path, "v1"), tmp_path / "out")
    rel = releases.install(paths, CFG, artifact)
    assert recorded_sha256(rel.path) == verify(artifact)
    record = json.loads((rel.path / RECORD_NAME).read_text())
    assert record["artifact"] == artifact.name
    assert (rel.path / RECORD_NAME).stat().st_mode & 0o777 == 0o644

    def no_unpack(*_: object, **__: object) -> Path:
        raise AssertionError("unpacked again")

    monkeypatch.setattr(releases, "unpack", no_unpack)
    assert releases.install(paths, CFG, artifact).path == rel.path


def test_other_content_with_the_same_name_and_version_is_refused(
    paths: Paths, tmp_path: Path
) -> None:
    first = _pack(_build(tmp_path, "v1"), tmp_path / "out1")
    rel = releases.install(paths, CFG, first)
    other = _pack(_build(tmp_path, "v1, rebuilt", "src2"), tmp_path / "out2")
    with pytest.raises(UsageError) as e:
        releases.install(paths, CFG, other)
    assert e.value.exit_code == ExitCode.USAGE
    assert "app-1.0.0 is already installed" in e.value.message
    assert "same name and version but other content: refused" in e.value.message
    assert "new version" in (e.value.hint or "")
    assert (rel.path / "dist" / "main.js").read_text() == "v1"
    assert recorded_sha256(rel.path) == verify(first)
    assert sorted(p.name for p in paths.releases.iterdir()) == ["app-1.0.0"]


def test_a_release_installed_before_the_record(
    paths: Paths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _pack(_build(tmp_path, "v1"), tmp_path / "out1")
    rel = releases.install(paths, CFG, first)
    (rel.path / RECORD_NAME).unlink()  # as a release unpacked by an older appliance
    # the same manifest (the same build packed again: another sha256): reused, warned
    src2 = _build(tmp_path, "v1", "src2")
    os.utime(src2 / "dist" / "main.js", (1_000_000_000, 1_000_000_000))  # another tar
    again = _pack(src2, tmp_path / "out2")
    assert verify(again) != verify(first)
    with caplog.at_level(logging.WARNING, logger="aipbx.releases"):
        assert releases.install(paths, CFG, again).path == rel.path
    assert "installed before releases recorded their artifact" in caplog.text
    assert recorded_sha256(rel.path) is None  # not blessed: it was not compared file by file
    # another manifest: refused
    other = _pack(_build(tmp_path, "v1", "src3"), tmp_path / "out3", "node other.js")
    with pytest.raises(UsageError, match="with another manifest"):
        releases.install(paths, CFG, other)


@pytest.mark.parametrize(
    ("recorded", "digest", "installed", "text", "verdict"),
    [
        ("a" * 64, "a" * 64, "m", "other m", "same"),
        ("a" * 64, "b" * 64, "m", "m", "other"),
        (None, "b" * 64, "m", "m", "unrecorded-same"),
        (None, "b" * 64, "m", "n", "other"),
        (None, "b" * 64, "", "", "unrecorded-same"),
    ],
)
def test_same_artifact(
    recorded: str | None, digest: str, installed: str, text: str, verdict: str
) -> None:
    assert releases.same_artifact(recorded, digest, installed, text) == verdict


def test_a_copied_release_packs_without_its_record(paths: Paths, tmp_path: Path) -> None:
    """A release copied out of /opt/aipbx/releases and packed again (as the system tests
    do) does not carry the appliance's record into the new artifact."""
    rel = releases.install(paths, CFG, _pack(_build(tmp_path, "v1"), tmp_path / "out"))
    copy = tmp_path / "copy"
    shutil.copytree(rel.path, copy, symlinks=True)
    (copy / "static").unlink()  # the links to the shared dirs, as the system test does
    (copy / "public").unlink()
    assert (copy / RECORD_NAME).is_file()
    again = pack(copy, tmp_path / "out2", name="app", version="2.0.0")
    dest = unpack_mod.unpack(again, tmp_path / "rel", max_bytes=1 << 20)
    assert recorded_sha256(dest) == verify(again)


def test_an_unreadable_record_counts_as_none(tmp_path: Path) -> None:
    (tmp_path / RECORD_NAME).write_text("{not json")
    assert recorded_sha256(tmp_path) is None
    (tmp_path / RECORD_NAME).write_text('{"sha256": "short"}')
    assert recorded_sha256(tmp_path) is None
