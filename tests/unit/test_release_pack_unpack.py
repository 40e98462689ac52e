from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

import pytest

from appliance.errors import UsageError
from appliance.release import tree as tree_mod
from appliance.release.checksum import checksum_line, parse_checksum, sha256_file, verify
from appliance.release.manifest import MANIFEST_NAME, Kind, load_manifest
from appliance.release.pack import pack
from appliance.release.tree import release_mode
from appliance.release.unpack import unpack

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
GOOD_MANIFEST = b'name = "evil"\nversion = "1.0"\nkind = "backend"\ncommand = ["node", "x.js"]\n'


def _build_tree(src: Path) -> None:
    (src / "dist").mkdir(parents=True)
    (src / "dist/main.js").write_text("console.log('aipbx')\n")
    (src / "dist/secret.json").write_text("{}")
    os.chmod(src / "dist/secret.json", 0o600)
    bin_dir = src / "node_modules/.bin"
    bin_dir.mkdir(parents=True)
    (src / "node_modules/pkg/bin").mkdir(parents=True)
    (src / "node_modules/pkg/bin/cli.js").write_text("#!/usr/bin/env node\n")
    os.chmod(src / "node_modules/pkg/bin/cli.js", 0o4755)  # setuid: must not survive
    (bin_dir / "cli").symlink_to("../pkg/bin/cli.js")
    (src / "node_modules/pkg/self").symlink_to(".")
    (src / "empty").mkdir()
    (src / "data.bin").write_bytes(bytes(range(256)) * 4096)


def _pack(src: Path, out: Path) -> Path:
    return pack(src, out, name="aipbx-backend", version="1.2.3", command=["node", "dist/main.js"])


def test_round_trip_keeps_contents_modes_and_links(tmp_path: Path) -> None:
    src, out, releases = tmp_path / "src", tmp_path / "out", tmp_path / "releases"
    _build_tree(src)
    artifact = _pack(src, out)
    assert artifact == out / "aipbx-backend-1.2.3.tar.gz"
    assert sorted(os.listdir(out)) == [artifact.name, f"{artifact.name}.sha256"]
    digest = verify(artifact)
    assert (out / f"{artifact.name}.sha256").read_text() == f"{digest}  {artifact.name}\n"
    assert subprocess.run(["sha256sum", "-c", f"{artifact.name}.sha256"], cwd=out).returncode == 0

    with tarfile.open(artifact) as tar:
        members = tar.getmembers()
    assert members[0].name == MANIFEST_NAME
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "root", "root")}
    assert not any(m.mode & 0o7000 for m in members)

    dest = unpack(artifact, releases, max_bytes=100 * MB)
    assert dest == releases / "aipbx-backend-1.2.3"
    assert os.listdir(releases) == ["aipbx-backend-1.2.3"]
    m = load_manifest(dest / MANIFEST_NAME)
    assert (m.name, m.version, m.kind, m.command) == (
        "aipbx-backend",
        "1.2.3",
        Kind.BACKEND,
        ("node", "dist/main.js"),
    )
    for rel in ("dist/main.js", "data.bin", "node_modules/pkg/bin/cli.js"):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
    assert (dest / "empty").is_dir()
    assert os.readlink(dest / "node_modules/.bin/cli") == "../pkg/bin/cli.js"
    assert os.readlink(dest / "node_modules/pkg/self") == "."

    def mode(rel: str) -> int:
        return stat.S_IMODE(os.lstat(dest / rel).st_mode)

    assert mode("dist/main.js") == 0o644
    assert mode("dist/secret.json") == 0o644  # readable by the service user
    assert mode("node_modules/pkg/bin/cli.js") == 0o755  # exec kept, setuid gone
    assert mode(".") == mode("dist") == 0o755
    assert int((dest / "data.bin").stat().st_mtime) == int((src / "data.bin").stat().st_mtime)


def test_pack_uses_own_manifest_with_overrides(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / MANIFEST_NAME).write_text(
        'name = "app"\nversion = "1.0"\nkind = "backend"\ncommand = ["node", "a.js"]\n'
        'shared_dirs = ["static"]\n[env]\nA = "b"\n'
    )
    artifact = pack(src, tmp_path / "out", version="1.1")
    assert artifact.name == "app-1.1.tar.gz"
    dest = unpack(artifact, tmp_path / "rel", max_bytes=MB)
    m = load_manifest(dest / MANIFEST_NAME)
    assert (m.version, m.shared_dirs, m.env) == ("1.1", ("static",), (("A", "b"),))
    with tarfile.open(artifact) as tar:
        assert [n for n in tar.getnames() if n == MANIFEST_NAME] == [MANIFEST_NAME]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda s: (s / "l").symlink_to("/etc/passwd"), "symlink to '/etc/passwd' leaves"),
        (lambda s: (s / "l").symlink_to("../outside"), "symlink to '../outside' leaves"),
        (lambda s: os.mkfifo(s / "f"), "f: is a fifo"),
    ],
)
def test_pack_refuses_and_leaves_nothing(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "a.js").write_text("x")
    make(src)
    with pytest.raises(UsageError, match=message):
        _pack(src, out)
    assert os.listdir(out) == []


def test_pack_refuses_output_inside_source_and_no_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is inside"):
        _pack(tmp_path, tmp_path / "out")
    with pytest.raises(UsageError, match="no aipbx-release.toml"):
        pack(tmp_path, tmp_path.parent / "x-out", version="1")


def test_verify_refuses_wrong_or_missing_checksum(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    artifact = _pack(tmp_path / "src", tmp_path / "out")
    sums = artifact.with_name(artifact.name + ".sha256")
    actual = sha256_file(artifact)
    sums.write_text(checksum_line("0" * 64, artifact.name))
    with pytest.raises(UsageError, match=f"checksum mismatch: expected {'0' * 64}, got {actual}"):
        verify(artifact)
    sums.unlink()
    with pytest.raises(UsageError, match=f"checksum mismatch: expected nothing.*got {actual}"):
        verify(artifact)
    sums.write_text(checksum_line(actual, "other.tar.gz"))
    with pytest.raises(UsageError, match="checksum mismatch"):
        verify(artifact)


def test_parse_checksum() -> None:
    h = "ab" * 32
    assert parse_checksum(f"{h}  a.tar.gz\n", "a.tar.gz") == h
    assert parse_checksum(f"{h.upper()} *a.tar.gz\n", "a.tar.gz") == h
    assert parse_checksum(f"{h}\n", "a.tar.gz") == h
    assert parse_checksum("", "a.tar.gz") is None
    assert parse_checksum("xyz  a.tar.gz", "a.tar.gz") is None


def test_verify_signature(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    artifact = _pack(tmp_path / "src", tmp_path / "out")
    key, pub, sig = tmp_path / "k.pem", tmp_path / "pub.pem", Path(f"{artifact}.sig")

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ossl("genpkey", "-algorithm", "RSA", "-out", str(key))
    ossl("pkey", "-in", str(key), "-pubout", "-out", str(pub))
    assert verify(artifact) == sha256_file(artifact)  # no key: no signature needed
    with pytest.raises(UsageError, match="signature missing"):
        verify(artifact, key=pub)
    ossl("dgst", "-sha256", "-sign", str(key), "-out", str(sig), str(artifact))
    assert verify(artifact, key=pub) == sha256_file(artifact)
    sig.write_bytes(bytes(len(sig.read_bytes())))
    with pytest.raises(UsageError, match="signature verification failed"):
        verify(artifact, key=pub)


class Zeros(io.RawIOBase):
    """`size` zero bytes, never more than one read's worth in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


Member = tuple[tarfile.TarInfo, "io.RawIOBase | bytes | None"]


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, *, size: int = 0, link: str = ""
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mode = kind, size, link, 0o644
    return ti


def _evil(path: Path, members: list[Member], manifest: bytes | None = GOOD_MANIFEST) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        if manifest is not None:
            tar.addfile(_info(MANIFEST_NAME, size=len(manifest)), io.BytesIO(manifest))
        for ti, data in members:
            if isinstance(data, bytes):
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti, cast(IO[bytes] | None, data))
    return path


def _file(name: str, data: bytes = b"x") -> Member:
    return _info(name), data


EVIL: dict[str, tuple[list[Member], bytes | None, str]] = {
    "absolute": ([_file("/etc/cron.d/x")], GOOD_MANIFEST, "/etc/cron.d/x: absolute path refused"),
    "dotdot": ([_file("a/../../x")], GOOD_MANIFEST, "'..' in a member path refused"),
    "link-absolute": (
        [(_info("l", tarfile.SYMTYPE, link="/etc/passwd"), None)],
        GOOD_MANIFEST,
        "l: symlink to '/etc/passwd' leaves the release refused",
    ),
    "link-relative": (
        [(_info("a/b/l", tarfile.SYMTYPE, link="../../../x"), None)],
        GOOD_MANIFEST,
        "a/b/l: symlink to '../../../x' leaves the release refused",
    ),
    "link-chain": (
        [
            (_info("up", tarfile.SYMTYPE, link="."), None),
            (_info("out", tarfile.SYMTYPE, link="up/.."), None),
        ],
        GOOD_MANIFEST,
        "out: symlink resolves outside the release",
    ),
    "write-through-link": (
        [(_info("d", tarfile.SYMTYPE, link="."), None), _file("d/x")],
        GOOD_MANIFEST,
        "d: path goes through a symlink",
    ),
    "hardlink-out": (
        [(_info("h", tarfile.LNKTYPE, link="../../etc/shadow"), None)],
        GOOD_MANIFEST,
        "h: hardlink to '../../etc/shadow' leaves the release refused",
    ),
    "hardlink-absolute": (
        [(_info("h", tarfile.LNKTYPE, link="/etc/shadow"), None)],
        GOOD_MANIFEST,
        "h: hardlink to '/etc/shadow' leaves the release refused",
    ),
    "hardlink-through-link": (
        [
            (_info("d", tarfile.SYMTYPE, link="."), None),
            (_info("h", tarfile.LNKTYPE, link="d/x"), None),
        ],
        GOOD_MANIFEST,
        "d: path goes through a symlink",
    ),
    "hardlink-missing": (
        [(_info("h", tarfile.LNKTYPE, link="nothere"), None)],
        GOOD_MANIFEST,
        "hardlink target nothere is not an earlier file",
    ),
    "chardev": ([(_info("dev", tarfile.CHRTYPE), None)], GOOD_MANIFEST, "device node refused"),
    "blockdev": ([(_info("sda", tarfile.BLKTYPE), None)], GOOD_MANIFEST, "device node refused"),
    "fifo": ([(_info("p", tarfile.FIFOTYPE), None)], GOOD_MANIFEST, "p: fifo refused"),
    "duplicate": ([_file("x"), _file("x")], GOOD_MANIFEST, "x: duplicate member"),
    "duplicate-manifest": ([_file(MANIFEST_NAME)], GOOD_MANIFEST, "duplicate member"),
    "no-manifest": ([_file("x")], None, "no aipbx-release.toml at its top"),
    "bad-toml": ([], b"name = ", "aipbx-release.toml: not valid TOML"),
    "unknown-kind": (
        [],
        GOOD_MANIFEST.replace(b'"backend"', b'"daemon"'),
        "kind: 'daemon' is unknown",
    ),
    "size-bomb": (
        [(_info("zeros", size=50 * MB), Zeros(50 * MB))],
        GOOD_MANIFEST,
        f"unpacks to more than {10 * MB} bytes",
    ),
    "too-many": ([_file(f"f{i}") for i in range(30)], GOOD_MANIFEST, "more than 20 members"),
}


@pytest.mark.parametrize("case", sorted(EVIL))
def test_unpack_refuses_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    members, manifest, message = EVIL[case]
    artifact = _evil(tmp_path / "evil.tar.gz", members, manifest)
    releases = tmp_path / "releases"
    with pytest.raises(UsageError) as e:
        unpack(artifact, releases, max_bytes=10 * MB, max_files=20)
    assert message in e.value.message
    assert os.listdir(releases) == []


def test_unpack_refuses_garbage_and_truncated(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    (tmp_path / "junk.tar.gz").write_bytes(b"not gzip at all" * 100)
    with pytest.raises(UsageError, match="not a valid .tar.gz"):
        unpack(tmp_path / "junk.tar.gz", releases, max_bytes=MB)
    good = _evil(tmp_path / "good.tar.gz", [_file("big", os.urandom(200_000))])
    (tmp_path / "cut.tar.gz").write_bytes(good.read_bytes()[:50_000])
    with pytest.raises(UsageError, match="not a valid .tar.gz"):
        unpack(tmp_path / "cut.tar.gz", releases, max_bytes=MB)
    assert os.listdir(releases) == []


def test_unpack_keeps_a_hardlink_inside(tmp_path: Path) -> None:
    members: list[Member] = [
        _file("dir/a", b"payload"),
        (_info("b", tarfile.LNKTYPE, link="dir/a"), None),
    ]
    dest = unpack(_evil(tmp_path / "a.tar.gz", members), tmp_path / "rel", max_bytes=MB)
    assert (dest / "b").read_bytes() == b"payload"
    assert (dest / "b").stat().st_ino == (dest / "dir/a").stat().st_ino


def test_unpack_refuses_already_installed(tmp_path: Path) -> None:
    artifact = _evil(tmp_path / "a.tar.gz", [_file("x")])
    releases = tmp_path / "releases"
    unpack(artifact, releases, max_bytes=MB)
    with pytest.raises(UsageError, match="evil-1.0: already installed"):
        unpack(artifact, releases, max_bytes=MB)
    assert os.listdir(releases) == ["evil-1.0"]


def test_unpack_cleans_up_on_keyboard_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = _evil(tmp_path / "a.tar.gz", [_file("x")])

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(tree_mod.Tree, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unpack(artifact, tmp_path / "releases", max_bytes=MB)
    assert os.listdir(tmp_path / "releases") == []


def test_release_mode() -> None:
    assert [release_mode(m) for m in (0o600, 0o644, 0o700, 0o4755, 0o711)] == [
        0o644,
        0o644,
        0o755,
        0o755,
        0o755,
    ]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from appliance.release.checksum import verify
    from appliance.release.pack import pack
    from appliance.release.unpack import unpack

    work = Path(sys.argv[1])
    src = work / "src"
    src.mkdir()
    chunk = bytes(1 << 20)
    with open(src / "big.bin", "wb") as f:
        for _ in range(200):
            f.write(chunk)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    artifact = pack(src, work / "out", name="big", version="1", command=["x"])
    verify(artifact)
    dest = unpack(artifact, work / "releases", max_bytes=300 << 20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kb": base, "peak_kb": peak, "size": (dest / "big.bin").stat().st_size}))
    """
)


def test_pack_and_unpack_stream_without_holding_the_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert result["size"] == 200 * MB
    grown = (result["peak_kb"] - result["base_kb"]) * 1024
    assert grown < 100 * MB, f"peak RSS grew by {grown // MB} MB"
    print(f"peak RSS grew by {grown / MB:.1f} MB")
