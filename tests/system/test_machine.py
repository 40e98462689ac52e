"""The harness itself: a real Debian 12 boots with systemd as PID 1, in its own network
namespace, with the product's dependencies installed, and its disk survives a power cut."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from tests.system.machine import Machine
from tests.system.rootfs import read_packages

pytestmark = pytest.mark.system


def test_systemd_is_pid1(machine: Machine) -> None:
    assert machine.run(["readlink", "/proc/1/exe"]).stdout.strip().endswith("/systemd")
    assert machine.run(["ps", "-p", "1", "-o", "comm="]).stdout.strip() == "systemd"
    assert Path(f"/proc/{machine.pid1}/comm").read_text().strip() == "systemd"


def test_boot_finished(machine: Machine) -> None:
    state = machine.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    failed = machine.failed_units()
    assert state in ("running", "degraded"), f"state {state!r}, failed units: {failed}"
    if state == "degraded":
        details = "\n".join(machine.journal(unit)[-2000:] for unit in failed)
        warnings.warn(f"{machine.name} is degraded; failed: {failed}\n{details}", stacklevel=1)


def test_product_services_installed_and_running(machine: Machine) -> None:
    status = machine.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\\n", "nginx", "postgresql", "pgbouncer"]
    ).stdout.splitlines()
    assert sorted(status) == [
        "nginx install ok installed",
        "pgbouncer install ok installed",
        "postgresql install ok installed",
    ]
    # Debian ships them enabled; the base image leaves them so.
    units = ["nginx.service", "postgresql.service", "pgbouncer.service"]
    active = machine.run(["systemctl", "is-active", *units], check=False).stdout.split()
    assert active == ["active"] * 3, "\n".join(
        [f"is-active: {active}"] + [machine.journal(u)[-1500:] for u in units]
    )
    # postgresql's postinst created the default cluster during the image build.
    assert "online" in machine.run(["pg_lsclusters", "--no-header"]).stdout


def test_own_network_namespace(machine: Machine) -> None:
    links = machine.run(["ip", "-o", "link"]).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"], links
    inside = machine.run(["readlink", "/proc/self/ns/net"]).stdout.strip()
    host = os.readlink("/proc/self/ns/net")
    assert inside == os.readlink(f"/proc/{machine.pid1}/ns/net")
    assert inside != host
    assert machine.run(["ip", "-4", "route"]).stdout.strip() == ""


def test_apt_installs_a_local_deb_without_network(machine: Machine) -> None:
    """What the .deb tests rely on: every dependency is already installed, so apt needs no
    network. A probe package depending on the whole pre-installed list proves it."""
    control = (
        "Package: aipbx-harness-probe\n"
        "Version: 1.0\n"
        "Architecture: all\n"
        "Maintainer: harness <harness@aipbx.invalid>\n"
        f"Depends: {', '.join(read_packages())}\n"
        "Description: probe for the system-test harness\n"
    )
    machine.sh(
        'd=$(mktemp -d) && mkdir "$d/DEBIAN" && cat > "$d/DEBIAN/control"'
        ' && dpkg-deb --build "$d" /root/aipbx-harness-probe.deb && rm -rf "$d"',
        input=control,
    )
    # No --no-download: apt refuses it with a local .deb. The machine has no network, so a
    # dependency that is not installed already fails the install anyway.
    machine.run(
        ["apt-get", "install", "-y", "/root/aipbx-harness-probe.deb"],
        env={"DEBIAN_FRONTEND": "noninteractive"},
    )
    assert (
        "install ok installed"
        in machine.run(["dpkg-query", "-W", "-f=${Status}", "aipbx-harness-probe"]).stdout
    )
    machine.run(["apt-get", "purge", "-y", "aipbx-harness-probe"])
    machine.run(["rm", "/root/aipbx-harness-probe.deb"])


def test_copy_in_and_path(machine: Machine, tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_text("from the host\n")
    placed = machine.copy_in(src, "/root/")
    assert placed == machine.path("/root/hello.txt")
    assert machine.run(["cat", "/root/hello.txt"]).stdout == "from the host\n"
    # /var/run is an absolute link to /run: it must resolve inside the machine (where /run is
    # a tmpfs with no host path), never to the host's /run.
    with pytest.raises(ValueError):
        machine.path("/var/run/x")
    assert machine.path("/etc/../etc/hostname") == machine.root / "etc/hostname"


def test_two_machines_at_once(machine: Machine, rootfs: Path) -> None:
    machine.sh("echo first > /root/who")
    with Machine(rootfs) as other:
        assert other.name != machine.name
        assert other.workdir != machine.workdir
        assert other.pid1 != machine.pid1
        assert not other.path("/root/who").exists()
        other.sh("echo second > /root/who")
        assert machine.run(["cat", "/root/who"]).stdout == "first\n"
        assert other.failed_units() == []
        workdir, nspawn_pid, pid1 = other.workdir, other.nspawn_pid, other.pid1
    assert not workdir.exists()
    assert not Path(f"/proc/{nspawn_pid}").exists()
    assert not Path(f"/proc/{pid1}").exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(workdir) not in mounts
    assert machine.run(["cat", "/root/who"]).stdout == "first\n"


def test_clean_shutdown_and_boot_again(machine: Machine) -> None:
    machine.sh("echo 'before a clean reboot' > /var/lib/reboot-probe")
    machine.shutdown()
    assert not machine.running
    machine.boot()
    assert machine.run(["cat", "/var/lib/reboot-probe"]).stdout == "before a clean reboot\n"
    assert machine.failed_units() == []


def test_power_cut_keeps_synced_file(machine: Machine) -> None:
    machine.sh("echo 'written before the power cut' > /var/lib/power-cut-probe && sync")
    old_pid1 = machine.pid1
    machine.poweroff_hard()
    assert not machine.running
    assert not Path(f"/proc/{old_pid1}").exists()
    machine.boot()
    print(f"boot after the power cut: {machine.last_boot_seconds:.2f} s")
    assert machine.pid1 != old_pid1
    assert machine.run(["cat", "/var/lib/power-cut-probe"]).stdout == (
        "written before the power cut\n"
    )
    state = machine.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded"), machine.failed_units()
