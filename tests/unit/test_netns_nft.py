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
    nat = nft.render(cfg, None).split("table inet aipbx {\n")[1].split("chain input")[0]
    assert "dnat" not in nat


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


def test_nft_filters_what_a_color_reaches() -> None:
    cfg = config.parse('[network]\nhost_ports = ["tcp/5038", "udp/10000-10100", "tcp/8088"]\n')
    text = nft.render(cfg, Color.BLUE)
    lines = [ln.strip() for ln in text.splitlines()]
    colors = '{ "aipbx-blue", "aipbx-green" }'
    assert f"iifname {colors} jump from_color" in lines
    # PgBouncer only on the color's own veth address
    assert 'iifname "aipbx-blue" ip daddr 10.203.0.1 tcp dport 6432 accept' in lines
    assert 'iifname "aipbx-green" ip daddr 10.203.0.5 tcp dport 6432 accept' in lines
    assert "meta l4proto { tcp, udp } th dport 53 accept" in lines
    assert "tcp dport { 80, 443 } accept" in lines
    assert "tcp dport { 5038, 8088 } accept" in lines
    assert "udp dport { 10000-10100 } accept" in lines
    # the chain ends refusing the rest, after every accept
    chain = text.split("chain from_color {")[1].split("}\n")[0]
    assert chain.rstrip().splitlines()[-1].strip() == (
        "counter reject with icmpx type admin-prohibited"
    )
    # never from one color to the other; into a color only replies and the DNATed RTP
    assert (
        f"iifname {colors} oifname {colors} counter reject with icmpx type admin-prohibited"
    ) in lines
    assert f"oifname {colors} ct status dnat accept" in lines
    assert f"oifname {colors} counter drop" in lines
    # the filter does not depend on the live color
    assert nft.render_filters(cfg) in nft.render(cfg, None)


def test_nft_filters_without_host_ports_open_only_the_appliance_ports() -> None:
    text = nft.render(config.parse(""), Color.GREEN)
    assert "tcp dport { 80, 443 } accept" in text
    assert "5038" not in text and "udp dport {" not in text
