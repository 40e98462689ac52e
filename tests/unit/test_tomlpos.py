from __future__ import annotations

from appliance.tomlpos import key_lines, line_of

TEXT = """\
top = 1
[a]
x = 1
"quoted" = 2
[a.b]  # comment
y = 3
"""


def test_lines() -> None:
    lines = key_lines(TEXT)
    assert lines[("top",)] == 1
    assert lines[("a",)] == 2
    assert lines[("a", "x")] == 3
    assert lines[("a", "quoted")] == 4
    assert lines[("a", "b", "y")] == 6


def test_falls_back_to_table() -> None:
    assert line_of(key_lines(TEXT), ("a", "missing")) == 2
    assert line_of(key_lines(TEXT), ("zzz",)) == 1
