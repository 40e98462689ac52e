from __future__ import annotations

import pytest

from appliance import validate as v
from appliance.colors import Color, color_net


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400)]
)
def test_durations(text: str, seconds: int) -> None:
    assert v.duration_seconds(text) == seconds


def test_sizes() -> None:
    assert v.size_bytes("50m") == 50 << 20
    assert v.size_bytes("2G") == 2 << 30
    with pytest.raises(ValueError):
        v.size("2 GB")


def test_domain_normalised() -> None:
    assert v.domain("PBX.Example.COM.") == "pbx.example.com"


def test_color_addresses_do_not_overlap() -> None:
    blue = color_net("10.203.0.0/24", Color.BLUE)
    green = color_net("10.203.0.0/24", Color.GREEN)
    assert (blue.host_addr, blue.ns_addr) == ("10.203.0.1", "10.203.0.2")
    assert (green.host_addr, green.ns_addr) == ("10.203.0.5", "10.203.0.6")
    assert Color.BLUE.other is Color.GREEN


def test_host_ports() -> None:
    assert v.host_port("tcp/5038") == ("tcp", 5038, 5038)
    assert v.host_port("udp/10000-10100") == ("udp", 10000, 10100)
    for bad in ("5038", "sctp/1", "tcp/0", "tcp/70000", "udp/20-10", "tcp/5038\n", "tcp/ 1"):
        with pytest.raises(ValueError):
            v.host_port(bad)
