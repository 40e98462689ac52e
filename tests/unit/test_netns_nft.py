from __future__ import annotations

from appliance import config, netns, nft
from appliance.colors import Color, color_net

NET = color_net("10.203.0.0/24", Color.GREEN)
NOTHING = netns.Observed(False, False, (), False, (), False, False, "")


def test_plan_up_from_nothing_creates_everything_in_order() -> None:
    steps = [" ".join(s) for s in netns.plan_up(NET, NOTHING)]
    assert steps[0] == "ip netns add aipbx-green"
    assert steps[1] == "ip link add aipbx-green type veth peer name eth0 netns aipbx-green"
    assert "ip addr replace 10.203.0.5/30 dev aipbx-green" in steps
    assert "ip -n aipbx-green addr replace 10.203.0.6/30 dev eth0" in steps
    assert steps[-1] == "ip -n aipbx-green route replace default via 10.203.0.5"


def test_plan_up_when_all_exists_only_reasserts_sysctls() -> None:
    seen = netns.Observed(
        True, True, ("10.203.0.5/30",), True, ("10.203.0.6/30",), True, True, "10.203.0.5"
    )
    assert all(s[0] == "sysctl" for s in netns.plan_up(NET, seen))


def test_plan_down() -> None:
    assert netns.plan_down(NET, NOTHING) == []
    seen = netns.Observed(True, False, (), False, (), False, False, "")
    assert netns.plan_down(NET, seen) == [["ip", "netns", "delete", "aipbx-green"]]


def test_nft_ruleset_replaces_the_table_atomically_and_dnats_to_live() -> None:
    cfg = config.parse("")
    text = nft.render(cfg, Color.GREEN)
    lines = [ln.strip() for ln in text.splitlines()]
    # create-if-missing, delete, create: one transaction that replaces the whole table
    assert lines[1:3] == ["table inet aipbx {}", "delete table inet aipbx"]
    assert text.count("dnat ip to 10.203.0.6:3032") == 2  # prerouting and output
    assert 'ip saddr 10.203.0.0/24 oifname != { "aipbx-blue", "aipbx-green" } masquerade' in text
    assert "dnat" not in nft.render(cfg, None).split("table inet aipbx {\n")[1]
