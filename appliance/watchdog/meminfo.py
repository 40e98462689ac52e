"""How much of the host's memory is in use, from /proc/meminfo, as psutil's
virtual_memory().percent counts it: (MemTotal - MemAvailable) / MemTotal. Read directly,
every round: psutil costs the daemon half a MiB of RSS for this one number."""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")
WANTED = {b"MemTotal", b"MemAvailable", b"MemFree", b"Buffers", b"Cached"}


def used_pct(text: bytes) -> float:
    """Pure: the percentage of memory in use from /proc/meminfo's text (kB values).
    Without MemAvailable (kernels before 3.14): free, buffers and page cache."""
    kb: dict[bytes, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(b":")
        if name in WANTED:
            value = rest.split()
            if value and value[0].isdigit():
                kb[name] = int(value[0])
            if b"MemTotal" in kb and b"MemAvailable" in kb:
                break  # the first three lines
    total = kb.get(b"MemTotal", 0)
    if total <= 0:
        raise ValueError("no MemTotal in /proc/meminfo")
    avail = kb.get(b"MemAvailable")
    if avail is None:
        avail = kb.get(b"MemFree", 0) + kb.get(b"Buffers", 0) + kb.get(b"Cached", 0)
    return 100.0 * (total - min(avail, total)) / total


def read_used_pct(path: Path = MEMINFO) -> float:
    return used_pct(path.read_bytes())
