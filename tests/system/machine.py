"""A real Debian 12 booted under systemd-nspawn, for the system tests.

`Machine` boots a throw-away overlay of the cached rootfs (rootfs.py: `ensure_rootfs()`)
with systemd as PID 1 and its own network namespace, and is entered with `nsenter`
(nsenter.py): the host runs no systemd, so machinectl and `systemd-run -M` are not available
(shared/PACKAGING.md). It can be powered off hard (a power cut) and booted again on the same
disk.

Only processes this module started are ever signalled, always by PID (processes.py); a
killed session's leftovers are cleaned up by the next one (leftovers.py).

Run `python3 -m tests.system.machine` at the repo top to build the cache and time a boot.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from tests.system.container_path import host_path
from tests.system.harness import NSPAWN_ENV, HarnessError, harness_problem, log
from tests.system.leftovers import sweep_stale_machines, write_state
from tests.system.mounts import mount_disk, mounts_under, remove_tree, umount
from tests.system.nsenter import run_inside
from tests.system.processes import container_init, kill_exact, start_time, wait_gone
from tests.system.rootfs import REPO_TOP, ensure_rootfs, read_packages

# Importers of the harness before it was split up take these from here.
__all__ = [
    "HarnessError",
    "Machine",
    "ensure_rootfs",
    "harness_problem",
    "read_packages",
    "sweep_stale_machines",
]


class Machine:
    """One booted container over a private overlay of the cached rootfs.

    The overlay's upper dir is the machine's disk: it survives `poweroff_hard()` and is
    booted again by `boot()`; it is thrown away by `close()` (and `__exit__`).
    """

    def __init__(
        self,
        rootfs: Path,
        *,
        name: str | None = None,
        boot_timeout: float = 120,
    ) -> None:
        self.rootfs = rootfs.resolve()
        self.name = name or f"aipbx-test-{uuid.uuid4().hex[:10]}"
        self.boot_timeout = boot_timeout
        self.workdir = Path(
            tempfile.mkdtemp(prefix=f"machine-{self.name}-", dir=self.rootfs.parent)
        )
        self.root = self.workdir / "merged"
        self.console_log = self.workdir / "console.log"
        self.storage = "none"
        self.last_boot_seconds = 0.0
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None
        self._write_state()

    # -- lifecycle

    def __enter__(self) -> Machine:
        try:
            self._mount()
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _mount(self) -> None:
        self.storage = mount_disk(self.rootfs, self.workdir, self.root)
        # Its own identity (journal directory, D-Bus), as a freshly installed host would have.
        (self.root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        self._write_state()

    def boot(self) -> None:
        """Boot the machine's filesystem and wait until systemd reports the boot finished."""
        if self.running:
            raise HarnessError(f"{self.name} is already running")
        started = time.monotonic()
        argv = [
            "systemd-nspawn",
            "-D",
            str(self.root),
            "--boot",
            "--register=no",
            "--keep-unit",
            "--private-network",
            f"--machine={self.name}",
            "--link-journal=no",
            "--console=read-only",
        ]
        with self.console_log.open("ab") as console:
            console.write(f"\n===== boot {time.ctime()}: {shlex.join(argv)}\n".encode())
            console.flush()
            self._nspawn = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={**os.environ, **NSPAWN_ENV},
                start_new_session=True,
            )
        self._pid1 = None
        self._write_state()
        try:
            self._pid1 = self._wait_for_init(started + self.boot_timeout)
            self._write_state()
            self._wait_for_boot(started + self.boot_timeout)
        except BaseException:
            self.poweroff_hard()
            raise
        self.last_boot_seconds = time.monotonic() - started
        log(f"{self.name} booted in {self.last_boot_seconds:.1f} s")

    def _wait_for_init(self, deadline: float) -> int:
        assert self._nspawn is not None
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise HarnessError(
                    f"systemd-nspawn exited with {self._nspawn.returncode} while booting "
                    f"{self.name}\n{self.console_tail()}"
                )
            pid = container_init(self._nspawn.pid)
            if pid is not None:
                return pid
            time.sleep(0.02)
        raise HarnessError(f"no systemd started in {self.name}\n{self.console_tail()}")

    def _wait_for_boot(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            assert self._nspawn is not None
            if self._nspawn.poll() is not None:
                raise HarnessError(
                    f"{self.name} stopped while booting ({self._nspawn.returncode})\n"
                    f"{self.console_tail()}"
                )
            left = max(1.0, deadline - time.monotonic())
            try:
                # --wait blocks until the boot finished; it fails fast until the bus is up.
                proc = self.run(
                    ["systemctl", "is-system-running", "--wait"], check=False, timeout=left
                )
            except AssertionError:
                state = "timed out waiting for is-system-running"
                break
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return
            if state in ("maintenance", "stopping"):
                break
            time.sleep(0.05)
        raise HarnessError(
            f"{self.name} did not finish booting (state {state or 'unknown'!r})\n"
            f"{self.console_tail()}"
        )

    def shutdown(self, timeout: float = 60) -> None:
        """Clean poweroff from inside; a machine that does not stop in time is killed."""
        if self._nspawn is None:
            return
        if self._nspawn.poll() is None:
            with contextlib.suppress(AssertionError):
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=15)
            try:
                self._nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not power off within {timeout:.0f} s; killing it")
        self.poweroff_hard()

    def poweroff_hard(self) -> None:
        """A power cut: SIGKILL the container's init, so its whole PID namespace dies at once
        and nothing inside gets to flush or unmount. The disk (overlay upper dir) stays.

        Killing systemd-nspawn alone would not do: the container's init runs in a session
        of its own and outlives it. And nspawn must stay alive to reap the dead init: the
        host's PID 1 here is no init that reaps orphans."""
        nspawn = self._nspawn
        if nspawn is None:
            return
        pid1 = self._pid1 or container_init(nspawn.pid, booted=False)
        pid1_start = start_time(pid1) if pid1 is not None else None
        if pid1 is not None:
            kill_exact(pid1, pid1_start)
        killed: tuple[int, int] | None = None
        try:
            nspawn.wait(10 if pid1 is not None else 0.1)
        except subprocess.TimeoutExpired:
            st = self.root.stat()
            killed = (st.st_dev, st.st_ino)  # names nspawn's lock file on the image
            # nspawn runs in its own session: the group is nspawn and its helpers only.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(nspawn.pid, signal.SIGKILL)
            nspawn.wait()
        if pid1 is not None and not wait_gone(pid1, pid1_start, 10):
            raise HarnessError(f"container init {pid1} of {self.name} survived SIGKILL")
        self._cleanup_nspawn_leftovers(killed)
        self._nspawn = None
        self._pid1 = None
        self._write_state()

    def _cleanup_nspawn_leftovers(self, root_id: tuple[int, int] | None) -> None:
        # nspawn removes these itself when it exits; a SIGKILL leaves them behind.
        if root_id is not None:
            lock = Path("/run/systemd/nspawn/locks") / f"inode-{root_id[0]}:{root_id[1]}"
            lock.unlink(missing_ok=True)
        propagate = Path("/run/systemd/nspawn/propagate") / self.name
        for point in reversed(mounts_under(propagate)):
            umount(Path(point))
        with contextlib.suppress(OSError):
            shutil.rmtree(propagate)

    def close(self) -> None:
        """Stop the machine, unmount its filesystem and delete it. Safe to call twice."""
        errors: list[BaseException] = []
        try:
            self.shutdown()
        except BaseException as e:  # keep cleaning up; report afterwards
            errors.append(e)
            with contextlib.suppress(BaseException):
                self.poweroff_hard()
        try:
            if self.root.is_dir():
                umount(self.root)
            remove_tree(self.workdir)
        except BaseException as e:
            errors.append(e)
        if errors:
            raise errors[0]

    # -- state file, so a session that was killed can be cleaned up by the next one

    def _write_state(self) -> None:
        write_state(
            self.workdir,
            nspawn_pid=self._nspawn.pid if self._nspawn else None,
            pid1=self._pid1,
            root=self.root,
            storage=self.storage,
        )

    # -- inside the machine

    @property
    def running(self) -> bool:
        return self._nspawn is not None and self._nspawn.poll() is None

    @property
    def nspawn_pid(self) -> int:
        if self._nspawn is None:
            raise HarnessError(f"{self.name} is not running")
        return self._nspawn.pid

    @property
    def pid1(self) -> int:
        """Host PID of the container's systemd."""
        if self._pid1 is None or not self.running:
            raise HarnessError(f"{self.name} is not running")
        return self._pid1

    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the machine (all its namespaces, a clean environment)."""
        return run_inside(
            self.pid1, self.name, argv, check=check, input=input, timeout=timeout, env=env
        )

    def sh(
        self,
        script: str,
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            ["bash", "-euo", "pipefail", "-c", script],
            check=check,
            input=input,
            timeout=timeout,
            env=env,
        )

    def path(self, p: str) -> Path:
        """The host path of container path `p`, resolving symlinks *inside* the machine's
        root (an absolute link like /var/run -> /run must not lead to the host's /run).
        Paths on the container's tmpfs mounts (/run, /tmp, ...) have no host path."""
        return host_path(self.root, p)

    def copy_in(self, src: Path, dest: str) -> Path:
        """Copy a host file into the machine (a directory `dest` receives it by name)."""
        target = self.path(dest)
        if target.is_dir():
            target = target / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        return target

    def journal(self, unit: str | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-o", "short-precise"]
        if unit:
            argv += ["-u", unit]
        return self.run(argv).stdout

    def failed_units(self) -> list[str]:
        out = self.run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout
        return [line.split()[0].lstrip("●* ") for line in out.splitlines() if line.split()]

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        # The console is a pty: drop colours and carriage returns, and the blank lines left.
        text = re.sub(r"\x1b\[[0-9;]*m|\r", "", text)
        kept = [line for line in text.splitlines() if line.strip()]
        return "--- console (last lines)\n" + "\n".join(kept[-lines:])


def main() -> int:
    """Build the cache (timed) and boot it once (timed)."""
    cache = REPO_TOP / "build" / "cache"
    problem = harness_problem()
    if problem:
        log(problem)
        return 2
    sweep_stale_machines(cache)
    t0 = time.monotonic()
    rootfs = ensure_rootfs(cache)
    log(f"ensure_rootfs: {time.monotonic() - t0:.1f} s -> {rootfs}")
    t1 = time.monotonic()
    with Machine(rootfs) as m:
        log(f"boot: {m.last_boot_seconds:.2f} s; failed units: {m.failed_units() or 'none'}")
    log(f"boot + shutdown + cleanup: {time.monotonic() - t1:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
