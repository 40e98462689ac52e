"""Mounts on the host: a machine's disk (an overlay of the cached rootfs, or a copy of it),
unmounting, and removing a tree only when nothing is mounted under it (a leftover overlay
would otherwise be emptied through its mount point)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.system.harness import HarnessError, log


def mount_points() -> list[str]:
    points: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]  # spaces and the like are escaped as \ooo
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), raw))
    return points


def mounts_under(path: Path) -> list[str]:
    top = str(path.resolve())
    return [p for p in mount_points() if p == top or p.startswith(top + "/")]


def remove_tree(path: Path) -> None:
    """rm -rf, refusing to descend into a mount (a leftover overlay would be emptied)."""
    if not path.exists():
        return
    mounted = mounts_under(path)
    if mounted:
        raise HarnessError(f"refusing to remove {path}: still mounted: {', '.join(mounted)}")
    shutil.rmtree(path)


def umount(point: Path, timeout: float = 10) -> None:
    point = point.resolve()
    deadline = time.monotonic() + timeout
    while str(point) in mount_points():
        proc = subprocess.run(["umount", str(point)], capture_output=True, text=True)
        if proc.returncode == 0:
            continue
        if time.monotonic() > deadline:
            # Detach it so nothing stays visible; the kernel frees it when the last user goes.
            log(f"umount {point} failed ({proc.stderr.strip()}); detaching it")
            subprocess.run(["umount", "--lazy", str(point)], check=True)
            return
        time.sleep(0.2)


def mount_disk(lower: Path, workdir: Path, root: Path) -> str:
    """Mount a writable overlay of `lower` at `root`, its upper and work dirs in `workdir`;
    where overlayfs is refused, copy `lower` to `root` instead. Returns how: "overlay" or
    "copy"."""
    upper, work = workdir / "upper", workdir / "work"
    for d in (upper, work, root):
        d.mkdir()
    for p in (lower, upper, work):
        if any(c in str(p) for c in ",:\\"):
            raise HarnessError(f"overlay cannot take a path with , : or \\: {p}")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(root)],
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        return "overlay"
    log(f"overlay mount failed ({proc.stderr.strip()}); copying the rootfs instead")
    root.rmdir()
    subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(root)], check=True)
    return "copy"
