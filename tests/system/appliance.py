"""Steps the system tests share: install the .deb, set up, check for failed units."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.system.machine import Machine

DEB_IN = "/root/aipbx-appliance.deb"
HERE = Path(__file__).resolve().parent
SAMPLE_DIR = Path(os.environ.get("AIPBX_SAMPLE_DIR", HERE.parents[1] / "build" / "sample"))


def install(machine: Machine, deb: Path) -> str:
    shutil.copy(deb, machine.path("/root") / "aipbx-appliance.deb")
    r = machine.run(
        ["apt-get", "install", "-y", "--no-install-recommends", DEB_IN],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=300,
    )
    return r.stdout + r.stderr


def copy_sample(machine: Machine, *versions: str) -> None:
    """The sample backend's artifacts (`make sample`) and their .sha256, into /root."""
    for v in versions:
        for suffix in ("", ".sha256"):
            src = SAMPLE_DIR / f"aipbx-sample-{v}.tar.gz{suffix}"
            if not src.is_file():
                raise AssertionError(f"{src} is missing: run `make sample`")
            shutil.copy(src, machine.path("/root") / src.name)


def backend_environ(machine: Machine, color: str) -> dict[str, str]:
    """The environment of a color's backend (its main process), from /proc."""
    pid = machine.run(
        ["systemctl", "show", "-p", "MainPID", "--value", f"aipbx-backend@{color}.service"]
    ).stdout.strip()
    text = machine.run(["cat", f"/proc/{pid}/environ"]).stdout
    return dict(kv.split("=", 1) for kv in text.split("\0") if "=" in kv)


def hold_websocket(machine: Machine, unit: str, url: str = "wss://127.0.0.1/ws/") -> None:
    """A WebSocket client through nginx, held open for 10 minutes by the transient unit
    `unit` (`systemctl stop UNIT` ends it): it keeps the color that answered it busy, so a
    drain waits for it."""
    machine.run(
        [
            "systemd-run",
            "--unit",
            unit,
            "python3",
            "-c",
            "import asyncio,aiohttp\n"
            "async def m():\n"
            " async with aiohttp.ClientSession() as s:\n"
            f"  async with s.ws_connect({url!r}, ssl=False) as ws:\n"
            "   await asyncio.sleep(600)\n"
            "asyncio.run(m())",
        ]
    )


def assert_no_failed_units(machine: Machine) -> None:
    failed = machine.run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout.strip()
    if failed:
        journal = machine.run(["journalctl", "-n", "80", "--no-pager"]).stdout
        raise AssertionError(f"failed units:\n{failed}\n{journal}")


def aipbxctl_json(
    machine: Machine,
    *args: str,
    check: bool = True,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    r = machine.run(["aipbxctl", *args, "--json"], check=False, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(
            f"aipbxctl {' '.join(args)} exited {r.returncode}\n" f"{r.stdout}\n{r.stderr}"
        )
    try:
        data = json.loads(r.stdout) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {r.stdout}\n{r.stderr}") from None
    return r.returncode, data


def health(machine: Machine) -> dict[str, Any] | None:
    """The watchdog's /system-health, or None while it does not answer."""
    r = machine.run(
        ["curl", "-s", "--max-time", "2", "http://127.0.0.1:6030/system-health"], check=False
    )
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.3) -> Any:
    """Poll until pred() is truthy and return what it gave; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
