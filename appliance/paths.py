"""Where the appliance keeps things. One frozen dataclass so tests can point every path under a
temporary root instead of the host's /."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/")

    def _p(self, rel: str) -> Path:
        return self.root / rel

    # configuration
    @property
    def etc(self) -> Path:
        return self._p("etc/aipbx")

    @property
    def config(self) -> Path:
        return self.etc / "aipbx.toml"

    @property
    def secrets(self) -> Path:
        return self.etc / "secrets.env"

    @property
    def alerts_env(self) -> Path:
        # The watchdog's alert credentials, 0600 root: the backend's group reads secrets.env.
        return self.etc / "alerts.env"

    @property
    def backend_env(self) -> Path:
        # The operator's environment for the app (appliance.appenv), 0640 root:_aipbx.
        return self.etc / "backend.env"

    @property
    def tls_dir(self) -> Path:
        return self.etc / "tls"

    @property
    def selfsigned_cert(self) -> Path:
        return self.tls_dir / "selfsigned.crt"

    @property
    def selfsigned_key(self) -> Path:
        return self.tls_dir / "selfsigned.key"

    @property
    def tls_served(self) -> Path:
        # What nginx serves, one directory per key (appliance.tls_store). Outside /etc/aipbx
        # (0750 root:_aipbx): nginx's workers (www-data) read it at every TLS handshake.
        return self._p("etc/aipbx-tls")

    # releases and state
    @property
    def opt(self) -> Path:
        return self._p("opt/aipbx")

    @property
    def releases(self) -> Path:
        return self.opt / "releases"

    @property
    def colors(self) -> Path:
        return self.opt / "colors"

    @property
    def frontend(self) -> Path:
        return self.opt / "frontend"

    @property
    def var(self) -> Path:
        return self._p("var/lib/aipbx")

    @property
    def watchdog_var(self) -> Path:
        # The only directory the watchdog may write (its unit's StateDirectory=): its spool.
        return self.var / "watchdog"

    @property
    def shared(self) -> Path:
        return self.var / "shared"

    @property
    def state(self) -> Path:
        return self.var / "state.json"

    @property
    def acme_webroot(self) -> Path:
        # Outside /var/lib/aipbx (0750): nginx's workers (www-data) must read it.
        return self._p("var/www/aipbx-acme")

    @property
    def run(self) -> Path:
        return self._p("run/aipbx")

    @property
    def lock(self) -> Path:
        return self.run / "mutation.lock"

    @property
    def backups(self) -> Path:
        return self._p("var/backups/aipbx")

    # files the appliance generates for other packages (removed on purge)
    @property
    def nginx_site(self) -> Path:
        return self._p("etc/nginx/conf.d/aipbx.conf")

    @property
    def nginx_main_snippet(self) -> Path:
        return self._p("etc/nginx/modules-enabled/90-aipbx-main.conf")

    @property
    def nginx_upstream(self) -> Path:
        return self.etc / "nginx-upstream.conf"

    @property
    def nginx_default_site(self) -> Path:
        return self._p("etc/nginx/sites-enabled/default")

    @property
    def pgbouncer_ini(self) -> Path:
        return self.etc / "pgbouncer.ini"

    @property
    def pgbouncer_userlist(self) -> Path:
        return self.etc / "pgbouncer-userlist.txt"
