"""DESIGN decision 3 for real: two color namespaces with veths, the nft table switched in one
transaction, and conntrack keeping an existing UDP flow (a call) on the old color while a new
flow goes to the new one. Everything here has a unique name and is removed afterwards."""

from __future__ import annotations

import dataclasses
import io
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config, drain, netns, nft
from appliance.colors import LIVE_ADDR, Color, color_net
from tests.integration.procs import stop

pytestmark = pytest.mark.integration

ECHO = """
import socket, sys, threading
color, port = sys.argv[1].encode(), int(sys.argv[2])
def tcp():
    srv = socket.create_server(("0.0.0.0", port))
    while True:
        conn, _ = srv.accept()
        def serve(c):
            for line in c.makefile("rb"):
                c.sendall(color + b" " + line)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
while True:
    data, src = s.recvfrom(2048)
    s.sendto(color + b" " + data, src)
"""


@pytest.fixture
def lab() -> Iterator[tuple[config.Config, str, str]]:
    prefix = "ait" + uuid.uuid4().hex[:4]
    table = f"aipbx_test_{prefix}"
    base = config.parse("")
    port = random.randint(40000, 49000)
    cfg = dataclasses.replace(
        base,
        network=dataclasses.replace(base.network, subnet=f"10.251.{random.randint(0, 255)}.0/24"),
        backend=dataclasses.replace(base.backend, udp_port=port, http_port=port),
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


def _call_pinned_to_blue_after_switch(cfg: config.Config, prefix: str, table: str) -> socket.socket:
    """A call started on blue, then the switch to green: it stays on blue (conntrack)."""
    port = cfg.backend.udp_port
    nft.apply(nft.render(cfg, Color.BLUE, table=table, prefix=prefix))
    call = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    call.settimeout(0.5)
    call.bind(("127.0.0.1", 0))
    assert _ask(call, port, b"rtp-1") == b"blue rtp-1"
    nft.apply(nft.render(cfg, Color.GREEN, table=table, prefix=prefix))
    assert _ask(call, port, b"rtp-2") == b"blue rtp-2"  # the live call stays on blue
    return call


def test_existing_flow_stays_pinned_new_flow_goes_to_new_color(
    lab: tuple[config.Config, str, str],
) -> None:
    cfg, prefix, table = lab
    port = cfg.backend.udp_port
    call = _call_pinned_to_blue_after_switch(cfg, prefix, table)
    new = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    new.settimeout(0.5)
    new.bind(("127.0.0.1", 0))
    assert _ask(new, port, b"rtp-3") == b"green rtp-3"  # a new call goes to green
    assert _ask(call, port, b"rtp-4") == b"blue rtp-4"  # while the old one stays
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


def _connect(addr: tuple[str, int]) -> socket.socket:
    for _ in range(50):  # the echo servers may still be starting
        try:
            return socket.create_connection(addr, timeout=5)
        except ConnectionRefusedError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered on {addr}")


def _tcp_ask(f: io.BufferedRWPair, line: bytes) -> bytes:
    f.write(line + b"\n")
    f.flush()
    return f.readline().strip()


def test_open_tcp_connection_stays_new_connection_moves(
    lab: tuple[config.Config, str, str],
) -> None:
    """nginx's upstream (HTTP, WebSocket) is switched the same way: by the nft table."""
    cfg, prefix, table = lab
    addr = (LIVE_ADDR, cfg.backend.http_port)
    nft.apply(nft.render(cfg, Color.BLUE, table=table, prefix=prefix))
    ws = _connect(addr)
    old = ws.makefile("rwb")
    assert _tcp_ask(old, b"one") == b"blue one"
    nft.apply(nft.render(cfg, Color.GREEN, table=table, prefix=prefix))
    assert _tcp_ask(old, b"two") == b"blue two"  # the open WebSocket stays on blue
    with _connect(addr) as new:
        assert _tcp_ask(new.makefile("rwb"), b"three") == b"green three"
    ws.close()


def test_a_stopped_colors_udp_flows_are_forgotten_and_move_to_the_live_color(
    lab: tuple[config.Config, str, str],
) -> None:
    """A call that outlived the drain: once its color stops, its conntrack entry goes and
    its next packet is DNATed to the live color (else it would go to the stopped one for as
    long as the far end keeps sending)."""
    cfg, prefix, table = lab
    port = cfg.backend.udp_port
    call = _call_pinned_to_blue_after_switch(cfg, prefix, table)
    assert drain.usage(cfg, Color.BLUE).udp_flows == 1
    # Only the flows of blue in this test's own subnet and port are touched.
    assert drain.forget_udp_flows(cfg, Color.BLUE) == 1
    assert drain.usage(cfg, Color.BLUE).udp_flows == 0
    assert _ask(call, port, b"rtp-3") == b"green rtp-3"  # the same flow, now on green
    assert drain.usage(cfg, Color.GREEN).udp_flows == 1
    assert drain.forget_udp_flows(cfg, Color.BLUE) == 0


# --- what a color reaches (appliance.nft's filter chains) -------------------------------------

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def _from_ns(netns_name: str, addr: str, port: int) -> str:
    argv = ["ip", "netns", "exec", netns_name, "python3", "-c", CONNECT, addr, str(port)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def _listen(socks: list[socket.socket], addr: str, port: int) -> None:
    s = socket.create_server((addr, port))
    socks.append(s)


def test_a_color_reaches_its_pgbouncer_address_and_nothing_else_of_the_host(
    lab: tuple[config.Config, str, str], listeners: list[socket.socket]
) -> None:
    cfg, prefix, table = lab
    pgb, other = random.randint(20000, 29000), random.randint(30000, 39000)
    cfg = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, pgbouncer_port=pgb))
    blue = color_net(cfg.network.subnet, Color.BLUE, prefix=prefix)
    green = color_net(cfg.network.subnet, Color.GREEN, prefix=prefix)
    for net in (blue, green):
        _listen(listeners, net.host_addr, pgb)  # PgBouncer listens on each veth address
    _listen(listeners, "0.0.0.0", other)  # a host service on every address
    # without the table, blue reaches all of it: the listeners are real
    assert _from_ns(blue.netns, green.host_addr, pgb) == "connected"
    assert _from_ns(blue.netns, blue.host_addr, other) == "connected"
    nft.apply(nft.render(cfg, Color.BLUE, table=table, prefix=prefix))
    assert _from_ns(blue.netns, blue.host_addr, pgb) == "connected"
    assert _from_ns(green.netns, green.host_addr, pgb) == "connected"
    refused = {"ConnectionRefusedError", "OSError", "TimeoutError"}
    assert _from_ns(blue.netns, green.host_addr, pgb) in refused  # not the other's address
    assert _from_ns(blue.netns, blue.host_addr, other) in refused
    assert _from_ns(green.netns, green.host_addr, other) in refused
    # a port listed in [network] host_ports is open to both
    opened = dataclasses.replace(
        cfg, network=dataclasses.replace(cfg.network, host_ports=(f"tcp/{other}",))
    )
    nft.apply(nft.render(opened, Color.BLUE, table=table, prefix=prefix))
    assert _from_ns(blue.netns, blue.host_addr, other) == "connected"
    assert _from_ns(green.netns, green.host_addr, other) == "connected"


def test_the_colors_cannot_reach_each_other_but_reach_other_hosts(
    lab: tuple[config.Config, str, str], listeners: list[socket.socket]
) -> None:
    cfg, prefix, table = lab
    port = cfg.backend.http_port  # the echo servers' TCP port in both colors
    blue = color_net(cfg.network.subnet, Color.BLUE, prefix=prefix)
    green = color_net(cfg.network.subnet, Color.GREEN, prefix=prefix)
    # another host: a namespace behind its own veth, routed by this host
    ext, ext_if = f"{prefix}-ext", f"{prefix}-x"
    base = random.choice(range(0, 256, 4))
    host_side, ext_side = f"198.18.{base}.1", f"198.18.{base}.2"
    subprocess.run(["ip", "netns", "add", ext], check=True)
    server = None
    try:
        for argv in (
            ["ip", "link", "add", ext_if, "type", "veth", "peer", "name", "eth0", "netns", ext],
            ["ip", "addr", "add", f"{host_side}/30", "dev", ext_if],
            ["ip", "link", "set", ext_if, "up"],
            ["ip", "-n", ext, "addr", "add", f"{ext_side}/30", "dev", "eth0"],
            ["ip", "-n", ext, "link", "set", "eth0", "up"],
            ["ip", "-n", ext, "route", "add", "default", "via", host_side],
        ):
            subprocess.run(argv, check=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ext, "python3", "-c", ECHO, "ext", str(port)]
        )
        for _ in range(50):  # the echo servers start
            if _from_ns(blue.netns, green.ns_addr, port) == "connected":
                break
            time.sleep(0.1)
        assert _from_ns(blue.netns, green.ns_addr, port) == "connected"  # no filter yet
        assert _from_ns(ext, blue.ns_addr, port) == "connected"  # routed straight in
        nft.apply(nft.render(cfg, Color.BLUE, table=table, prefix=prefix))
        refused = {"ConnectionRefusedError", "OSError", "TimeoutError"}
        assert _from_ns(blue.netns, green.ns_addr, port) in refused
        assert _from_ns(green.netns, blue.ns_addr, port) in refused
        for _ in range(50):
            if _from_ns(blue.netns, ext_side, port) == "connected":
                break
            time.sleep(0.1)
        assert _from_ns(blue.netns, ext_side, port) == "connected"  # the outside world
        assert _from_ns(green.netns, ext_side, port) == "connected"
        # the host itself still reaches both colors (nginx, the health gate, the watchdog)
        with _connect((green.ns_addr, port)) as s:
            assert _tcp_ask(s.makefile("rwb"), b"hi") == b"green hi"
        # and another host reaches a color only through the DNAT, not directly
        assert _from_ns(ext, blue.ns_addr, port) in refused
    finally:
        if server is not None:
            stop(server)
        subprocess.run(["ip", "link", "delete", ext_if], check=False)
        subprocess.run(["ip", "netns", "delete", ext], check=False)
