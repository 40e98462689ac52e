from __future__ import annotations

from appliance import config, netns, nft
from appliance.colors import Color, color_net

NET = color_net("10.203.0.0/24", Color.GREEN)


def test_plan_up_wires_host_and_namespace_sides() -> None:
    steps = netns.plan_up(NET, peer_netns="4242", host_link_exists=False)
    text = [f"{where}: {' '.join(argv)}" for where, argv in steps]
    assert text[0] == "host: ip link add aipbx-green type veth peer name eth0 netns 4242"
    assert "host: ip addr replace 10.203.0.5/30 dev aipbx-green" in text
    assert "host: sysctl -q -w net.ipv4.conf.aipbx-green.route_localnet=1" in text
    assert "ns: ip addr replace 10.203.0.6/30 dev eth0" in text
    assert text[-1] == "ns: ip route replace default via 10.203.0.5"


def test_plan_up_replaces_a_stale_host_link() -> None:
    steps = netns.plan_up(NET, peer_netns="1", host_link_exists=True)
    assert steps[0] == ("host", ["ip", "link", "delete", "aipbx-green"])
    assert steps[1][1][:3] == ["ip", "link", "add"]


def test_plan_down() -> None:
    assert netns.plan_down(NET, host_link_exists=False) == []
    assert netns.plan_down(NET, host_link_exists=True) == [
        ("host", ["ip", "link", "delete", "aipbx-green"])
    ]


def test_nft_ruleset_replaces_the_table_atomically_and_dnats_to_live() -> None:
    cfg = config.parse("")
    text = nft.render(cfg, Color.GREEN)
    lines = [ln.strip() for ln in text.splitlines()]
    # create-if-missing, delete, create: one transaction that replaces the whole table
    assert lines[1:3] == ["table inet aipbx {}", "delete table inet aipbx"]
    assert text.count("dnat ip to 10.203.0.6:3032") == 2  # prerouting and output
    # nginx's upstream address, HTTP and WebSocket, only in output (nginx is local)
    assert text.count("ip daddr 127.203.0.1 tcp dport { 5005, 3033 } dnat ip to 10.203.0.6") == 1
    assert 'ip saddr 10.203.0.0/24 oifname != { "aipbx-blue", "aipbx-green" } masquerade' in text
    assert "dnat" not in nft.render(cfg, None).split("table inet aipbx {\n")[1]


def test_subnet_clash_with_host_routes() -> None:
    from appliance.netcheck import clashes

    routes = [
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
        {"dst": "10.203.0.0/16", "dev": "wg0"},
        {"dst": "10.203.0.0/30", "dev": "aipbx-blue"},
        {"dst": "192.168.1.0/24", "dev": "eth0"},
    ]
    assert clashes("10.203.0.0/24", routes) == ["10.203.0.0/16 dev wg0"]
    assert clashes("10.250.0.0/24", routes) == []
