"""Where the checks look on this host, read afresh every round but cheaply: state.json is
parsed again only when it changed (the live color moves with upgrades and rollbacks)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path

from appliance import acme, pgbouncer, state, tls_store
from appliance.colors import Color, color_net
from appliance.config import Config
from appliance.paths import Paths
from appliance.watchdog.checks import Targets
from appliance.watchdog.reconcile import backend_unit

log = logging.getLogger("aipbx.watchdog")


def cert_path(cfg: Config, paths: Paths) -> Path:
    """The certificate nginx serves (the store's current directory); before anything was
    placed there, the same rule as appliance.nginx.tls_files, which is not imported here
    to keep jinja2 out of the daemon's memory."""
    served = tls_store.current(paths)
    if served is not None:
        return served / tls_store.CHAIN
    if cfg.site.domain:
        live = paths.root / "etc/letsencrypt/live" / cfg.site.domain
        if (live / "fullchain.pem").exists() and (live / "privkey.pem").exists():
            return live / "fullchain.pem"
    return paths.selfsigned_cert


PG_PORT_LINE = re.compile(r"^\s*port\s*=\s*(\d+)", re.MULTILINE)
PG_DEFAULT_PORT = 5432


def cluster_unit(etc_postgresql: Path, port: int, run_postgresql: Path | None = None) -> str | None:
    """The unit of the Debian cluster that serves `port` (postgresql@15-main.service), from
    /etc/postgresql/VERSION/NAME/postgresql.conf; the only cluster if none says its port.
    Without a readable /etc/postgresql, the only cluster with a pid file in
    /run/postgresql (VERSION-NAME.pid). None when that does not settle it."""
    clusters = []
    for conf in sorted(etc_postgresql.glob("*/*/postgresql.conf")):
        try:
            ports = PG_PORT_LINE.findall(conf.read_text(errors="replace"))
        except OSError:
            continue
        version, name = conf.parent.parent.name, conf.parent.name
        clusters.append((f"postgresql@{version}-{name}.service", ports))
    serving = [u for u, ports in clusters if int(ports[-1] if ports else PG_DEFAULT_PORT) == port]
    if len(serving) == 1:
        return serving[0]
    if len(clusters) == 1:
        return clusters[0][0]
    if not clusters and run_postgresql is not None:
        pids = sorted(run_postgresql.glob("*-*.pid"))
        if len(pids) == 1:
            return f"postgresql@{pids[0].stem}.service"
    return None


def connect_host(bind: str) -> str:
    """Where to reach a listener bound to `bind` from this host."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)


class LiveTargets:
    """Called every round: what follows from the config is worked out once, here; what
    can change (the live color, the certificate served, PgBouncer set up, the cluster's
    unit) is looked at each time, and the same Targets returned while none of it moved."""

    def __init__(self, cfg: Config, paths: Paths) -> None:
        self.cfg = cfg
        self.paths = paths
        self._key: tuple[int, int, int] | None = None
        self._color: Color | None = None
        self._cluster: str | None = None
        net = cfg.network.subnet
        self._listen = tuple(
            (addr, f"aipbx-netns@{c}.service")
            for addr, c in pgbouncer.listen_addrs(net)
            if c is not None
        )
        self._ns_addr = {c: color_net(net, c).ns_addr for c in Color}
        self._state = paths.state
        self._ini = paths.pgbouncer_ini
        self._tls_link = paths.tls_served / tls_store.CURRENT
        self._cert: tuple[str, Path] | None = None  # (the link's target, cert_path then)
        self._base = self._static()
        self._made: tuple[object, ...] | None = None
        self._targets = self._base

    def cluster(self) -> str | None:
        """Looked for until found (the package may be set up after the watchdog started)."""
        if self._cluster is None:
            root = self.paths.root
            port = self.cfg.database.postgres_port
            self._cluster = cluster_unit(root / "etc/postgresql", port, root / "run/postgresql")
        return self._cluster

    def cert(self) -> Path:
        """cert_path, worked out again only when the store's link moves: one readlink a
        round. Without the link (before setup placed a certificate), every round."""
        try:
            target = os.readlink(self._tls_link)
        except OSError:
            return cert_path(self.cfg, self.paths)
        if self._cert is None or self._cert[0] != target:
            self._cert = (target, cert_path(self.cfg, self.paths))
        return self._cert[1]

    def live_color(self) -> Color | None:
        try:
            st = os.stat(self._state)
        except FileNotFoundError:
            self._key, self._color = None, None
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            try:
                self._color = state.load(self._state).live_color
            except Exception as e:  # keep the last known color; say so once per change
                log.error("%s", e, extra={"fields": {"action": "read_state"}})
            self._key = key
        return self._color

    def _static(self) -> Targets:
        c = self.cfg
        return Targets(
            color=None,
            backend_host="",
            backend_unit="",
            http_port=c.backend.http_port,
            ws_port=c.backend.ws_port,
            # nginx's loopback service listener answers /aipbx-health itself
            nginx_host=connect_host(c.nginx.service_bind),
            nginx_port=c.backend.http_port,
            postgres_port=c.database.postgres_port,
            pgbouncer_port=c.database.pgbouncer_port,
            pgbouncer_set_up=False,
            db_user=c.database.user,
            db_name=c.database.name,
            disk_paths=(self.paths.var, self.paths.opt, self.paths.backups),
            cert=None,
            backup_status=self.paths.var / "backup-status.json",
            renewal_status=acme.status_path(self.paths),
            pgbouncer_listen=self._listen,
        )

    def __call__(self) -> Targets:
        color = self.live_color()
        made = (color, self._ini.exists(), self.cert(), self.cluster())
        if made != self._made:
            self._made = made
            self._targets = replace(
                self._base,
                color=str(color) if color else None,
                backend_host=self._ns_addr[color] if color else "",
                backend_unit=backend_unit(str(color)) if color else "",
                pgbouncer_set_up=made[1],
                cert=made[2],
                postgres_cluster=made[3],
            )
        return self._targets
