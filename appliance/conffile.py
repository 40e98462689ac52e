"""Edits to aipbx.toml made on the operator's behalf (`setup --domain D`): one key line is
replaced in place, comments and layout kept. Pure: text in, text out."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def set_keys(text: str, section: str, values: Mapping[str, str]) -> str:
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
    todo = dict(values)
    start = next(
        (i for i, ln in enumerate(lines) if (m := header.match(ln)) and m.group(1) == section), None
    )
    if start is None:
        block = [f"[{section}]", *(f"{k} = {_toml_str(v)}" for k, v in todo.items())]
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + "\n".join(block) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if header.match(lines[i])), len(lines))
    for key in list(todo):
        live = re.compile(rf"^\s*{re.escape(key)}\s*=")
        commented = re.compile(rf"^\s*#\s*{re.escape(key)}\s*=")
        idx = next((i for i in range(start + 1, end) if live.match(lines[i])), None)
        if idx is None:
            idx = next((i for i in range(start + 1, end) if commented.match(lines[i])), None)
        new = f"{key} = {_toml_str(todo.pop(key))}"
        if idx is None:
            lines.insert(start + 1, new)
            end += 1
        else:
            lines[idx] = new
    return "\n".join(lines) + "\n"
