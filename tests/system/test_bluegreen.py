"""Issue 3 end to end in a booted Debian 12: the sample backend deployed, upgraded blue/green
with a live call pinned to the old color, rolled back (gated and instant), a release that
never becomes healthy, one that fails probation, refused artifacts, a concurrent upgrade,
and a power cut in the middle of an upgrade. The tests run in order on one machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.appliance import (
    aipbxctl_json,
    assert_no_failed_units,
    hold_websocket,
    install,
    wait_until,
)
from tests.system.machine import Machine

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
SAMPLE_DIR = Path(os.environ.get("AIPBX_SAMPLE_DIR", HERE.parents[1] / "build" / "sample"))
V1 = "/root/aipbx-sample-1.0.0.tar.gz"
V2 = "/root/aipbx-sample-2.0.0.tar.gz"


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path) -> None:
    for v in ("1.0.0", "2.0.0"):
        for suffix in ("", ".sha256"):
            src = SAMPLE_DIR / f"aipbx-sample-{v}.tar.gz{suffix}"
            if not src.is_file():
                pytest.fail(f"{src} is missing: run `make sample`", pytrace=False)
            shutil.copy(src, machine.path("/root") / src.name)
    shutil.copy(HERE / "udp_probe.py", machine.path("/root") / "udp_probe.py")
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)


def api_version(machine: Machine, url: str = "http://127.0.0.1:5005/api") -> str:
    r = machine.run(["curl", "-sk", "--max-time", "5", url], check=False)
    try:
        return str(json.loads(r.stdout)["version"])
    except (ValueError, KeyError):
        return f"no version in {r.stdout[:200]!r}"


def write_through_nginx(machine: Machine, wid: str) -> dict[str, Any]:
    r = machine.run(
        [
            "curl",
            "-sk",
            "--max-time",
            "5",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"id": wid}),
            "https://127.0.0.1/api/writes",
        ]
    )
    return dict(json.loads(r.stdout))


def live_color(machine: Machine) -> str | None:
    st = json.loads(machine.run(["cat", "/var/lib/aipbx/state.json"]).stdout)
    color = st.get("live_color")
    return str(color) if color else None


def udp_version(machine: Machine) -> str:
    code = (
        "import socket;s=socket.socket(2,2);s.settimeout(2);"
        "s.sendto(b'x'*172,('127.0.0.1',3032));print(s.recv(2048).split(b' ')[0].decode())"
    )
    return machine.run(["python3", "-c", code]).stdout.strip()


def test_first_deploy(machine: Machine) -> None:
    _, out = aipbxctl_json(machine, "upgrade", V1, "--probation", "2", "--drain", "5", "--yes")
    assert out["ok"] and out["color"] == "blue" and out["release"] == "aipbx-sample-1.0.0"
    assert [s["step"] for s in out["steps"]][:2] == ["verify", "unpack"]
    assert api_version(machine) == "1.0.0"
    w = write_through_nginx(machine, "first-deploy-write")
    assert w["version"] == "1.0.0"
    assert udp_version(machine) == "1.0.0"
    _, rel = aipbxctl_json(machine, "releases")
    assert rel["live_color"] == "blue"
    assert [(r["release"], r["colors"], r["live"]) for r in rel["releases"]] == [
        ("aipbx-sample-1.0.0", ["blue"], True)
    ]
    # the backend runs as _aipbx in its own namespace, with the appliance's environment
    pid = machine.run(
        ["systemctl", "show", "-p", "MainPID", "--value", "aipbx-backend@blue.service"]
    ).stdout.strip()
    assert machine.run(["ps", "-o", "user=", "-p", pid]).stdout.strip() == "_aipbx"
    host_ns = machine.run(["readlink", "/proc/1/ns/net"]).stdout
    assert machine.run(["readlink", f"/proc/{pid}/ns/net"]).stdout != host_ns
    assert (
        machine.run(["systemctl", "is-enabled", "aipbx-backend@blue.service"]).stdout.strip()
        == "enabled"
    )
    assert_no_failed_units(machine)


def test_upgrade_pins_the_live_call_and_moves_new_calls(machine: Machine) -> None:
    machine.run(["rm", "-f", "/root/newflow", "/root/probe.json"])
    machine.run(
        [
            "systemd-run",
            "--unit",
            "udp-probe",
            "python3",
            "/root/udp_probe.py",
            "3032",
            "25",
            "/root/newflow",
            "/root/probe.json",
        ]
    )
    time.sleep(1)
    result: dict[str, Any] = {}

    def upgrade() -> None:
        result["code"], result["out"] = aipbxctl_json(
            machine, "upgrade", V2, "--probation", "3", "--drain", "8", "--yes", check=False
        )

    t = threading.Thread(target=upgrade)
    t.start()
    wait_until(lambda: live_color(machine) == "green", 120, "the switch to green")
    switched_at = time.time()
    machine.run(["touch", "/root/newflow"])
    t.join(180)
    assert result["code"] == 0, result
    out = result["out"]
    assert out["release"] == "aipbx-sample-2.0.0" and out["color"] == "green"
    steps = [s["step"] for s in out["steps"]]
    for step in ("verify", "unpack", "start", "health", "switch", "probation", "drain", "stop-old"):
        assert step in steps, (step, steps)
    assert out["switch_ms"] < 5000
    assert api_version(machine) == "2.0.0"
    assert write_through_nginx(machine, "after-upgrade")["version"] == "2.0.0"
    wait_until(lambda: machine.path("/root/probe.json").exists(), 60, "the UDP probe")
    probe = json.loads(machine.path("/root/probe.json").read_text())
    # clocks: the container shares the host's clock
    after_switch = [v for t_, v in probe["a"] if switched_at + 0.5 < t_ < switched_at + 5]
    assert after_switch and set(after_switch) == {"1.0.0"}, after_switch
    assert [v for _, v in probe["b"] if v] and {v for _, v in probe["b"] if v} == {"2.0.0"}
    # blue was cut at the drain deadline and stopped
    assert (
        machine.run(
            ["systemctl", "is-active", "aipbx-backend@blue.service"], check=False
        ).stdout.strip()
        == "inactive"
    )
    assert_no_failed_units(machine)


def test_rollback_starts_the_previous_release_when_it_is_down(machine: Machine) -> None:
    _, out = aipbxctl_json(machine, "rollback", "--probation", "1", "--drain", "3", "--yes")
    assert out["ok"] and out["instant"] is False
    assert out["release"] == "aipbx-sample-1.0.0" and out["color"] == "blue"
    assert api_version(machine) == "1.0.0"


def test_rollback_is_instant_while_the_old_color_drains(machine: Machine) -> None:
    result: dict[str, Any] = {}

    def upgrade() -> None:
        result["code"], result["out"] = aipbxctl_json(
            machine, "upgrade", V2, "--probation", "1", "--drain", "120", "--yes", check=False
        )

    # a WebSocket client through nginx keeps blue busy, so the upgrade waits in its drain
    hold_websocket(machine, "ws-hold")
    t = threading.Thread(target=upgrade)
    t.start()
    wait_until(lambda: live_color(machine) == "green", 120, "the switch to green")
    wait_until(
        lambda: json.loads(machine.run(["cat", "/var/lib/aipbx/state.json"]).stdout).get("draining")
        is not None,
        60,
        "the drain",
    )
    _, rb = aipbxctl_json(machine, "rollback", "--drain", "2", "--yes")
    assert rb["instant"] is True and rb["color"] == "blue"
    assert rb["rollback_ms"] < 5000
    assert api_version(machine) == "1.0.0"
    t.join(60)
    assert result["code"] == 0
    assert result["out"]["old_color"] == "rolled-back"
    machine.run(["systemctl", "stop", "ws-hold.service"])
    assert (
        machine.run(["systemctl", "is-active", "aipbx-backend@blue.service"]).stdout.strip()
        == "active"
    )
    assert_no_failed_units(machine)


def bad_release(machine: Machine, version: str, fail: str) -> str:
    """The v2 release re-packed by `aipbxctl release pack` with a failure knob."""
    machine.sh(f"""
        rm -rf /root/bad && cp -a /opt/aipbx/releases/aipbx-sample-2.0.0 /root/bad
        rm -f /root/bad/static
        sed -i 's/^version = .*/version = "{version}"/' /root/bad/aipbx-release.toml
        printf '\\n[env]\\nSAMPLE_FAIL = "{fail}"\\n' >> /root/bad/aipbx-release.toml
    """)
    return machine.run(["aipbxctl", "release", "pack", "/root/bad", "-o", "/root"]).stdout.strip()


def test_a_release_that_never_gets_healthy_leaves_the_live_color(machine: Machine) -> None:
    artifact = bad_release(machine, "3.0.0", "start")
    code, out = aipbxctl_json(
        machine,
        "upgrade",
        artifact,
        "--health-timeout",
        "10",
        "--probation",
        "1",
        "--drain",
        "1",
        "--yes",
        check=False,
    )
    assert code == 1 and not out["ok"]
    assert "never became healthy" in out["error"]
    assert "switch" not in [s["step"] for s in out["steps"]]
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    assert (
        machine.run(
            ["systemctl", "is-active", "aipbx-backend@green.service"], check=False
        ).stdout.strip()
        != "active"
    )


def test_a_release_failing_in_probation_is_switched_back(machine: Machine) -> None:
    artifact = bad_release(machine, "3.1.0", "after:3")
    code, out = aipbxctl_json(
        machine, "upgrade", artifact, "--probation", "15", "--drain", "1", "--yes", check=False
    )
    assert code == 1 and "failed probation" in out["error"], out
    assert "rollback_ms" in out
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    journal = machine.run(["journalctl", "-t", "aipbxctl", "--no-pager", "-p", "crit"]).stdout
    assert "failed in probation" in journal


def test_a_reboot_brings_up_exactly_the_live_color(machine: Machine) -> None:
    assert live_color(machine) == "blue"
    machine.shutdown()
    machine.boot()
    wait_until(lambda: api_version(machine) == "1.0.0", 60, "blue serving after boot")
    states = {
        c: machine.run(
            ["systemctl", "is-active", f"aipbx-backend@{c}.service"], check=False
        ).stdout.strip()
        for c in ("blue", "green")
    }
    assert states == {"blue": "active", "green": "inactive"}
    assert udp_version(machine) == "1.0.0"
    assert_no_failed_units(machine)


def test_aipbxctl_killed_mid_upgrade_leaves_the_live_color(machine: Machine) -> None:
    slow = bad_release(machine, "3.2.0", "hang-after:0")  # starts, never answers
    proc = threading.Thread(
        target=lambda: machine.run(
            ["aipbxctl", "upgrade", slow, "--health-timeout", "60", "--yes"],
            check=False,
            timeout=120,
        ),
        daemon=True,
    )
    proc.start()
    wait_until(
        lambda: machine.run(
            ["systemctl", "is-active", "aipbx-backend@green.service"], check=False
        ).stdout.strip()
        == "active",
        60,
        "green started",
    )
    machine.run(["pkill", "-KILL", "-f", "aipbxctl upgrade"])
    proc.join(30)
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    status = json.loads(machine.run(["aipbxctl", "status", "--json"]).stdout)
    assert status["upgrading"] == "aipbx-sample-3.2.0"
    out = machine.run(["aipbxctl", "reconcile"]).stdout
    assert "interrupted upgrade" in out and "stopped aipbx-backend@green.service" in out
    status = json.loads(machine.run(["aipbxctl", "status", "--json"]).stdout)
    assert status["upgrading"] is None and status["live_color"] == "blue"
    assert api_version(machine) == "1.0.0"
    assert_no_failed_units(machine)


def test_refused_artifacts_leave_nothing(machine: Machine) -> None:
    before = sorted(os.listdir(machine.path("/opt/aipbx/releases")))
    machine.sh(
        "cp /root/aipbx-sample-2.0.0.tar.gz /root/tampered.tar.gz && "
        "echo '0000000000000000000000000000000000000000000000000000000000000000  "
        "tampered.tar.gz' > /root/tampered.tar.gz.sha256"
    )
    r = machine.run(["aipbxctl", "upgrade", "/root/tampered.tar.gz", "--yes"], check=False)
    assert r.returncode == 2 and "checksum" in r.stderr, r.stderr
    machine.run(
        [
            "python3",
            "-c",
            """
import hashlib, io, tarfile
with tarfile.open('/root/evil.tar.gz', 'w:gz') as t:
    m = b'name = "evil"\\nversion = "1.0"\\nkind = "backend"\\ncommand = ["true"]\\n'
    i = tarfile.TarInfo('aipbx-release.toml'); i.size = len(m); t.addfile(i, io.BytesIO(m))
    i = tarfile.TarInfo('../../etc/cron.d/evil'); i.size = 1; t.addfile(i, io.BytesIO(b'x'))
h = hashlib.sha256(open('/root/evil.tar.gz', 'rb').read()).hexdigest()
open('/root/evil.tar.gz.sha256', 'w').write(h + '  evil.tar.gz\\n')
""",
        ]
    )
    r = machine.run(["aipbxctl", "upgrade", "/root/evil.tar.gz", "--yes"], check=False)
    assert r.returncode == 2 and ".." in r.stderr, r.stderr
    assert machine.run(["test", "-e", "/etc/cron.d/evil"], check=False).returncode == 1
    assert sorted(os.listdir(machine.path("/opt/aipbx/releases"))) == before
    assert live_color(machine) == "blue"


def test_a_second_concurrent_upgrade_is_refused(machine: Machine) -> None:
    machine.run(
        ["systemd-run", "--unit", "hold-lock", "flock", "/run/aipbx/mutation.lock", "sleep", "20"]
    )
    time.sleep(0.5)
    r = machine.run(["aipbxctl", "upgrade", V2, "--yes"], check=False)
    machine.run(["systemctl", "stop", "hold-lock.service"], check=False)
    assert r.returncode == 3 and "in progress" in r.stderr, r.stderr


def _pack_on_host(tmp: Path, *args: str) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "release", "pack", *args, "-o", str(tmp)],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parents[1],
    )
    return Path(out.stdout.strip())


def test_a_node_backend_with_its_own_runtime(machine: Machine, tmp_path: Path) -> None:
    """The real backend's shape: `node dist/main.js`, WebSocket on 3033 hard-coded, packed
    unmodified with its own `node` (the machine has no Node.js), JIT allowed by the unit."""
    app = tmp_path / "aiPBX_backend"
    shutil.copytree(HERE / "node_backend", app)
    node = shutil.which("node")
    assert node, "the host needs node to build this release (packaging/host-packages.txt)"
    (app / "runtime" / "bin").mkdir(parents=True)
    shutil.copy(os.path.realpath(node), app / "runtime" / "bin" / "node")
    artifact = _pack_on_host(
        tmp_path,
        str(app),
        "--name",
        "aipbx-node",
        "--version",
        "1.0.0",
        "--command",
        "node dist/main.js",
        "--runtime",
        "runtime/bin",
    )
    for f in (artifact, Path(f"{artifact}.sha256")):
        shutil.copy(f, machine.path("/root") / f.name)
    assert machine.run(["sh", "-c", "command -v node"], check=False).returncode != 0
    _, out = aipbxctl_json(
        machine, "upgrade", f"/root/{artifact.name}", "--probation", "2", "--drain", "2", "--yes"
    )
    assert out["ok"] and out["release"] == "aipbx-node-1.0.0"
    assert api_version(machine).startswith("node-v")
    assert udp_version(machine).startswith("node-v")
    answer = json.loads(machine.run(["curl", "-s", "http://127.0.0.1:5005/api"]).stdout)
    assert answer["color"] == out["color"] and answer["db_host"].startswith("10.203.0.")
    _, back = aipbxctl_json(
        machine,
        "rollback",
        "--to",
        "aipbx-sample-1.0.0",
        "--probation",
        "1",
        "--drain",
        "2",
        "--yes",
    )
    assert back["release"] == "aipbx-sample-1.0.0" and api_version(machine) == "1.0.0"


def test_a_frontend_release_switches_the_spa(machine: Machine, tmp_path: Path) -> None:
    for version in ("1.0.0", "1.1.0"):
        build = tmp_path / f"build-{version}"
        (build / "static").mkdir(parents=True)
        (build / "index.html").write_text(f"<html>aiPBX frontend {version}</html>\n")
        (build / "static" / "app.js").write_text(f"console.log('{version}')\n")
        # a lazily loaded chunk, by its content hash (each release has its own)
        (build / f"412.{version.replace('.', '')}.js").write_text(f"chunk {version}\n")
        artifact = _pack_on_host(
            tmp_path,
            str(build),
            "--name",
            "aipbx-frontend",
            "--version",
            version,
            "--kind",
            "frontend",
        )
        for f in (artifact, Path(f"{artifact}.sha256")):
            shutil.copy(f, machine.path("/root") / f.name)
        _, out = aipbxctl_json(machine, "upgrade", f"/root/{artifact.name}", "--yes")
        assert out["ok"] and out["kind"] == "frontend"
        page = machine.run(["curl", "-sk", "https://127.0.0.1/"]).stdout
        assert f"aiPBX frontend {version}" in page
        # SPA fallback: an app route serves index.html
        assert (
            f"frontend {version}"
            in machine.run(["curl", "-sk", "https://127.0.0.1/calls/42"]).stdout
        )
    link = machine.run(["readlink", "/opt/aipbx/frontend/current"]).stdout.strip()
    assert link.endswith("aipbx-frontend-1.1.0"), link
    # a tab opened on 1.0.0 still gets its chunk from 1.1.0's site, cached for good; pages
    # are asked again at every load
    head = machine.run(["curl", "-sk", "-D", "-", "https://127.0.0.1/412.100.js"]).stdout
    assert head.startswith("HTTP/2 200") and head.endswith("chunk 1.0.0\n"), head
    assert "cache-control: public, immutable" in head.lower(), head
    assert "chunk 1.1.0" in machine.run(["curl", "-sk", "https://127.0.0.1/412.110.js"]).stdout
    page = machine.run(["curl", "-sk", "-D", "-", "https://127.0.0.1/"]).stdout.lower()
    assert "cache-control: no-cache" in page and "frontend 1.1.0" in page, page


def test_power_cut_mid_upgrade_heals_at_boot(machine: Machine) -> None:
    def upgrade() -> None:
        aipbxctl_json(
            machine,
            "upgrade",
            V2,
            "--probation",
            "30",
            "--drain",
            "5",
            "--yes",
            check=False,
            timeout=120,
        )

    t = threading.Thread(target=upgrade, daemon=True)
    t.start()
    wait_until(lambda: live_color(machine) == "green", 120, "the switch to green")
    machine.poweroff_hard()
    t.join(30)
    machine.boot()
    assert live_color(machine) == "green"
    wait_until(lambda: api_version(machine) == "2.0.0", 60, "green serving after boot")
    assert udp_version(machine) == "2.0.0"
    assert write_through_nginx(machine, "after-power-cut")["version"] == "2.0.0"
    r = machine.run(["aipbxctl", "reconcile"])
    assert r.returncode == 0
    assert_no_failed_units(machine)
