"""A real Debian 12 booted under systemd-nspawn, for the system tests.

`ensure_rootfs()` builds (once) a cached bookworm rootfs with the packages the appliance
depends on already installed, so `apt install ./aipbx-appliance_*.deb` works inside a
container that has no network. `Machine` boots a throw-away overlay of that cache with
systemd as PID 1 and its own network namespace, and is entered with `nsenter`: the host runs
no systemd, so machinectl and `systemd-run -M` are not available (shared/PACKAGING.md).

Only processes this module started are ever signalled, always by PID (and, for leftovers of
a killed session, only after checking the PID still names the same process).

Run `python3 -m tests.system.machine` at the repo top to build the cache and time a boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
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
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

SUITE = "bookworm"
BASE_INCLUDE = ("systemd", "systemd-sysv", "dbus", "adduser", "apt")
# Bump when the way the image is built changes, so an old cache is not reused.
RECIPE_VERSION = 1

REPO_TOP = Path(__file__).resolve().parents[2]
PACKAGE_LIST = REPO_TOP / "packaging" / "system-test-packages.txt"
HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Timers that only make sense with a network, or that churn the disk during a test.
DISABLED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)
# Inside the container these are not part of the persistent root filesystem.
VOLATILE_PREFIXES = ("/run", "/tmp", "/proc", "/sys", "/dev")
NSPAWN_ENV = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}


class HarnessError(RuntimeError):
    """The system-test harness cannot do its job (not root, tool missing, boot failed)."""


def log(msg: str) -> None:
    print(f"[machine] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- checks


def harness_problem() -> str | None:
    """Why the harness cannot run here, or None. Callers turn this into a failure."""
    if os.geteuid() != 0:
        return "system tests need root (debootstrap, mount, systemd-nspawn, nsenter)"
    missing = [
        tool
        for tool in ("debootstrap", "systemd-nspawn", "nsenter", "mount", "umount", "cp")
        if shutil.which(tool) is None
    ]
    if missing:
        return (
            f"missing tools: {', '.join(missing)} "
            "(apt-get install -y debootstrap systemd-container util-linux)"
        )
    if not HOST_SOURCES.is_file():
        return f"{HOST_SOURCES} not found: it names the Debian mirror the rootfs is built from"
    return None


# ----------------------------------------------------------------------------- rootfs


def read_packages(path: Path = PACKAGE_LIST) -> list[str]:
    """Package names, one a line; `#` starts a comment."""
    names: list[str] = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


def parse_deb822(text: str) -> list[dict[str, str]]:
    """Stanzas of a deb822 file; continuation lines are joined with a space."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def debian_mirror(suite: str = SUITE, sources: Path = HOST_SOURCES) -> str:
    """The first URI of the first stanza of the host's sources that serves `suite`."""
    for stanza in parse_deb822(sources.read_text()):
        if suite in stanza.get("suites", "").split() and stanza.get("uris"):
            return stanza["uris"].split()[0]
    raise HarnessError(f"no stanza for suite {suite!r} in {sources}")


def cache_key(packages: list[str], suite: str = SUITE) -> str:
    material = json.dumps(
        {
            "suite": suite,
            "include": BASE_INCLUDE,
            "packages": sorted(set(packages)),
            "recipe": RECIPE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _stream(argv: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run a build step with its output on our stderr (progress), failing loudly."""
    log("+ " + shlex.join(argv))
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=2, stderr=2, env=full_env)
    if proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} exited with {proc.returncode}")


def _nspawn_pipe(root: Path, argv: list[str]) -> None:
    """Run a command in `root` (not booted) with the host's network, as apt needs."""
    _stream(
        [
            "systemd-nspawn",
            "-D",
            str(root),
            "--register=no",
            "--keep-unit",
            "--pipe",
            "--link-journal=no",
            "-E",
            "DEBIAN_FRONTEND=noninteractive",
            "-E",
            "LANG=C.UTF-8",
            *argv,
        ],
        env=NSPAWN_ENV,
    )


def ensure_rootfs(cache_dir: Path) -> Path:
    """The cached rootfs for the current package list, building it first if needed."""
    problem = harness_problem()
    if problem:
        raise HarnessError(problem)
    cache_dir = cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = read_packages()
    dest = cache_dir / f"debian-{SUITE}-{cache_key(packages)}"
    if dest.is_dir():
        return dest
    # One builder at a time; whoever waited finds the finished cache afterwards.
    with _locked(cache_dir / ".rootfs.lock"):
        if dest.is_dir():
            return dest
        for stale in cache_dir.glob(".tmp-rootfs-*"):
            log(f"removing half-built cache {stale}")
            _remove_tree(stale)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-rootfs-", dir=cache_dir))
        try:
            _build_rootfs(tmp / "rootfs", packages)
            os.sync()
            os.rename(tmp / "rootfs", dest)
        finally:
            _remove_tree(tmp)
        log(f"rootfs {dest} built in {time.monotonic() - started:.0f} s")
    return dest


def _build_rootfs(root: Path, packages: list[str]) -> None:
    mirror = debian_mirror()
    log(f"building Debian {SUITE} rootfs in {root} from {mirror}")
    _stream(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_INCLUDE)}",
            SUITE,
            str(root),
            mirror,
        ]
    )
    # The host's own sources (main, updates, security), never a name written in this repo.
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    shutil.copyfile(HOST_SOURCES, root / "etc/apt/sources.list.d/debian.sources")
    # debootstrap copies the host's hostname and resolver config: none of the container's.
    (root / "etc/hostname").write_text("aipbx-test\n")
    # No service may start while packages are installed: the build runs on the host's network.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    apt = ["apt-get", "-q", "-o", "Dpkg::Use-Pty=0"]
    _nspawn_pipe(root, [*apt, "update"])
    _nspawn_pipe(root, [*apt, "-y", "upgrade"])
    log(f"installing {len(packages)} packages: {' '.join(packages)}")
    _nspawn_pipe(root, [*apt, "install", "-y", "--no-install-recommends", *packages])
    # A later `apt install ./x.deb` resolves from what is installed; the .debs are not needed.
    _nspawn_pipe(root, [*apt, "clean"])
    present = [u for u in DISABLED_UNITS if (root / "lib/systemd/system" / u).exists()]
    if present:
        _nspawn_pipe(root, ["systemctl", "disable", *present])
    policy.unlink()
    resolv = root / "etc/resolv.conf"
    if resolv.is_file() and not resolv.is_symlink():
        resolv.write_text("")
    (root / "etc/aipbx-system-test").write_text(f"{cache_key(packages)}\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- /proc helpers


def _start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (to tell a PID from a reused one), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _descendants(pid: int) -> Iterator[int]:
    # /proc/<pid>/task/*/children needs CONFIG_PROC_CHILDREN, which not every kernel has:
    # build the tree from every process's parent instead.
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    todo = list(kids.get(pid, []))
    while todo:
        kid = todo.pop()
        yield kid
        todo += kids.get(kid, [])


def _container_init(nspawn_pid: int, *, booted: bool = True) -> int | None:
    """The host PID of the container's init: the descendant of nspawn that is PID 1 in its
    own PID namespace. With `booted`, only once it has exec'd systemd (before that it is
    still nspawn's code and entering it would race the namespace setup)."""
    for pid in _descendants(nspawn_pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) > 1 and ids[-1] == "1" and (comm == "systemd" or not booted):
                    return pid
    return None


def _mount_points() -> list[str]:
    points: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]  # spaces and the like are escaped as \ooo
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), raw))
    return points


def _mounts_under(path: Path) -> list[str]:
    top = str(path.resolve())
    return [p for p in _mount_points() if p == top or p.startswith(top + "/")]


def _remove_tree(path: Path) -> None:
    """rm -rf, refusing to descend into a mount (a leftover overlay would be emptied)."""
    if not path.exists():
        return
    mounted = _mounts_under(path)
    if mounted:
        raise HarnessError(f"refusing to remove {path}: still mounted: {', '.join(mounted)}")
    shutil.rmtree(path)


def _umount(point: Path, timeout: float = 10) -> None:
    point = point.resolve()
    deadline = time.monotonic() + timeout
    while str(point) in _mount_points():
        proc = subprocess.run(["umount", str(point)], capture_output=True, text=True)
        if proc.returncode == 0:
            continue
        if time.monotonic() > deadline:
            # Detach it so nothing stays visible; the kernel frees it when the last user goes.
            log(f"umount {point} failed ({proc.stderr.strip()}); detaching it")
            subprocess.run(["umount", "--lazy", str(point)], check=True)
            return
        time.sleep(0.2)


def _kill_exact(pid: int, start: int | None, sig: int = signal.SIGKILL) -> None:
    """Signal `pid` only if it is still the process that started at `start`."""
    if start is not None and _start_time(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while start is not None and _start_time(pid) == start:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ----------------------------------------------------------------------------- machine


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
        lower, upper, work = self.rootfs, self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        for p in (lower, upper, work):
            if any(c in str(p) for c in ",:\\"):
                raise HarnessError(f"overlay cannot take a path with , : or \\: {p}")
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            self.storage = "overlay"
        else:
            log(f"overlay mount failed ({proc.stderr.strip()}); copying the rootfs instead")
            self.root.rmdir()
            subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(self.root)], check=True)
            self.storage = "copy"
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
            pid = _container_init(self._nspawn.pid)
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
        pid1 = self._pid1 or _container_init(nspawn.pid, booted=False)
        pid1_start = _start_time(pid1) if pid1 is not None else None
        if pid1 is not None:
            _kill_exact(pid1, pid1_start)
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
        if pid1 is not None and not _wait_gone(pid1, pid1_start, 10):
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
        for point in reversed(_mounts_under(propagate)):
            _umount(Path(point))
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
                _umount(self.root)
            _remove_tree(self.workdir)
        except BaseException as e:
            errors.append(e)
        if errors:
            raise errors[0]

    # -- state file, so a session that was killed can be cleaned up by the next one

    def _write_state(self) -> None:
        me = os.getpid()
        nspawn_pid = self._nspawn.pid if self._nspawn else None
        state = {
            "owner": [me, _start_time(me)],
            "nspawn": [nspawn_pid, _start_time(nspawn_pid)] if nspawn_pid else None,
            "pid1": [self._pid1, _start_time(self._pid1)] if self._pid1 else None,
            "root": str(self.root),
            "storage": self.storage,
        }
        tmp = self.workdir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.workdir / "state.json")

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
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        full = [
            "nsenter",
            "-t",
            str(self.pid1),
            "-a",
            "--",
            "env",
            "-i",
            f"PATH={CONTAINER_PATH}",
            "LANG=C.UTF-8",
            "HOME=/root",
            *extra,
            *argv,
        ]
        # A session of its own, so a timeout kills nsenter *and* its child in the container.
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(
                f"in {self.name}: {shlex.join(argv)} timed out after {timeout:.0f} s\n"
                f"--- stdout\n{out}--- stderr\n{err}"
            ) from None
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in {self.name}: {shlex.join(argv)} exited with {result.returncode}\n"
                f"--- stdout\n{out}--- stderr\n{err}"
            )
        return result

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
        if not p.startswith("/"):
            raise ValueError(f"container path must be absolute: {p!r}")
        parts = [c for c in p.split("/") if c not in ("", ".")]
        resolved: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.root.joinpath(*resolved, part)
            if candidate.is_symlink():
                hops += 1
                if hops > 40:
                    raise ValueError(f"too many symlinks in {p!r}")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                parts = [c for c in target.split("/") if c not in ("", ".")] + parts
                continue
            resolved.append(part)
        inside = "/" + "/".join(resolved)
        for prefix in VOLATILE_PREFIXES:
            if inside == prefix or inside.startswith(prefix + "/"):
                raise ValueError(f"{p!r} is on a tmpfs inside the machine: no host path")
        return self.root.joinpath(*resolved)

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


def sweep_stale_machines(cache_dir: Path) -> None:
    """Stop and remove machines left by a session that was killed before it cleaned up.
    A process is only killed if its PID still names the process that session started."""
    for workdir in sorted(cache_dir.resolve().glob("machine-*")):
        try:
            state = json.loads((workdir / "state.json").read_text())
        except (OSError, ValueError):
            if time.time() - workdir.stat().st_mtime < 600:
                continue  # a parallel session may be creating it right now
            state = {}
        owner = state.get("owner") or [0, None]
        if owner[1] is not None and _start_time(owner[0]) == owner[1]:
            continue  # its session is alive (maybe a parallel run)
        log(f"cleaning up {workdir}, left by a session that is gone")
        procs: list[tuple[int, int | None]] = []
        if state.get("pid1"):
            procs.append((state["pid1"][0], state["pid1"][1]))
        if state.get("nspawn"):
            nspawn_pid, nspawn_start = state["nspawn"]
            if _start_time(nspawn_pid) == nspawn_start:
                # An init not recorded yet (the session died during boot) dies first too.
                init = _container_init(nspawn_pid, booted=False)
                if init is not None:
                    procs.append((init, _start_time(init)))
            procs.append((nspawn_pid, nspawn_start))
        for pid, start in procs:
            _kill_exact(pid, start)
            if not _wait_gone(pid, start, 10):
                raise HarnessError(f"leftover process {pid} of {workdir} survived SIGKILL")
        for point in reversed(_mounts_under(workdir)):
            _umount(Path(point))
        _remove_tree(workdir)


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
