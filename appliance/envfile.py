"""The format of /etc/aipbx/backend.env and secrets.env: systemd's EnvironmentFile= syntax,
read exactly as systemd 252 (Debian 12) reads it, and edited line by line so that comments
and the order of the other lines are kept. Pure: text in, text out.

systemd's reader (src/basic/env-file.c), which this module follows state for state:
- `KEY=VALUE`, one a line; blanks around the key and before the value are dropped; lines
  whose first non-blank character is `#` or `;` are comments (v252: a comment line ending
  in a backslash continues onto the next line, which is then a comment too);
- unquoted values lose their trailing blanks, and a backslash takes the next character
  literally (a backslash at the end of a line joins the next line);
- a value starting with `'` is literal up to the next `'`; one starting with `"` runs to the
  next unescaped `"`, where `\\"`, `\\\\`, `\\$` and `` \\` `` stand for the character and
  any other backslash is kept; quoted parts may be followed by more quoted or bare parts;
- `$` is never expanded, and `#` after the `=` is part of the value;
- a key that is not a variable name ([A-Za-z_][A-Za-z0-9_]*) is dropped, as systemd drops
  it (with a log line); the last assignment of a key wins.

What the appliance writes is read back unchanged by systemd and by a POSIX shell alike:
bare when the value has only plain characters, else in single quotes, else (a value with a
`'`) in double quotes with `\\`, `"`, `$` and `` ` `` escaped. Control characters (a newline,
a NUL...) cannot be written and are refused."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Written bare: what neither systemd nor a shell would change.
BARE_RE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
MAX_VALUE_BYTES = 32 * 1024

_WHITESPACE = " \t\n\r"
_NEWLINE = "\n\r"
_COMMENTS = "#;"
_DQ_ESCAPED = '"\\`$'  # systemd's SHELL_NEED_ESCAPE


@dataclass(frozen=True)
class Entry:
    """One assignment as systemd reads it, and where it is in the text: [start, end) covers
    its whole lines, the newline that ends it included."""

    key: str
    value: str
    line: int  # 1-based line of its first character
    start: int
    end: int

    @property
    def valid(self) -> bool:
        return KEY_RE.fullmatch(self.key) is not None


@dataclass(frozen=True)
class Comment:
    line: int
    text: str  # the comment's first line, without the newline


@dataclass(frozen=True)
class Parsed:
    text: str
    entries: tuple[Entry, ...]
    comments: tuple[Comment, ...]

    def values(self) -> dict[str, str]:
        """What the process gets: valid names only, the last assignment of each."""
        return {e.key: e.value for e in self.entries if e.valid}

    def invalid(self) -> list[Entry]:
        return [e for e in self.entries if not e.valid]


def _line_start(text: str, pos: int) -> int:
    return max(text.rfind("\n", 0, pos), text.rfind("\r", 0, pos)) + 1


def parse(text: str) -> Parsed:
    """systemd 252's parse_env_file_internal(), with each entry's place in the text."""
    entries: list[Entry] = []
    comments: list[Comment] = []
    state = "PRE_KEY"
    key: list[str] = []
    value: list[str] = []
    last_key_ws: int | None = None
    last_value_ws: int | None = None
    line = 1
    rec_line = 1
    rec_start = 0

    def push(end: int) -> None:
        k = "".join(key[:last_key_ws] if last_key_ws is not None else key)
        entries.append(Entry(k, "".join(value), rec_line, rec_start, end))

    for i, c in enumerate(text):
        if state == "PRE_KEY":
            if c in _COMMENTS:
                state = "COMMENT"
                ends = [p for p in (text.find("\n", i), text.find("\r", i)) if p >= 0]
                comments.append(Comment(line, text[i : min(ends, default=len(text))]))
            elif c not in _WHITESPACE:
                state = "KEY"
                key, value = [c], []
                last_key_ws = None
                rec_line, rec_start = line, _line_start(text, i)
            elif c in _NEWLINE:
                line += 1
        elif state == "KEY":
            if c in _NEWLINE:
                state = "PRE_KEY"  # a line without '=' is dropped
                line += 1
            elif c == "=":
                state = "PRE_VALUE"
                last_value_ws = None
            else:
                if c not in _WHITESPACE:
                    last_key_ws = None
                elif last_key_ws is None:
                    last_key_ws = len(key)
                key.append(c)
        elif state == "PRE_VALUE":
            if c in _NEWLINE:
                state = "PRE_KEY"
                push(i + 1)
                line += 1
            elif c == "'":
                state = "SINGLE_QUOTE_VALUE"
            elif c == '"':
                state = "DOUBLE_QUOTE_VALUE"
            elif c == "\\":
                state = "VALUE_ESCAPE"
            elif c not in _WHITESPACE:
                state = "VALUE"
                value.append(c)
        elif state == "VALUE":
            if c in _NEWLINE:
                state = "PRE_KEY"
                if last_value_ws is not None:
                    del value[last_value_ws:]
                push(i + 1)
                line += 1
            elif c == "\\":
                state = "VALUE_ESCAPE"
                last_value_ws = None
            else:
                if c not in _WHITESPACE:
                    last_value_ws = None
                elif last_value_ws is None:
                    last_value_ws = len(value)
                value.append(c)
        elif state == "VALUE_ESCAPE":
            state = "VALUE"
            if c not in _NEWLINE:
                value.append(c)
            else:
                line += 1  # an escaped newline is eaten: the value goes on
        elif state == "SINGLE_QUOTE_VALUE":
            if c == "'":
                state = "PRE_VALUE"
            else:
                value.append(c)
                line += c in _NEWLINE
        elif state == "DOUBLE_QUOTE_VALUE":
            if c == '"':
                state = "PRE_VALUE"
            elif c == "\\":
                state = "DOUBLE_QUOTE_VALUE_ESCAPE"
            else:
                value.append(c)
                line += c in _NEWLINE
        elif state == "DOUBLE_QUOTE_VALUE_ESCAPE":
            state = "DOUBLE_QUOTE_VALUE"
            if c in _DQ_ESCAPED:
                value.append(c)
            elif c != "\n":
                value += ["\\", c]
            else:
                line += 1
        elif state == "COMMENT":
            if c == "\\":
                state = "COMMENT_ESCAPE"
            elif c in _NEWLINE:
                state = "PRE_KEY"
                line += 1
        elif state == "COMMENT_ESCAPE":
            # systemd 252: the character after a backslash never ends the comment, so a
            # comment line ending in '\' swallows the next line (v254 changed this).
            state = "COMMENT"
            line += c in _NEWLINE
    if state in (
        "PRE_VALUE",
        "VALUE",
        "VALUE_ESCAPE",
        "SINGLE_QUOTE_VALUE",
        "DOUBLE_QUOTE_VALUE",
        "DOUBLE_QUOTE_VALUE_ESCAPE",
    ):
        if state == "VALUE" and last_value_ws is not None:
            del value[last_value_ws:]
        push(len(text))
    return Parsed(text, tuple(entries), tuple(comments))


def value_problem(value: str) -> str | None:
    """Why a value cannot be written (None: it can)."""
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if "\n" in value or "\r" in value:
        return "contains a newline (an environment value is one line)"
    if "\0" in value:
        return "contains a NUL byte"
    bad = next((c for c in value if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F), None)
    if bad is not None:
        return f"contains the control character {bad!r}"
    if len(raw) > MAX_VALUE_BYTES:
        return f"is longer than {MAX_VALUE_BYTES} bytes"
    return None


def quote(value: str) -> str:
    """The value as written after `KEY=`, read back unchanged by systemd and by sh.
    ValueError for one that cannot be written (see value_problem)."""
    problem = value_problem(value)
    if problem:
        raise ValueError(problem)
    if value == "" or BARE_RE.fullmatch(value):
        return value
    if "'" not in value:
        return f"'{value}'"
    return '"' + re.sub(r'(["\\`$])', r"\\\1", value) + '"'


def assignment(key: str, value: str) -> str:
    if not KEY_RE.fullmatch(key):
        raise ValueError(f"{key!r} is not a variable name")
    return f"{key}={quote(value)}\n"


def _template_line(text: str, key: str) -> int | None:
    """The end of a commented-out `#KEY=...` line (where a new assignment goes), if any."""
    m = re.search(rf"^[ \t]*[#;][ \t]*{re.escape(key)}[ \t]*=.*$", text, re.MULTILINE)
    if m is None or m.group(0).endswith("\\"):
        return None
    return m.end() + 1 if m.end() < len(text) else m.end()


def _append(text: str, line: str) -> str:
    if text and not text.endswith(("\n", "\r")):
        text += "\n"
    # A last comment line ending in '\' would swallow the new line (systemd 252).
    if text.rstrip("\r\n").endswith("\\"):
        text += "\n"
    return text + line


def _cut(text: str, spans: Iterable[tuple[int, int, str]]) -> str:
    """Replace each [start, end) with its text, from the last one back."""
    for start, end, new in sorted(spans, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def set_values(text: str, values: Mapping[str, str]) -> str:
    """The text with each KEY set to its value: the last assignment of KEY is replaced in
    place and earlier ones removed; a new KEY goes after its commented-out `#KEY=` line if
    the file has one, else at the end. Everything else is kept byte for byte."""
    lines = {k: assignment(k, v) for k, v in values.items()}  # ValueError before any edit
    parsed = parse(text)
    spans: list[tuple[int, int, str]] = []
    new: dict[str, str] = {}
    for key, line in lines.items():
        mine = [e for e in parsed.entries if e.key == key]
        if not mine:
            new[key] = line
            continue
        *earlier, last = mine
        spans += [(e.start, e.end, "") for e in earlier]
        spans.append((last.start, last.end, line))
    text = _cut(text, spans)
    for key, line in new.items():
        at = _template_line(text, key)
        if at is None:
            text = _append(text, line)
        else:
            sep = "" if at > 0 and text[at - 1] in _NEWLINE else "\n"
            text = text[:at] + sep + line + text[at:]
    return text


def unset(text: str, keys: Iterable[str]) -> str:
    """The text without any assignment of the keys (comments kept)."""
    drop = set(keys)
    return _cut(text, ((e.start, e.end, "") for e in parse(text).entries if e.key in drop))
