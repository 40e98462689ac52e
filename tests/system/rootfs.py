"""The cached Debian 12 rootfs the system tests boot.

`ensure_rootfs()` builds (once) a bookworm rootfs with debootstrap from the host's own
mirror and installs the packages the appliance depends on
(packaging/system-test-packages.txt), so `apt install ./aipbx-appliance_*.deb` works inside
a container that has no network. The cache lives under build/cache, one directory per
package list and recipe; concurrent sessions wait for one builder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.system.harness import HOST_SOURCES, NSPAWN_ENV, HarnessError, harness_problem, log
from tests.system.mounts import remove_tree

SUITE = "bookworm"
BASE_INCLUDE = ("systemd", "systemd-sysv", "dbus", "adduser", "apt")
# Bump when the way the image is built changes, so an old cache is not reused.
RECIPE_VERSION = 1

REPO_TOP = Path(__file__).resolve().parents[2]
PACKAGE_LIST = REPO_TOP / "packaging" / "system-test-packages.txt"

# Timers that only make sense with a network, or that churn the disk during a test.
DISABLED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)


def read_packages(path: Path = PACKAGE_LIST) -> list[str]:
    """Package names, one a line; `#` starts a comment."""
    names: list[str] = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


def parse_deb822(text: str) -> list[dict[str, str]]:
    """Stanzas of a deb822 file; continuation lines are joined with a space."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def debian_mirror(suite: str = SUITE, sources: Path = HOST_SOURCES) -> str:
    """The first URI of the first stanza of the host's sources that serves `suite`."""
    for stanza in parse_deb822(sources.read_text()):
        if suite in stanza.get("suites", "").split() and stanza.get("uris"):
            return stanza["uris"].split()[0]
    raise HarnessError(f"no stanza for suite {suite!r} in {sources}")


def cache_key(packages: list[str], suite: str = SUITE) -> str:
    material = json.dumps(
        {
            "suite": suite,
            "include": BASE_INCLUDE,
            "packages": sorted(set(packages)),
            "recipe": RECIPE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _stream(argv: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run a build step with its output on our stderr (progress), failing loudly."""
    log("+ " + shlex.join(argv))
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=2, stderr=2, env=full_env)
    if proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} exited with {proc.returncode}")


def _nspawn_pipe(root: Path, argv: list[str]) -> None:
    """Run a command in `root` (not booted) with the host's network, as apt needs."""
    _stream(
        [
            "systemd-nspawn",
            "-D",
            str(root),
            "--register=no",
            "--keep-unit",
            "--pipe",
            "--link-journal=no",
            "-E",
            "DEBIAN_FRONTEND=noninteractive",
            "-E",
            "LANG=C.UTF-8",
            *argv,
        ],
        env=NSPAWN_ENV,
    )


def ensure_rootfs(cache_dir: Path) -> Path:
    """The cached rootfs for the current package list, building it first if needed."""
    problem = harness_problem()
    if problem:
        raise HarnessError(problem)
    cache_dir = cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = read_packages()
    dest = cache_dir / f"debian-{SUITE}-{cache_key(packages)}"
    if dest.is_dir():
        return dest
    # One builder at a time; whoever waited finds the finished cache afterwards.
    with _locked(cache_dir / ".rootfs.lock"):
        if dest.is_dir():
            return dest
        for stale in cache_dir.glob(".tmp-rootfs-*"):
            log(f"removing half-built cache {stale}")
            remove_tree(stale)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-rootfs-", dir=cache_dir))
        try:
            _build_rootfs(tmp / "rootfs", packages)
            os.sync()
            os.rename(tmp / "rootfs", dest)
        finally:
            remove_tree(tmp)
        log(f"rootfs {dest} built in {time.monotonic() - started:.0f} s")
    return dest


def _build_rootfs(root: Path, packages: list[str]) -> None:
    mirror = debian_mirror()
    log(f"building Debian {SUITE} rootfs in {root} from {mirror}")
    _stream(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_INCLUDE)}",
            SUITE,
            str(root),
            mirror,
        ]
    )
    # The host's own sources (main, updates, security), never a name written in this repo.
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    shutil.copyfile(HOST_SOURCES, root / "etc/apt/sources.list.d/debian.sources")
    # debootstrap copies the host's hostname and resolver config: none of the container's.
    (root / "etc/hostname").write_text("aipbx-test\n")
    # No service may start while packages are installed: the build runs on the host's network.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    apt = ["apt-get", "-q", "-o", "Dpkg::Use-Pty=0"]
    _nspawn_pipe(root, [*apt, "update"])
    _nspawn_pipe(root, [*apt, "-y", "upgrade"])
    log(f"installing {len(packages)} packages: {' '.join(packages)}")
    _nspawn_pipe(root, [*apt, "install", "-y", "--no-install-recommends", *packages])
    # A later `apt install ./x.deb` resolves from what is installed; the .debs are not needed.
    _nspawn_pipe(root, [*apt, "clean"])
    present = [u for u in DISABLED_UNITS if (root / "lib/systemd/system" / u).exists()]
    if present:
        _nspawn_pipe(root, ["systemctl", "disable", *present])
    policy.unlink()
    resolv = root / "etc/resolv.conf"
    if resolv.is_file() and not resolv.is_symlink():
        resolv.write_text("")
    (root / "etc/aipbx-system-test").write_text(f"{cache_key(packages)}\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
