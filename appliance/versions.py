"""Which of two release versions is older: pure. Versions like `1.10.0`, `v2.5.4`,
`2.0.0-rc.1`, `2.0.0rc1`, `1.0.post1`, `3.1.0+build7` are compared as numbers with their
pre-releases (dev < alpha < beta < rc < the release < post; SemVer build metadata ignored);
anything else as Debian compares versions (dpkg's algorithm: digits as numbers, `~`
before everything, letters before other characters)."""

from __future__ import annotations

import re

_PRE = {"dev": 0, "a": 1, "alpha": 1, "b": 2, "beta": 2, "c": 3, "rc": 3, "pre": 3}
_RELEASE, _POST = 4, 5
_SIMPLE = re.compile(
    r"v?(?P<nums>\d+(?:\.\d+)*)"
    r"(?:[-_.~]?(?P<tag>dev|alpha|beta|a|b|c|rc|pre|post)[-_.]?(?P<n>\d*))?"
    r"(?:\+[0-9A-Za-z.-]*)?",
    re.IGNORECASE,
)


def _key(version: str) -> tuple[tuple[int, ...], int, int] | None:
    m = _SIMPLE.fullmatch(version.strip())
    if m is None:
        return None
    nums = tuple(int(x) for x in m["nums"].split("."))
    while len(nums) > 1 and nums[-1] == 0:
        nums = nums[:-1]
    tag = (m["tag"] or "").lower()
    rank = _POST if tag == "post" else _PRE.get(tag, _RELEASE)
    return nums, rank, int(m["n"] or 0)


_DIGITS = frozenset("0123456789")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _order(c: str) -> int:
    """dpkg's order of a non-digit character: `~` first, then the end, letters, others."""
    if c == "~":
        return -1
    if c in _LETTERS:
        return ord(c)
    return ord(c) + 256


def debian_compare(a: str, b: str) -> int:
    """dpkg's verrevcmp: <0, 0, >0 as a sorts before, with or after b."""

    def digit(s: str, k: int) -> bool:
        return k < len(s) and s[k] in _DIGITS

    def other(s: str, k: int) -> bool:
        return k < len(s) and s[k] not in _DIGITS

    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while other(a, i) or other(b, j):
            ac = _order(a[i]) if other(a, i) else 0
            bc = _order(b[j]) if other(b, j) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while digit(a, i) and digit(b, j):
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if digit(a, i):
            return 1
        if digit(b, j):
            return -1
        if first_diff:
            return first_diff
    return 0


def compare(a: str, b: str) -> int:
    """<0, 0, >0 as version a is older than, the same as, or newer than b."""
    ka, kb = _key(a), _key(b)
    if ka is not None and kb is not None:
        return (ka > kb) - (ka < kb)
    c = debian_compare(a, b)
    return (c > 0) - (c < 0)


def is_downgrade(new: str, live: str) -> bool:
    return compare(new, live) < 0
