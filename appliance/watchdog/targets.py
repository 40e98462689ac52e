"""Where the checks look on this host, read afresh every round but cheaply: state.json is
parsed again only when it changed (the live color moves with upgrades and rollbacks)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from appliance import acme, state, tls_store
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


class LiveTargets:
    def __init__(self, cfg: Config, paths: Paths) -> None:
        self.cfg = cfg
        self.paths = paths
        self._key: tuple[int, int, int] | None = None
        self._color: Color | None = None

    def live_color(self) -> Color | None:
        try:
            st = os.stat(self.paths.state)
        except FileNotFoundError:
            self._key, self._color = None, None
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            try:
                self._color = state.load(self.paths.state).live_color
            except Exception as e:  # keep the last known color; say so once per change
                log.error("%s", e, extra={"fields": {"action": "read_state"}})
            self._key = key
        return self._color

    def __call__(self) -> Targets:
        color = self.live_color()
        c = self.cfg
        ns_addr = color_net(c.network.subnet, color).ns_addr if color else ""
        return Targets(
            color=str(color) if color else None,
            backend_host=ns_addr,
            backend_unit=backend_unit(str(color)) if color else "",
            http_port=c.backend.http_port,
            ws_port=c.backend.ws_port,
            nginx_port=c.nginx.https_port,
            postgres_port=c.database.postgres_port,
            pgbouncer_port=c.database.pgbouncer_port,
            pgbouncer_set_up=self.paths.pgbouncer_ini.exists(),
            db_user=c.database.user,
            db_name=c.database.name,
            disk_paths=(self.paths.var, self.paths.opt, self.paths.backups),
            cert=cert_path(c, self.paths),
            backup_status=self.paths.var / "backup-status.json",
            renewal_status=acme.status_path(self.paths),
        )
