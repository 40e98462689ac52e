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
