"""Issue 11 items 11-13 in a booted Debian 12 with the sample backend: a rollout meets a
fault and leaves state.json and the host in agreement, with one line to say what happened.

/var/lib/aipbx full before a rollout starts (refused, nothing changed, audited);
`aipbxctl` SIGKILLed right after the switch (reconcile resumes the probation, then the old
color's drain to its deadline, then its stop; another upgrade meanwhile is refused), the
same with a release that fails in its probation (reconcile switches back), and followed by
a reboot (both are over: doctor says so, reconcile records it at once); a corrupt
state.json (status and the rollouts refuse naming it, doctor reports it); a downgrade
(refused without --yes, deployed with it; rollback says what it does); PostgreSQL stopped
during a migration and before a migrating upgrade (named, never "runuser exited"). The
tests run in order on one machine, each putting back what it broke; the messages are
printed at the end (FIGURES)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.colors import Color, color_net
from tests.system.appliance import (
    aipbxctl_json,
    assert_no_failed_units,
    copy_sample,
    hold_websocket,
    install,
    wait_until,
)
from tests.system.machine import Machine
from tests.system.test_bluegreen import V1, V2, api_version, bad_release, live_color
from tests.system.test_database import migrating_release

pytestmark = pytest.mark.system

STATE = "/var/lib/aipbx/state.json"
MARKER = "/tmp/faults-migrating"
SUBNET = "10.203.0.0/24"  # aipbx.toml's default [network] subnet
WS_PORT = 3033
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path) -> None:
    copy_sample(machine, "1.0.0", "2.0.0")
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)
    aipbxctl_json(machine, "upgrade", V1, "--probation", "1", "--drain", "1", "--yes")
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"


# --- helpers ----------------------------------------------------------------------------------


def state_text(machine: Machine) -> str:
    return machine.run(["cat", STATE]).stdout


def state(machine: Machine) -> dict[str, Any]:
    return dict(json.loads(state_text(machine)))


def nft_table(machine: Machine) -> str:
    """The switch, without counters (-s): what a rollout changes, not what traffic does."""
    return machine.run(["nft", "-s", "list", "table", "inet", "aipbx"]).stdout


def is_active(machine: Machine, unit: str) -> str:
    return machine.run(["systemctl", "is-active", unit], check=False).stdout.strip()


def start(machine: Machine, unit: str) -> None:
    """systemctl start, failing with what the unit logged."""
    r = machine.run(["systemctl", "start", unit], check=False, timeout=180)
    if r.returncode != 0:
        log = machine.run(["journalctl", "-u", unit, "-n", "60", "--no-pager"], check=False)
        raise AssertionError(f"systemctl start {unit}: {r.stderr}\n{log.stdout}")


def releases_dir(machine: Machine) -> list[str]:
    return sorted(machine.run(["ls", "-A", "/opt/aipbx/releases"]).stdout.split())


def websockets_on(machine: Machine, color: Color) -> int:
    """Established WebSocket connections nginx holds to `color` (conntrack's view, as the
    drain counts them)."""
    addr = color_net(SUBNET, color).ns_addr
    out = machine.run(
        [
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--state",
            "ESTABLISHED",
            "--reply-src",
            addr,
            "--reply-port-src",
            str(WS_PORT),
        ],
        check=False,
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


def kill_after_switch(machine: Machine, unit: str, to: str, *args: str) -> str:
    """`aipbxctl ARGS --yes` (an upgrade, a restart) run by a transient unit, SIGKILLed as
    soon as its log shows the switch to `to`. Returns what it had printed."""
    machine.run(["systemd-run", "--collect", "--unit", unit, "aipbxctl", *args, "--yes"])

    def switched() -> str | None:
        running = is_active(machine, f"{unit}.service") == "active"
        log = machine.run(["journalctl", "-u", f"{unit}.service", "-o", "cat", "--no-pager"])
        if f"live color is now {to}" in log.stdout:
            return log.stdout
        assert running, f"aipbxctl {' '.join(args)} ended before its switch:\n{log.stdout}"
        return None

    printed = str(wait_until(switched, 180, f"{unit}'s switch to {to}", poll=0.1))
    machine.run(["systemctl", "kill", "-s", "KILL", f"{unit}.service"])
    wait_until(lambda: is_active(machine, f"{unit}.service") != "active", 30, f"{unit} gone")
    return printed


@contextlib.contextmanager
def small_var(machine: Machine, size_mb: int = 64) -> Iterator[None]:
    """/var/lib/aipbx on a tmpfs of its own (its content copied), so filling it never fills
    the file system the machine's disk (an overlay in the host's build dir) lives on. Its
    content, as the appliance left it, goes back to the disk afterwards."""
    machine.sh(f"""
        rm -rf /run/faults-var && mkdir /run/faults-var
        cp -a /var/lib/aipbx/. /run/faults-var/
        mount -t tmpfs -o size={size_mb}m aipbx-faults /var/lib/aipbx
        chown --reference=/run/faults-var /var/lib/aipbx
        chmod --reference=/run/faults-var /var/lib/aipbx
        cp -a /run/faults-var/. /var/lib/aipbx/
    """)
    try:
        yield
    finally:
        machine.sh("""
            rm -f /var/lib/aipbx/filler
            rm -rf /run/faults-var && mkdir /run/faults-var
            cp -a /var/lib/aipbx/. /run/faults-var/
            umount /var/lib/aipbx || umount -l /var/lib/aipbx
            cp -a /run/faults-var/. /var/lib/aipbx/
            rm -rf /run/faults-var
        """)


def mark(machine: Machine) -> str:
    """Now, as journalctl's --since takes it."""
    return "@" + machine.run(["date", "+%s"]).stdout.strip()


def journal_since(machine: Machine, since: str, *args: str) -> str:
    argv = ["journalctl", "--since", since, "-o", "cat", "--no-pager", *args]
    return machine.run(argv).stdout


def assert_no_tracebacks(machine: Machine, since: str) -> None:
    """Nothing on the machine (aipbxctl, the watchdog, a unit's ExecStartPost) logged a
    Python traceback since `since`."""
    text = journal_since(machine, since)
    at = text.find("Traceback (most recent call last)")
    assert at < 0, text[max(0, at - 2000) : at + 3000]


def one_line_error(r: subprocess.CompletedProcess[str], starts: str) -> str:
    """The error of a failed aipbxctl: one `aipbxctl:` line (and a hint), no traceback."""
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    errors = [line for line in r.stderr.splitlines() if line.startswith("aipbxctl: ")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"aipbxctl: {starts}"), r.stderr
    assert "\nhint: " in f"\n{r.stderr}", r.stderr
    return errors[0]


# --- 11: the disk --------------------------------------------------------------------------


def test_a_full_disk_refuses_the_upgrade_before_anything_changes(machine: Machine) -> None:
    with small_var(machine):
        machine.sh(
            "avail=$(df --output=avail -B1 /var/lib/aipbx | tail -1); "
            "fallocate -l $((avail - 8*1024*1024)) /var/lib/aipbx/filler"
        )
        before = (state_text(machine), nft_table(machine), releases_dir(machine))
        since = mark(machine)
        r = machine.run(["aipbxctl", "upgrade", V2, "--yes"], check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        line = one_line_error(r, "not enough disk space to upgrade")
        assert "/var/lib/aipbx has" in line and "nothing was changed" in line, line
        FIGURES["disk_full_upgrade"] = line
        assert (state_text(machine), nft_table(machine), releases_dir(machine)) == before
        assert not [n for n in releases_dir(machine) if n.startswith(".unpack")]
        audit = journal_since(machine, since, "-t", "aipbxctl")
        assert "audit: upgrade by root: failed" in audit and "not enough disk space" in audit
        # the other rollouts check the same before they change anything
        for argv, verb in ((["restart", "--yes"], "restart"), (["rollback", "--yes"], "roll back")):
            r = machine.run(["aipbxctl", *argv], check=False)
            assert r.returncode == 1, (argv, r.stdout, r.stderr)
            one_line_error(r, f"not enough disk space to {verb}")
        assert (state_text(machine), nft_table(machine), releases_dir(machine)) == before
        assert_no_tracebacks(machine, since)
    assert live_color(machine) == "blue" and api_version(machine) == "1.0.0"
    assert machine.run(["test", "-e", "/var/lib/aipbx/filler"], check=False).returncode == 1
    assert_no_failed_units(machine)


# --- 12: killed right after the switch ----------------------------------------------------


def test_killed_after_the_switch_reconcile_resumes_probation_then_drain(machine: Machine) -> None:
    hold_websocket(machine, "faults-ws")
    try:
        wait_until(lambda: websockets_on(machine, Color.BLUE) >= 1, 30, "a WebSocket on blue")
        printed = kill_after_switch(
            machine, "upk", "green", "upgrade", V2, "--probation", "20", "--drain", "15"
        )
        assert "probation:" not in printed.split("live color is now green", 1)[1], printed
        st = state(machine)
        assert st["live_color"] == "green" and st["draining"] is None, st
        p = st["probation"]
        assert (p["color"], p["old_color"], p["release"]) == (
            "green",
            "blue",
            "aipbx-sample-2.0.0",
        ), st
        assert is_active(machine, "aipbx-backend@blue.service") == "active"
        assert api_version(machine) == "2.0.0"

        doctor = machine.run(["aipbxctl", "doctor"], check=False)
        assert doctor.returncode == 5, doctor.stdout + doctor.stderr
        assert "interrupted during its probation on green" in doctor.stdout, doctor.stdout
        FIGURES["kill_after_switch_doctor"] = [
            ln for ln in doctor.stdout.splitlines() if "rollout:" in ln
        ]
        assert "aipbxctl reconcile" in doctor.stdout

        # another rollout waits for it, and says how to finish it
        again = machine.run(["aipbxctl", "upgrade", V2, "--yes"], check=False)
        assert again.returncode == 2, again.stdout + again.stderr
        one_line_error(
            again, "the upgrade to aipbx-sample-2.0.0 was interrupted during its probation"
        )
        assert "`aipbxctl reconcile` resumes it" in again.stderr, again.stderr
        assert state(machine)["probation"] == p

        result: dict[str, Any] = {}

        def reconcile() -> None:
            result["r"] = machine.run(["aipbxctl", "reconcile"], check=False, timeout=180)

        t = threading.Thread(target=reconcile)
        t.start()
        try:
            # the probation passes, then blue drains: it still runs, its WebSocket open
            wait_until(
                lambda: state(machine)["probation"] is None
                and (state(machine)["draining"] or {}).get("color") == "blue",
                60,
                "the resumed probation to pass and blue's drain to start",
            )
            status = json.loads(machine.run(["aipbxctl", "status", "--json"]).stdout)
            assert status["phase"] == "draining" and status["draining"]["color"] == "blue"
            assert is_active(machine, "aipbx-backend@blue.service") == "active"
            assert is_active(machine, "faults-ws.service") == "active"
            assert websockets_on(machine, Color.BLUE) >= 1
        finally:
            t.join(180)
        r = result["r"]
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        assert "resuming the probation of aipbx-sample-2.0.0 on green" in out, out
        assert "green passed probation" in out, out
        # the WebSocket held blue to its drain deadline: it was cut then, not before
        assert "deadline: 1 WebSocket(s)" in out and "still on blue are cut" in out, out
        assert out.index("passed probation") < out.index("deadline: 1 WebSocket(s)")
        assert "blue stopped" in out, out
        FIGURES["kill_after_switch_reconcile"] = out.splitlines()
    finally:
        machine.run(["systemctl", "stop", "faults-ws.service"], check=False)
    assert is_active(machine, "aipbx-backend@blue.service") == "inactive"
    status = json.loads(machine.run(["aipbxctl", "status", "--json"]).stdout)
    assert status["phase"] == "done" and status["live_color"] == "green", status
    assert api_version(machine) == "2.0.0"
    assert machine.run(["aipbxctl", "doctor"], check=False).stdout.count("rollout:") == 0
    assert_no_failed_units(machine)


def test_killed_after_the_switch_to_a_bad_release_reconcile_switches_back(
    machine: Machine,
) -> None:
    assert live_color(machine) == "green"
    # healthy at first (its health gate passes), answers 500 from 15 s after its start
    artifact = bad_release(machine, "2.1.0", "after:15")
    kill_after_switch(
        machine, "upk-bad", "blue", "upgrade", artifact, "--probation", "40", "--drain", "5"
    )
    st = state(machine)
    assert st["live_color"] == "blue" and st["probation"]["old_color"] == "green", st
    assert is_active(machine, "aipbx-backend@green.service") == "active"
    r = machine.run(["aipbxctl", "reconcile"], check=False, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming the probation of aipbx-sample-2.1.0 on blue" in r.stdout, r.stdout
    assert "switched back to green" in r.stdout, r.stdout
    assert "stop-old: blue stopped" in r.stdout, r.stdout
    # its summary names the table as reconcile left it
    assert "nft table: live color green" in r.stdout, r.stdout
    assert "nft table: live color blue" not in r.stdout, r.stdout
    FIGURES["kill_bad_release_reconcile"] = r.stdout.splitlines()
    assert "Traceback" not in r.stdout + r.stderr
    assert live_color(machine) == "green" and api_version(machine) == "2.0.0"
    assert is_active(machine, "aipbx-backend@blue.service") != "active"
    st = state(machine)
    assert st["probation"] is None and st["upgrading"] == "" and st["draining"] is None, st
    assert "aipbx-sample-2.1.0" in st["failed"], st
    _, rel = aipbxctl_json(machine, "releases")
    row = {x["release"]: x for x in rel["releases"]}["aipbx-sample-2.1.0"]
    assert row["failed"] is True and row["live"] is False, row
    journal = machine.run(["journalctl", "-t", "aipbxctl", "-p", "crit", "--no-pager"]).stdout
    assert "aipbx-sample-2.1.0 failed in probation" in journal, journal
    assert_no_failed_units(machine)


def test_a_reboot_ends_an_interrupted_probation_and_its_drain(machine: Machine) -> None:
    """Killed right after the switch, then the machine restarts before anyone reconciles:
    the old color, disabled at the switch, does not come back, so the probation and the
    drain are over; doctor says so, and reconcile records it without waiting them out."""
    assert live_color(machine) == "green"
    kill_after_switch(
        machine, "upk-restart", "blue", "restart", "--probation", "300", "--drain", "300"
    )
    p = state(machine)["probation"]
    assert (p["color"], p["old_color"], p["verb"]) == ("blue", "green", "restart"), p
    machine.shutdown()
    machine.boot()
    wait_until(lambda: api_version(machine) == "2.0.0", 60, "blue serving after the boot")
    assert live_color(machine) == "blue"
    assert is_active(machine, "aipbx-backend@blue.service") == "active"
    assert is_active(machine, "aipbx-backend@green.service") == "inactive"
    doctor = machine.run(["aipbxctl", "doctor"], check=False)
    assert doctor.returncode == 5, doctor.stdout + doctor.stderr
    assert "warning: rollout: the probation of aipbx-sample-2.0.0 on blue is over" in doctor.stdout
    assert "interrupted during its probation" not in doctor.stdout, doctor.stdout
    r = machine.run(["aipbxctl", "reconcile"], timeout=120)
    assert "resuming the probation" not in r.stdout, r.stdout
    assert "the machine restarted during probation: it is over" in r.stdout, r.stdout
    assert "the drain of green ended: stopped" in r.stdout, r.stdout
    FIGURES["reboot_reconcile"] = r.stdout.splitlines()
    _, status = aipbxctl_json(machine, "status")
    assert status["phase"] == "done" and status["live_color"] == "blue", status
    assert "rollout:" not in machine.run(["aipbxctl", "doctor"], check=False).stdout
    assert api_version(machine) == "2.0.0"
    assert_no_failed_units(machine)


# --- 13: a corrupt state.json, a downgrade, PostgreSQL down ------------------------------------


def test_a_corrupt_state_file_is_named_by_status_and_doctor(machine: Machine) -> None:
    live = live_color(machine)
    machine.run(["cp", "-a", STATE, "/root/state.json.keep"])
    table = nft_table(machine)
    since = mark(machine)
    try:
        machine.sh(f"printf '{{\"live_' > {STATE}")
        r = machine.run(["aipbxctl", "status"], check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line_error(r, f"{STATE}: corrupt state")
        assert "hint: " in r.stderr and "journalctl" in r.stderr, (line, r.stderr)
        FIGURES["corrupt_state_status"] = line
        # what would act on it refuses, naming it, and changes nothing
        for argv in (["reconcile"], ["upgrade", V1, "--yes"], ["releases"]):
            r = machine.run(["aipbxctl", *argv], check=False)
            assert r.returncode == 1, (argv, r.stdout, r.stderr)
            one_line_error(r, f"{STATE}: corrupt state")
        assert nft_table(machine) == table
        assert api_version(machine) == "2.0.0"
        doctor = machine.run(["aipbxctl", "doctor"], check=False)
        assert doctor.returncode == 5, doctor.stdout + doctor.stderr
        assert "Traceback" not in doctor.stdout + doctor.stderr
        assert f"error: state: {STATE}: corrupt state" in doctor.stdout, doctor.stdout
        code, found = aipbxctl_json(machine, "doctor", check=False)
        assert code == 5
        assert [f for f in found["findings"] if f["check"] == "state" and f["hint"]], found
        FIGURES["corrupt_state_doctor"] = [f["check"] for f in found["findings"]]
    finally:
        machine.run(["cp", "-a", "/root/state.json.keep", STATE])
    assert_no_tracebacks(machine, since)
    _, status = aipbxctl_json(machine, "status")
    assert status["live_color"] == live and status["phase"] == "done"
    assert api_version(machine) == "2.0.0"
    report = machine.run(["aipbxctl", "doctor"], check=False).stdout
    assert not re.search(r"^(error|warning): state:", report, re.M), report


def test_a_downgrade_needs_yes_and_rollback_says_what_it_does(machine: Machine) -> None:
    live = live_color(machine)
    idle = "green" if live == "blue" else "blue"
    before = (state_text(machine), nft_table(machine), releases_dir(machine))
    r = machine.sh(f"aipbxctl upgrade {V1} </dev/null", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_line_error(r, "aipbx-sample-1.0.0 is older than the live aipbx-sample-2.0.0")
    assert "a downgrade" in line and "refused without --yes" in line, line
    assert "add --yes" in r.stderr
    FIGURES["downgrade_refused"] = line
    assert (state_text(machine), nft_table(machine), releases_dir(machine)) == before
    assert api_version(machine) == "2.0.0"

    _, out = aipbxctl_json(machine, "upgrade", V1, "--probation", "1", "--drain", "1", "--yes")
    assert out["ok"] and out["release"] == "aipbx-sample-1.0.0" and out["color"] == idle
    warned = [s["detail"] for s in out["steps"] if "a downgrade" in s["detail"]]
    assert warned and warned[0].startswith("WARNING: "), out["steps"]
    assert api_version(machine) == "1.0.0"

    _, back = aipbxctl_json(machine, "rollback", "--probation", "1", "--drain", "1", "--yes")
    plan = [s["detail"] for s in back["steps"] if s["step"] == "plan"]
    assert plan, back["steps"]
    said = plan[-1]
    FIGURES["rollback_plan"] = said
    assert said.startswith(f"from aipbx-sample-1.0.0 (on {idle}) to aipbx-sample-2.0.0"), said
    assert "not running: started on the idle color" in said, said
    assert "the database stays as it is" in said, said
    assert back["ok"] and back["release"] == "aipbx-sample-2.0.0"
    assert api_version(machine) == "2.0.0"
    assert_no_failed_units(machine)


def test_postgresql_stopped_during_the_migration_is_named(machine: Machine) -> None:
    # The migration connects, says so, then waits until PostgreSQL stops, and goes on.
    artifact = migrating_release(
        machine,
        "2.3.0",
        "$P -c 'SELECT 1' >/dev/null\n"
        f"touch {MARKER}\n"
        'i=0; while pg_isready -q -h "$DB_HOST" -p "$DB_PORT"; do\n'
        "  i=$((i+1)); [ $i -lt 600 ] || exit 3; sleep 0.1\n"
        "done\n"
        "$P -c 'CREATE TABLE faults_cut (id int)'",
    )
    machine.run(["rm", "-f", MARKER])
    live = live_color(machine)
    idle = "green" if live == "blue" else "blue"
    table, since = nft_table(machine), mark(machine)
    result: dict[str, Any] = {}

    def upgrade() -> None:
        argv = ["aipbxctl", "upgrade", artifact, "--probation", "1", "--drain", "1", "--yes"]
        result["r"] = machine.run(argv, check=False, timeout=300)

    # the watchdog would restart PostgreSQL within seconds: it waits meanwhile
    machine.run(["systemctl", "stop", "aipbx-watchdog.service"])
    t = threading.Thread(target=upgrade)
    try:
        t.start()
        wait_until(
            lambda: machine.run(["test", "-e", MARKER], check=False).returncode == 0
            or not t.is_alive(),
            180,
            "the migration to start",
        )
        machine.run(["systemctl", "stop", "postgresql"])
        t.join(300)
        r = result["r"]
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line_error(r, "PostgreSQL is not answering on ")
        assert "systemctl start postgresql" in line, line
        assert "the migration of aipbx-sample-2.3.0 was cut off" in line, line
        assert "pre-upgrade backup /var/backups/aipbx/pre-upgrade-aipbx-sample-2.3.0-" in line
        assert "runuser exited" not in r.stdout + r.stderr
        FIGURES["postgresql_cut_migration"] = line
        assert nft_table(machine) == table and live_color(machine) == live
        st = state(machine)
        assert "aipbx-sample-2.3.0" in st["failed"] and not st["upgrading"], st
        assert is_active(machine, f"aipbx-backend@{idle}.service") != "active"
    finally:
        t.join(300)
        start(machine, "postgresql")
        start(machine, "aipbx-watchdog.service")
    assert api_version(machine) == "2.0.0"
    assert_no_tracebacks(machine, since)


def test_postgresql_down_is_named_before_a_migrating_upgrade(machine: Machine) -> None:
    artifact = migrating_release(
        machine, "2.2.0", "$P -c 'CREATE TABLE IF NOT EXISTS faults_mig (id int)'"
    )
    before = (state_text(machine), nft_table(machine), releases_dir(machine))
    # the watchdog would restart PostgreSQL within seconds: it waits meanwhile
    machine.run(["systemctl", "stop", "aipbx-watchdog.service"])
    try:
        machine.run(["systemctl", "stop", "postgresql"])
        r = machine.run(
            ["aipbxctl", "upgrade", artifact, "--probation", "1", "--drain", "1", "--yes"],
            check=False,
        )
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_line_error(r, "PostgreSQL is not answering on ")
        assert "systemctl start postgresql" in line, line
        assert "nothing was unpacked, migrated or switched" in line, line
        assert "runuser exited" not in r.stdout + r.stderr
        FIGURES["postgresql_down"] = line
        assert (state_text(machine), nft_table(machine), releases_dir(machine)) == before
    finally:
        start(machine, "postgresql")
        start(machine, "aipbx-watchdog.service")
    _, out = aipbxctl_json(
        machine, "upgrade", artifact, "--probation", "1", "--drain", "1", "--yes"
    )
    assert out["ok"] and out["release"] == "aipbx-sample-2.2.0", out
    assert out["database"] == "migrated", out
    assert api_version(machine) == "2.2.0"
    assert_no_failed_units(machine)


def test_report_figures(machine: Machine) -> None:
    print("\nFIGURES " + json.dumps(FIGURES, indent=1, sort_keys=True))
