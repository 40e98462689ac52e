"""Line numbers for TOML keys. tomllib parses but forgets positions; operators need
`file:line: what is wrong`, so this scans the text for table headers and `key =` lines.
It covers what aipbx.toml uses: tables, dotted table headers and bare or quoted keys."""

from __future__ import annotations

import re

_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*(\"[^\"]*\"|[A-Za-z0-9_\-]+)\s*=")


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each (table..., key) path, and each table path, to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for n, line in enumerate(text.splitlines(), start=1):
        if m := _TABLE.match(line):
            table = tuple(p.strip().strip('"') for p in m.group(1).split("."))
            lines.setdefault(table, n)
        elif m := _KEY.match(line):
            lines.setdefault((*table, m.group(1).strip('"')), n)
    return lines


def line_of(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int:
    """The line of path, else of its closest enclosing table, else 1."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 1
