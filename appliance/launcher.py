"""`aipbx-backend-launch COLOR`: ExecStart of aipbx-backend@COLOR. Reads the release the color
points at and execs its command, unmodified, with the contract's environment: PORT,
UDP_SERVER_PORT, DB_* (PgBouncer at the host end of the color's veth), EXTERNAL_HOST, and
the app's own from /etc/aipbx/backend.env (read here, with the appliance's parser of
systemd's EnvironmentFile= syntax, so that a migration gets exactly the same)."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from appliance import appenv
from appliance import config as config_mod
from appliance.colors import Color, color_net, parse_color
from appliance.config import Config
from appliance.errors import AipbxError
from appliance.fsutil import write_all
from appliance.paths import Paths
from appliance.release.manifest import MANIFEST_NAME, Manifest, load_manifest


def backend_env(
    cfg: Config,
    color: Color | None,
    m: Manifest,
    release: Path,
    base: Mapping[str, str],
    files: appenv.Files | None = None,
) -> dict[str, str]:
    """Pure: the process environment, the one function for a color's backend and for a
    release's migration (color None: it runs on no color and reaches PostgreSQL itself, not
    PgBouncer's transaction pool). On `base` (the process's own environment) come
    backend.env and the app's part of secrets.env (`files`, appliance.appenv), then the
    release's [env], then what the appliance owns (ports and database), which nothing
    overrides since the namespace and PgBouncer fix those."""
    env = dict(base)
    env.update(appenv.app_values(files, m) if files is not None else dict(m.env))
    if color is None:
        db_host, db_port = "127.0.0.1", cfg.database.postgres_port
    else:
        db_host = color_net(cfg.network.subnet, color).host_addr
        db_port = cfg.database.pgbouncer_port
    env.update(
        {
            "NODE_ENV": env.get("NODE_ENV", "production"),
            "PORT": str(cfg.backend.http_port),
            "UDP_SERVER_PORT": str(cfg.backend.udp_port),
            "DB_DIALECT": "postgres",
            "DB_HOST": db_host,
            "DB_PORT": str(db_port),
            "DB_USER": cfg.database.user,
            "DB_NAME": cfg.database.name,
            "AIPBX_RELEASE": release.name,
        }
    )
    if files is not None and files.setup.get("DB_PASS"):
        env["DB_PASS"] = files.setup["DB_PASS"]
    if color is not None:
        env["AIPBX_COLOR"] = str(color)
    if cfg.site.public_ip:
        env["EXTERNAL_HOST"] = f"{cfg.site.public_ip}:{cfg.backend.udp_port}"
    if not {"NO_COLOR", "FORCE_COLOR"} & env.keys():
        # The journal is not a terminal: no ANSI colour codes (Nest's logger honours
        # NO_COLOR), unless the operator or the release asked for something else.
        env["NO_COLOR"] = "1"
    if m.runtime:
        env["PATH"] = f"{release / m.runtime}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


# Control sequences (CSI: ESC [ params intermediates final). Nest's logger honours
# NO_COLOR for its own colours but passes its extra arguments to util.inspect() with colors
# on whatever the environment says (Nest 11 ConsoleLogger), so a port number or an error
# object still reaches the journal as `ESC[33m3033ESC[39m`, which journalctl then shows as
# "[blob data]".
CSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")
# How long the filter still passes output once the app has died: what the app wrote last
# is in the pipe; a process of the app's that keeps the pipe open (and ignores SIGTERM)
# must not hold the unit's stop until TimeoutStopSec.
AFTER_APP_S = 3.0
_CHUNK = 1 << 16
PR_SET_PDEATHSIG = 1


def strips_colours(env: Mapping[str, str]) -> bool:
    """Pure: whether the app's output goes through the filter (the operator did not ask for
    colours with FORCE_COLOR, and NO_COLOR is set, as backend_env sets it by default)."""
    return bool(env.get("NO_COLOR")) and not env.get("FORCE_COLOR")


def strip_csi(data: bytes) -> bytes:
    """Pure: the bytes without control sequences."""
    return CSI.sub(b"", data)


def _on_parent_death(sig: int) -> None:
    """Ask the kernel for `sig` when the process that forked this one (the app, once it
    has exec'd) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def filter_stream(r: int, out: int, parent: int) -> None:
    """The filter's life: read the app's output from `r` line by line, write it to `out`
    without control sequences, until EOF; SIGTERM, SIGINT and SIGHUP are ignored (systemd
    signals every process of the unit at a stop, and the app's last lines come after), but
    AFTER_APP_S after the app died the filter ends whatever it was doing."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.signal(signal.SIGUSR1, lambda *_: signal.setitimer(signal.ITIMER_REAL, AFTER_APP_S))
    _on_parent_death(signal.SIGUSR1)
    if os.getppid() != parent:  # it died before the request was made
        signal.setitimer(signal.ITIMER_REAL, AFTER_APP_S)
    pending = b""
    while chunk := os.read(r, _CHUNK):
        pending += chunk
        lines, newline, pending = pending.rpartition(b"\n")
        if newline:
            write_all(out, strip_csi(lines + newline))
        if len(pending) > _CHUNK:  # a line that never ends: pass it on in pieces
            write_all(out, strip_csi(pending))
            pending = b""
    if pending:
        write_all(out, strip_csi(pending))


def _through_filter() -> None:
    """Send this process's stdout and stderr through a filter (a forked child that strips
    control sequences and writes to the journal stream this process had), then return to
    exec the app in this process: the app stays the unit's main process, gets its signals,
    and the filter ends at EOF after the app exits, or AFTER_APP_S after at the latest."""
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            filter_stream(r, 1, parent)
        finally:
            os._exit(0)
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(r)
    os.close(w)


def main(argv: Sequence[str]) -> int:
    try:
        if len(argv) != 1:
            raise AipbxError("usage: aipbx-backend-launch blue|green")
        color = parse_color(argv[0])
        paths = Paths(Path(os.environ.get("AIPBX_ROOT", "/")))
        cfg = config_mod.load(paths.config)
        release = (paths.colors / str(color)).resolve()
        m = load_manifest(release / MANIFEST_NAME)
        if not m.command:
            raise AipbxError(f"{release.name}: a {m.kind} release has no command to run")
        env = backend_env(cfg, color, m, release, os.environ, appenv.load(paths))
    except (AipbxError, ValueError, OSError) as e:
        print(f"aipbx-backend-launch: {getattr(e, 'message', e)}", file=sys.stderr)
        return 1
    os.chdir(release)
    print(
        f"aipbx-backend-launch: {color} runs {release.name}: {' '.join(m.command)}",
        file=sys.stderr,
        flush=True,
    )
    if strips_colours(env):
        _through_filter()
    os.execvpe(m.command[0], list(m.command), env)
