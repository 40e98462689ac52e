"""DESIGN decision 3 for real: two color namespaces with veths, the nft table switched in one
transaction, and conntrack keeping an existing UDP flow (a call) on the old color while a new
flow goes to the new one. Everything here has a unique name and is removed afterwards."""

from __future__ import annotations

import dataclasses
import random
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config, netns, nft
from appliance.colors import Color, color_net
from tests.integration.procs import stop

pytestmark = pytest.mark.integration

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    data, src = s.recvfrom(2048)
    s.sendto(sys.argv[1].encode() + b" " + data, src)
"""


@pytest.fixture
def lab() -> Iterator[tuple[config.Config, str, str]]:
    prefix = "ait" + uuid.uuid4().hex[:4]
    table = f"aipbx_test_{prefix}"
    base = config.parse("")
    cfg = dataclasses.replace(
        base,
        network=dataclasses.replace(base.network, subnet=f"10.251.{random.randint(0, 255)}.0/24"),
        backend=dataclasses.replace(base.backend, udp_port=random.randint(40000, 49000)),
    )
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for c in Color:
            net = color_net(cfg.network.subnet, c, prefix=prefix)
            # systemd makes the namespace in production; here the test makes its own.
            subprocess.run(["ip", "netns", "add", net.netns], check=True)
            netns.up(net, peer_netns=net.netns, host=(), ns=("ip", "netns", "exec", net.netns))
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        net.netns,
                        "python3",
                        "-c",
                        ECHO,
                        str(c),
                        str(cfg.backend.udp_port),
                    ]
                )
            )
        yield cfg, prefix, table
    finally:
        for p in procs:
            stop(p)
        nft.delete(table)
        for c in Color:
            net = color_net(cfg.network.subnet, c, prefix=prefix)
            netns.down(net, host=())
            subprocess.run(["ip", "netns", "delete", net.netns], check=False)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)


def _ask(sock: socket.socket, port: int, payload: bytes) -> bytes:
    for _ in range(20):  # the echo server may still be starting
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            return sock.recv(2048)
        except TimeoutError:
            continue
    raise AssertionError("no answer")


def test_existing_flow_stays_pinned_new_flow_goes_to_new_color(
    lab: tuple[config.Config, str, str],
) -> None:
    cfg, prefix, table = lab
    port = cfg.backend.udp_port
    nft.apply(nft.render(cfg, Color.BLUE, table=table, prefix=prefix))
    call = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    call.settimeout(0.5)
    call.bind(("127.0.0.1", 0))
    assert _ask(call, port, b"rtp-1") == b"blue rtp-1"

    nft.apply(nft.render(cfg, Color.GREEN, table=table, prefix=prefix))
    assert _ask(call, port, b"rtp-2") == b"blue rtp-2"  # the live call stays on blue
    new = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    new.settimeout(0.5)
    new.bind(("127.0.0.1", 0))
    assert _ask(new, port, b"rtp-3") == b"green rtp-3"  # a new call goes to green
    # the switch left exactly one table of ours
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert listed.count(f"inet {table}") == 1


def test_netns_up_again_rebuilds_the_link(lab: tuple[config.Config, str, str]) -> None:
    cfg, prefix, _ = lab
    net = color_net(cfg.network.subnet, Color.BLUE, prefix=prefix)
    done = netns.up(net, peer_netns=net.netns, host=(), ns=("ip", "netns", "exec", net.netns))
    assert done[0] == ["ip", "link", "delete", net.host_if]
    inside = subprocess.run(
        ["ip", "-n", net.netns, "-4", "-o", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{net.ns_addr}/30" in inside
