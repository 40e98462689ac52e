"""What the real aiPBX backend's system test and `make demo APP=real` share: its artifacts
(built and packed by `make realapp`), its environment, and how to read, from inside the
machine, which color each Socket.IO connection and each RTP flow reaches (conntrack)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from appliance.colors import Color, color_net
from tests.system.appliance import aipbxctl_json, wait_until
from tests.system.machine import Machine

HERE = Path(__file__).resolve().parent
REALAPP_DIR = Path(os.environ.get("AIPBX_REALAPP_DIR", HERE.parents[1] / "build" / "realapp"))
SUBNET = "10.203.0.0/24"  # the package's default [network] subnet
HTTP_PORT, WS_PORT, UDP_PORT = 5005, 3033, 3032
DB = "aipbx_production"
APP_ENV = {
    # the two the app refuses to start without (dummy values do), and the admin account
    # /api/prices/public looks up
    "OPENAI_API_KEY": "sk-test-not-a-real-key",
    "STRIPE_SECRET_KEY": "sk_test_not_a_real_key",
    "ADMIN_EMAIL": "admin@example.invalid",
}
# What the load asks: the app's health route (404 from Nest), a file the release ships in
# its shared static/ dir, and a route that reads the database through PgBouncer.
LOAD_PATHS = ("/api/", "/static/invoice-pechat.jpg", "/api/prices/public")


class NotBuilt(Exception):
    """`make realapp` has not been run."""


def app_info(realapp_dir: Path = REALAPP_DIR) -> dict[str, Any]:
    """What tests/realapp/pack-backend.sh packed: app, commit, v1, v2."""
    info = realapp_dir / "app.json"
    if not info.is_file():
        raise NotBuilt(f"{info} is missing: run `make realapp`")
    doc: dict[str, Any] = json.loads(info.read_text())
    return doc


def artifact(version: str) -> str:
    """Where copy_in() puts a release artifact in the machine."""
    return f"/root/aipbx-{version}.tar.gz"


def copy_in(machine: Machine, app: dict[str, Any], realapp_dir: Path = REALAPP_DIR) -> None:
    """Both artifacts (with their .sha256) and the load script, into the machine's /root."""
    for v in (app["v1"], app["v2"]):
        for suffix in ("", ".sha256"):
            src = realapp_dir / f"aipbx-{v}.tar.gz{suffix}"
            if not src.is_file():
                raise NotBuilt(f"{src} is missing: run `make realapp`")
            shutil.copy(src, machine.path("/root") / src.name)
    shutil.copy(HERE / "realapp_load.py", machine.path("/root") / "realapp_load.py")


# --- helpers -------------------------------------------------------------------------


def state(machine: Machine) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(machine.path("/var/lib/aipbx/state.json").read_text())
    return doc


def live_color(machine: Machine) -> str | None:
    color = state(machine).get("live_color")
    return str(color) if color else None


def curl(machine: Machine, path: str, *extra: str) -> tuple[int, dict[str, list[str]], bytes]:
    """Status, headers (lower-case name -> every value) and body of a GET through nginx."""
    r = machine.run(
        [
            "sh",
            "-c",
            'curl -sk --max-time 10 -D /root/h.txt -o /root/b.bin "$@"; cat /root/h.txt',
            "curl",
            *extra,
            f"https://127.0.0.1{path}",
        ]
    )
    lines = r.stdout.replace("\r", "").split("\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
    return status, headers, machine.path("/root/b.bin").read_bytes()


def psql(machine: Machine, sql: str) -> str:
    return machine.run(
        ["runuser", "-u", "postgres", "--", "psql", "-XAtq", "-d", DB, "-c", sql]
    ).stdout.strip()


def addr(color: str) -> str:
    return color_net(SUBNET, Color(color)).ns_addr


def ws_on(machine: Machine, color: str) -> int:
    """Established connections nginx holds to `color`'s WebSocket port (conntrack)."""
    out = machine.run(
        [
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--state",
            "ESTABLISHED",
            "--reply-src",
            addr(color),
            "--reply-port-src",
            str(WS_PORT),
        ],
        check=False,
    ).stdout
    return sum(1 for line in out.splitlines() if line.startswith("tcp"))


def udp_targets(machine: Machine) -> dict[int, str]:
    """RTP flows by their source port -> the color conntrack sends them to."""
    out = machine.run(
        ["conntrack", "-L", "-p", "udp", "--orig-port-dst", str(UDP_PORT)], check=False
    ).stdout
    colors = {addr(c): c for c in ("blue", "green")}
    found: dict[int, str] = {}
    for line in out.splitlines():
        sport = re.search(r"sport=(\d+)", line)
        srcs = re.findall(r"src=(\S+)", line)
        if sport and len(srcs) >= 2:
            found[int(sport.group(1))] = colors.get(srcs[1], srcs[1])
    return found


def progress(machine: Machine) -> dict[str, Any]:
    p = machine.path("/root/load-progress.json")
    try:
        doc: dict[str, Any] = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return doc


def start_load(
    machine: Machine,
    name: str,
    duration: float,
    *,
    sio: int = 10,
    http_rps: float = 20,
    udp_flows: int = 4,
) -> None:
    for f in ("load-progress.json", f"{name}.json", "load-more", "load-stop"):
        machine.run(["rm", "-f", f"/root/{f}"])
    argv = [
        "systemd-run",
        "--unit",
        f"load-{name}",
        "--collect",
        "python3",
        "/root/realapp_load.py",
    ]
    for p in LOAD_PATHS:
        argv += ["--http-path", p]
    argv += [
        "--http-rps",
        str(http_rps),
        "--sio",
        str(sio),
        "--sio-more",
        "5",
        "--udp-flows",
        str(udp_flows),
        "--udp-more",
        "2",
        "--more-file",
        "/root/load-more",
        "--stop-file",
        "/root/load-stop",
        "--duration",
        str(duration),
        "--progress",
        "/root/load-progress.json",
        "--out",
        f"/root/{name}.json",
    ]
    machine.run(argv)
    wait_until(lambda: progress(machine).get("connected") == sio, 60, f"{sio} Socket.IO clients")


def stop_load(machine: Machine, name: str) -> dict[str, Any]:
    machine.run(["touch", "/root/load-stop"])
    out = machine.path(f"/root/{name}.json")
    wait_until(out.exists, 60, "the load's report")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def upgrade_in_thread(machine: Machine, *args: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def go() -> None:
        result["code"], result["out"] = aipbxctl_json(machine, *args, "--yes", check=False)

    t = threading.Thread(target=go)
    t.start()
    return t, result


def jwt(secret: str, payload: dict[str, Any]) -> str:
    """An HS256 token as the app's JwtModule signs them (its secret is PRIVATE_KEY)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def env_file(machine: Machine) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in machine.path("/etc/aipbx/backend.env").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out
