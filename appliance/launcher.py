"""`aipbx-backend-launch COLOR`: ExecStart of aipbx-backend@COLOR. Reads the release the color
points at and execs its command, unmodified, with the contract's environment: PORT,
UDP_SERVER_PORT, DB_* (PgBouncer at the host end of the color's veth), EXTERNAL_HOST."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from appliance import config as config_mod
from appliance.colors import Color, color_net, parse_color
from appliance.config import Config
from appliance.errors import AipbxError
from appliance.paths import Paths
from appliance.release.manifest import MANIFEST_NAME, Manifest, load_manifest


def backend_env(
    cfg: Config, color: Color, m: Manifest, release: Path, base: Mapping[str, str]
) -> dict[str, str]:
    """Pure: the process environment. The release's [env] cannot override what the
    appliance owns (ports and database), since the namespace and PgBouncer fix those."""
    net = color_net(cfg.network.subnet, color)
    env = dict(base)
    env.update(dict(m.env))
    env.update(
        {
            "NODE_ENV": env.get("NODE_ENV", "production"),
            "PORT": str(cfg.backend.http_port),
            "UDP_SERVER_PORT": str(cfg.backend.udp_port),
            "DB_DIALECT": "postgres",
            "DB_HOST": net.host_addr,
            "DB_PORT": str(cfg.database.pgbouncer_port),
            "DB_USER": cfg.database.user,
            "DB_NAME": cfg.database.name,
            "AIPBX_COLOR": str(color),
            "AIPBX_RELEASE": release.name,
        }
    )
    if cfg.site.public_ip:
        env["EXTERNAL_HOST"] = f"{cfg.site.public_ip}:{cfg.backend.udp_port}"
    if m.runtime:
        env["PATH"] = f"{release / m.runtime}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


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
        env = backend_env(cfg, color, m, release, os.environ)
    except (AipbxError, ValueError, OSError) as e:
        print(f"aipbx-backend-launch: {getattr(e, 'message', e)}", file=sys.stderr)
        return 1
    os.chdir(release)
    print(
        f"aipbx-backend-launch: {color} runs {release.name}: {' '.join(m.command)}",
        file=sys.stderr,
        flush=True,
    )
    os.execvpe(m.command[0], list(m.command), env)
