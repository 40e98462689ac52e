"""`make demo`: build the .deb (done by make), boot Debian 12 under systemd-nspawn, install
the appliance with apt, set it up, and print what happened. KEEP=1 leaves the machine
running and prints how to enter it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from tests.system.machine import Machine, ensure_rootfs, harness_problem

TOP = Path(__file__).resolve().parents[1]


def step(title: str, t0: float) -> None:
    print(f"\n== {title}  (+{time.monotonic() - t0:.1f}s)", flush=True)


def main() -> int:
    problem = harness_problem()
    if problem:
        print(f"demo: cannot boot a machine: {problem}", file=sys.stderr)
        return 1
    deb = Path(os.environ["AIPBX_DEB"])
    t0 = time.monotonic()
    step("preparing the Debian 12 rootfs (cached after the first run)", t0)
    rootfs = ensure_rootfs(TOP / "build" / "cache")
    keep = os.environ.get("KEEP") == "1"
    m = Machine(rootfs)
    report: dict[str, object] = {}
    try:
        m.__enter__()
        step(f"booted {m.name} (systemd as PID 1, private network)", t0)
        shutil.copy(deb, m.path("/root") / deb.name)
        step(f"apt install ./{deb.name}", t0)
        m.run(
            ["apt-get", "install", "-y", f"/root/{deb.name}"],
            env={"DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
        )
        step("aipbxctl setup --domain pbx.example.test --email ops@example.test", t0)
        print(
            m.run(
                [
                    "aipbxctl",
                    "setup",
                    "--domain",
                    "pbx.example.test",
                    "--email",
                    "ops@example.test",
                ],
                timeout=300,
            ).stdout
        )
        step("aipbxctl setup (again: nothing to change)", t0)
        print(m.run(["aipbxctl", "setup"]).stdout)
        step("aipbxctl status", t0)
        print(m.run(["aipbxctl", "status"]).stdout)
        step("curl -skI https://127.0.0.1/api/", t0)
        print(m.run(["curl", "-skI", "https://127.0.0.1/api/"]).stdout)
        step("aipbxctl doctor", t0)
        doctor = m.run(["aipbxctl", "doctor"], check=False)
        print(doctor.stdout)
        report = {
            "status": json.loads(m.run(["aipbxctl", "status", "--json"]).stdout),
            "doctor_exit": doctor.returncode,
            "elapsed_s": round(time.monotonic() - t0, 1),
        }
        out = TOP / "build" / "demo" / "report.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        step(f"done; report in {out.relative_to(TOP)}", t0)
        if keep:
            print(
                f"machine left running: nsenter -t {m.pid1} -a bash   (stop: kill {m.nspawn_pid})"
            )
    finally:
        if not keep:
            m.close()
    return 0 if report.get("doctor_exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
