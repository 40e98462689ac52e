"""backend.env's format (appliance.envfile): read as systemd 252 reads EnvironmentFile=,
written so that systemd and sh read back exactly the value, edited keeping the rest."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance import envfile

# The environment.d generator of this Debian 12's systemd parses with the same code as
# EnvironmentFile= (src/basic/env-file.c), then expands $VAR (so the oracle has no '$').
GENERATOR = Path("/usr/lib/systemd/user-environment-generators/30-systemd-environment-d-generator")

GNARLY = r"""# a comment \
HIDDEN=swallowed by the comment above (systemd 252)
A=plain
B= spaced value{TRAILING}
C='single # quoted'
D="double \"x\" \\ \q"
E=a\ b\\c
F='a' "b" c
 G = x
H=abc # not a comment
export I=1
J=cont\
inued
;K=2
L="multi
line"
A=last wins
M=
N=tab	inside
""".replace("{TRAILING}", "   ")

EXPECTED = {
    "A": "last wins",
    "B": "spaced value",
    "C": "single # quoted",
    "D": 'double "x" \\ \\q',
    "E": "a b\\c",
    "F": "abc",
    "G": "x",
    "H": "abc # not a comment",
    "J": "continued",
    "L": "multi\nline",
    "M": "",
    "N": "tab\tinside",
}

NASTY = [
    "",
    "plain",
    "sk-proj-abc_DEF.123",
    " leading and trailing ",
    "with space",
    "it's",
    'say "hi"',
    "both ' and \"",
    "back\\slash",
    "trailing\\",
    "#hash",
    "a #b",
    ";semi",
    "`tick`",
    "pa$$word",
    "$HOME and ${X}",
    "tab\there",
    "ünïcödé ✓",
    "=leading-equals",
    "'",
    '"',
    "\\",
    "'\"\\$`",
]


def _systemd_read(text: str, tmp_path: Path) -> dict[str, str]:
    """What systemd itself parses out of `text` (values without '$')."""
    conf = tmp_path / "cfg" / "environment.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "50-test.conf").write_text(text)
    out = subprocess.run(
        [str(GENERATOR)],
        env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got: dict[str, str] = {}
    for line in out.splitlines():
        key, _, raw = line.partition("=")
        if raw.startswith('"'):  # shell-quoted by the generator
            raw = raw[1:-1]
            value, i = [], 0
            while i < len(raw):
                if raw[i] == "\\":
                    i += 1
                    value.append({"n": "\n", "t": "\t"}.get(raw[i], raw[i]))
                else:
                    value.append(raw[i])
                i += 1
            raw = "".join(value)
        got[key] = raw
    return got


def test_parse_follows_systemd_252() -> None:
    parsed = envfile.parse(GNARLY)
    assert parsed.values() == EXPECTED
    assert [e.key for e in parsed.invalid()] == ["export I"]


def test_parse_agrees_with_this_hosts_systemd(tmp_path: Path) -> None:
    assert GENERATOR.exists(), "systemd 252 (Debian 12) is what the appliance runs on"
    theirs = _systemd_read(GNARLY, tmp_path)
    # (environment.d drops an empty value where EnvironmentFile= keeps KEY=: M is left out)
    ours = {k: v for k, v in envfile.parse(GNARLY).values().items() if v}
    assert {k: theirs.get(k) for k in ours} == ours
    assert "HIDDEN" not in theirs


@pytest.mark.parametrize("value", NASTY)
def test_quoted_values_read_back_unchanged_by_us_and_sh(value: str, tmp_path: Path) -> None:
    line = envfile.assignment("V", value)
    assert envfile.parse(f"# head\n{line}# tail\n").values() == {"V": value}
    f = tmp_path / "x.env"
    f.write_text(line)
    sh = subprocess.run(
        ["sh", "-c", f'. "{f}"; printf %s "$V"'], capture_output=True, text=True, check=True
    )
    assert sh.stdout == value


def test_quoted_values_read_back_unchanged_by_systemd(tmp_path: Path) -> None:
    values = {f"V{i}": v for i, v in enumerate(NASTY) if v and "$" not in v}
    text = "".join(envfile.assignment(k, v) for k, v in values.items())
    got = _systemd_read(text, tmp_path)
    assert {k: got.get(k, "") for k in values} == values


def test_plain_values_are_written_bare() -> None:
    assert envfile.assignment("K", "sk_test_123") == "K=sk_test_123\n"
    assert envfile.assignment("K", "redis://127.0.0.1:6379/0") == "K=redis://127.0.0.1:6379/0\n"
    assert envfile.assignment("K", "a b") == "K='a b'\n"
    assert envfile.assignment("K", "it's $x") == 'K="it\'s \\$x"\n'


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("a\nb", "newline"),
        ("a\rb", "newline"),
        ("a\0b", "NUL"),
        ("a\x1bb", "control character"),
        ("a\udcffb", "UTF-8"),
        ("x" * (envfile.MAX_VALUE_BYTES + 1), "longer"),
    ],
)
def test_values_that_cannot_be_written_are_refused(value: str, why: str) -> None:
    problem = envfile.value_problem(value)
    assert problem is not None and why in problem
    with pytest.raises(ValueError):
        envfile.quote(value)


def test_set_keeps_comments_and_order_and_replaces_in_place() -> None:
    text = "# head\nA=1\n\n# about B\n#B=example\nC=3 # x\nA=2\nD=4"
    new = envfile.set_values(text, {"A": "new", "B": "b b", "E": "5"})
    assert new == "# head\n\n# about B\n#B=example\nB='b b'\nC=3 # x\nA=new\nD=4\nE=5\n"
    assert envfile.parse(new).values() == {"B": "b b", "C": "3 # x", "A": "new", "D": "4", "E": "5"}


def test_set_replaces_a_multiline_assignment_whole() -> None:
    text = 'X="one\ntwo"\nY=cont\\\ninued\nZ=z\n'
    new = envfile.set_values(text, {"X": "1", "Y": "2"})
    assert new == "X=1\nY=2\nZ=z\n"


def test_a_new_line_never_follows_a_comment_ending_in_a_backslash() -> None:
    new = envfile.set_values("# note \\", {"A": "1"})
    assert envfile.parse(new).values() == {"A": "1"}


def test_unset_removes_every_assignment_and_keeps_the_rest() -> None:
    text = "# A: the a\n#A=x\nA=1\nB=2\nA='3'\n"
    assert envfile.unset(text, ["A", "Q"]) == "# A: the a\n#A=x\nB=2\n"


def test_set_refuses_before_editing() -> None:
    with pytest.raises(ValueError):
        envfile.set_values("A=1\n", {"A": "ok", "B": "bad\n"})
    with pytest.raises(ValueError):
        envfile.set_values("A=1\n", {"1A": "x"})
