"""Host paths of paths inside a container's root filesystem.

Symlinks are resolved *inside* the root (an absolute link like /var/run -> /run must not
lead to the host's /run), and paths on the container's tmpfs mounts (/run, /tmp, ...) are
refused: they are not part of the root filesystem and have no host path.
"""

from __future__ import annotations

import os
from pathlib import Path

# Inside the container these are not part of the persistent root filesystem.
VOLATILE_PREFIXES = ("/run", "/tmp", "/proc", "/sys", "/dev")


def host_path(root: Path, p: str) -> Path:
    """The host path of container path `p` in the container whose root is `root`."""
    if not p.startswith("/"):
        raise ValueError(f"container path must be absolute: {p!r}")
    parts = [c for c in p.split("/") if c not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise ValueError(f"too many symlinks in {p!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [c for c in target.split("/") if c not in ("", ".")] + parts
            continue
        resolved.append(part)
    inside = "/" + "/".join(resolved)
    for prefix in VOLATILE_PREFIXES:
        if inside == prefix or inside.startswith(prefix + "/"):
            raise ValueError(f"{p!r} is on a tmpfs inside the machine: no host path")
    return root.joinpath(*resolved)
