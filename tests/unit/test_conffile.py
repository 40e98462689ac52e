from __future__ import annotations

from appliance import config
from appliance.conffile import set_keys

SAMPLE = """\
# the appliance
[site]
# domain = ""    # public name
# email = ""

[backend]
http_port = 5005
"""


def test_uncomments_and_sets_in_place() -> None:
    out = set_keys(SAMPLE, "site", {"domain": "pbx.example.com"})
    assert 'domain = "pbx.example.com"' in out.splitlines()[2]
    assert config.parse(out).site.domain == "pbx.example.com"
    assert "[backend]\nhttp_port = 5005" in out


def test_replaces_a_live_key_and_is_idempotent() -> None:
    once = set_keys(SAMPLE, "site", {"email": "ops@example.com"})
    twice = set_keys(once, "site", {"email": "ops@example.com"})
    assert once == twice
    again = set_keys(once, "site", {"email": "noc@example.com"})
    assert config.parse(again).site.email == "noc@example.com"
    assert again.count("email =") == 1


def test_adds_the_section_when_missing() -> None:
    out = set_keys("[backend]\nhttp_port = 5005\n", "site", {"public_ip": "192.0.2.7"})
    assert config.parse(out).site.public_ip == "192.0.2.7"


def test_quotes_are_escaped() -> None:
    out = set_keys("", "site", {"email": 'a"b@example.com'})
    assert config.parse(out).site.email == 'a"b@example.com'
