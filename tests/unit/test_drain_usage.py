"""What still uses a color, from one conntrack dump; a failing conntrack is never idle."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from appliance import config, drain
from appliance.colors import Color
from appliance.errors import CommandError

Result = subprocess.CompletedProcess[str] | Exception
Run = Callable[..., subprocess.CompletedProcess[str]]


def _entry(proto: str, state: str, orig: tuple[str, str, int, int], reply_sport: int) -> str:
    """One `conntrack -L` line; the reply tuple comes from the color (10.203.0.2)."""
    src, dst, sport, dport = orig
    num = "6 431999" if proto == "tcp" else "17 29"
    return (
        f"{proto}      {num} {state} src={src} dst={dst} sport={sport} dport={dport} "
        f"src=10.203.0.2 dst={src} sport={reply_sport} dport={sport} [ASSURED] mark=0 use=1"
    )


NGINX = ("127.0.0.1", "127.203.0.1")
DUMP = "\n".join(
    [
        _entry("tcp", "ESTABLISHED", (*NGINX, 45678, 3033), 3033),  # a WebSocket
        _entry("tcp", "ESTABLISHED", (*NGINX, 45679, 3033), 3033),  # another
        _entry("tcp", "TIME_WAIT", (*NGINX, 45680, 3033), 3033),  # closed
        _entry("tcp", "ESTABLISHED", (*NGINX, 45681, 5005), 5005),  # HTTP keep-alive
        _entry("udp", "", ("192.0.2.7", "198.51.100.1", 20000, 3032), 3032),  # a call
        _entry("udp", "", ("10.203.0.2", "9.9.9.9", 41000, 53), 41000),  # its own DNS
    ]
)


def test_count_usage_reads_the_reply_tuple() -> None:
    assert drain.count_usage(DUMP, 3033, 3032) == drain.Usage(ws=2, udp_flows=1)
    assert drain.count_usage("", 3033, 3032).idle


def _fake(result: Result) -> tuple[list[list[str]], Run]:
    calls: list[list[str]] = []

    def fake(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if isinstance(result, Exception):
            raise result
        return result

    return calls, fake


def test_one_dump_of_the_colors_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = subprocess.CompletedProcess(["conntrack"], 0, DUMP, "6 flow entries have been shown.")
    calls, fake = _fake(ok)
    monkeypatch.setattr(drain, "run", fake)
    assert drain.usage(config.parse(""), Color.BLUE) == drain.Usage(ws=2, udp_flows=1)
    assert calls == [["conntrack", "-L", "--reply-src", "10.203.0.2"]]


@pytest.mark.parametrize(
    "result",
    [
        subprocess.CompletedProcess(["conntrack"], 1, "", "Operation failed: Permission denied"),
        CommandError(["conntrack"], 127, "no such file"),
    ],
)
def test_a_failing_conntrack_is_never_idle(monkeypatch: pytest.MonkeyPatch, result: Result) -> None:
    _, fake = _fake(result)
    monkeypatch.setattr(drain, "run", fake)
    with pytest.raises(drain.UsageUnknown, match="cannot tell what still uses blue"):
        drain.usage(config.parse(""), Color.BLUE)
