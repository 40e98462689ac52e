"""`aipbxctl setup` and `aipbxctl install-defaults`: idempotent; a second run changes
nothing and says so. Every step reports what it changed."""

from __future__ import annotations

import pwd
from dataclasses import dataclass, field

from appliance import (
    appenv,
    backup_units,
    cert,
    conffile,
    database,
    netcheck,
    nginx,
    pgbouncer,
    secrets,
    shared,
    state,
    tls_store,
    validate,
)
from appliance import config as config_mod
from appliance.colors import Color
from appliance.config import Config
from appliance.errors import UsageError
from appliance.fsutil import locked, write_if_changed
from appliance.log import audit
from appliance.paths import Paths
from appliance.services import Services, systemd_is_running

PGBOUNCER_UNIT = "aipbx-pgbouncer.service"
DEBIAN_PGBOUNCER = "pgbouncer.service"
BACKEND_DROPIN = "etc/systemd/system/aipbx-backend@.service.d/50-aipbx-limits.conf"


@dataclass
class Report:
    changes: list[str] = field(default_factory=list)

    def add(self, items: list[str] | str | None) -> None:
        if isinstance(items, str):
            self.changes.append(items)
        elif items:
            self.changes.extend(items)


def apply_site_options(
    paths: Paths, domain: str | None, email: str | None, public_ip: str | None
) -> list[str]:
    """Persist --domain/--email/--public-ip into aipbx.toml, validated before writing."""
    wanted = {
        k: v
        for k, v in (("domain", domain), ("email", email), ("public_ip", public_ip))
        if v is not None
    }
    if not wanted:
        return []
    text = config_mod.read_text(paths.config)
    new = conffile.set_keys(text, "site", wanted)
    config_mod.parse(new, f"{paths.config} (with the command-line options)")
    if new == text:
        return []
    write_if_changed(paths.config, new, mode=paths.config.stat().st_mode & 0o777)
    return [f"set site.{k} in {paths.config}" for k in wanted]


def ensure_selfsigned(cfg: Config, paths: Paths) -> list[str]:
    if paths.selfsigned_cert.exists() and paths.selfsigned_key.exists():
        return []
    cert.make_selfsigned(
        paths.selfsigned_cert, paths.selfsigned_key, cert.selfsigned_names(cfg.site.domain)
    )
    return [f"made a self-signed certificate {paths.selfsigned_cert}"]


def ensure_nginx(cfg: Config, paths: Paths, services: Services) -> list[str]:
    changes = []
    if paths.nginx_default_site.is_symlink():
        # Debian's default site also claims port 80 as default_server.
        paths.nginx_default_site.unlink()
        changes.append(f"disabled nginx's default site ({paths.nginx_default_site})")
    paths.acme_webroot.mkdir(parents=True, exist_ok=True)
    (paths.frontend).mkdir(parents=True, exist_ok=True)
    src = nginx.tls_files(cfg, paths)
    kind = "self-signed" if src.cert == paths.selfsigned_cert else "acme"
    placed = tls_store.place(paths, src.cert, src.key, kind=kind)
    site = nginx.render_site(cfg, paths, ipv6=nginx.ipv6_available(paths), tls_dir=placed.dir)
    if nginx.apply(
        paths,
        services,
        site=site,
        main=nginx.render_main(cfg),
        upstream=nginx.render_upstream(cfg),
        # Without systemd (a chroot, piuparts) nginx reads the files when it next starts.
        reload=systemd_is_running(),
    ):
        changes.append(f"rendered and reloaded the nginx site {paths.nginx_site}")
    if tls_store.current(paths) != placed.dir:
        tls_store.commit(paths, placed.dir)
        changes.append(f"nginx serves the {kind} certificate {src.cert} from {placed.dir}")
    elif placed.chain_changed:
        changes.append(f"nginx serves the renewed {src.cert} (loaded per handshake, no reload)")
    return changes


def ensure_pgbouncer(cfg: Config, paths: Paths, services: Services, password: str) -> list[str]:
    changes = []
    try:
        pg = pwd.getpwnam("postgres")
        uid, gid = pg.pw_uid, pg.pw_gid
    except KeyError:
        uid = gid = -1
    userlist = paths.pgbouncer_userlist
    # Loopback for local tools, and the host end of each color's veth for the backends.
    listen = [addr for addr, _ in pgbouncer.listen_addrs(cfg.network.subnet)]
    changed = write_if_changed(
        userlist,
        pgbouncer.render_userlist(cfg.database.user, password),
        mode=0o640,
        uid=uid,
        gid=gid,
    )
    changed |= write_if_changed(
        paths.pgbouncer_ini,
        pgbouncer.render_ini(cfg.database, listen=listen, userlist=str(userlist)),
        mode=0o640,
        uid=0,
        gid=gid,
    )
    if changed:
        changes.append("rendered PgBouncer's configuration")
    if services.state(DEBIAN_PGBOUNCER).enabled == "enabled" or services.is_active(
        DEBIAN_PGBOUNCER
    ):
        services.disable(DEBIAN_PGBOUNCER, now=True)
        changes.append(
            "stopped and disabled Debian's pgbouncer.service (the appliance runs "
            f"its own, {PGBOUNCER_UNIT})"
        )
    for c in Color:  # PgBouncer binds the veth addresses: their namespaces come first
        unit = f"aipbx-netns@{c}.service"
        if not services.is_active(unit):
            services.start(unit)
            changes.append(f"started {unit}")
    if changed or not services.is_active(PGBOUNCER_UNIT):
        services.restart(PGBOUNCER_UNIT)
        changes.append(f"(re)started {PGBOUNCER_UNIT}")
    return changes


def ensure_backend_limits(cfg: Config, paths: Paths, services: Services) -> list[str]:
    dropin = f"""\
# Generated by `aipbxctl setup` from /etc/aipbx/aipbx.toml [backend]: do not edit.
[Service]
MemoryMax={validate.systemd_memory(cfg.backend.memory_max)}
CPUQuota={cfg.backend.cpu_quota}
"""
    if write_if_changed(paths.root / BACKEND_DROPIN, dropin):
        services.daemon_reload()
        return ["wrote the backend's resource limits (MemoryMax, CPUQuota)"]
    return []


def ensure_state(paths: Paths, version: str) -> list[str]:
    existed = paths.state.exists()
    current = state.load(paths.state)
    if existed and current.setup_version == version:
        return []
    state.save(paths.state, current.with_(setup_version=version))
    return [f"recorded setup of version {version} in {paths.state}"]


def install_defaults(paths: Paths, services: Services) -> Report:
    """What the package runs at install: TLS from the first minute with the defaults."""
    report = Report()
    cfg = config_mod.load(paths.config)
    with locked(paths.lock, "change"):
        report.add(ensure_selfsigned(cfg, paths))
        report.add(ensure_nginx(cfg, paths, services))
        # The app's environment: created once, never overwritten (not a conffile: an
        # upgrade of the package keeps it; purge removes /etc/aipbx).
        report.add(appenv.ensure_file(paths.backend_env))
        # The watchdog's alert credentials: root's only, never in secrets.env.
        report.add(secrets.separate(paths.secrets, paths.alerts_env))
        # The running releases' shared dirs are the app's (an older appliance seeded as root).
        report.add(shared.repair_in_use(paths))
    return report


def setup(
    paths: Paths,
    services: Services,
    *,
    domain: str | None,
    email: str | None,
    public_ip: str | None,
    version: str,
) -> Report:
    report = Report()
    for flag, value in (("--domain", domain), ("--email", email), ("--public-ip", public_ip)):
        if value is not None and value.strip() != value:
            raise UsageError(f"{flag} {value!r} has surrounding spaces")
    with locked(paths.lock, "change"):
        report.add(apply_site_options(paths, domain, email, public_ip))
        cfg = config_mod.load(paths.config)
        config_mod.check_host(cfg, paths.config, netcheck.host_routes())
        # Alert credentials out of secrets.env, which the backend's group reads.
        report.add(secrets.separate(paths.secrets, paths.alerts_env))
        values, changed = secrets.ensure(paths.secrets)
        if changed:
            report.add(f"wrote secrets to {paths.secrets} (0640 root:_aipbx)")
        report.add(appenv.ensure_file(paths.backend_env))
        if not services.is_active("postgresql.service"):
            services.start("postgresql.service")
            report.add("started PostgreSQL")
        report.add(database.ensure(cfg.database, values["DB_PASS"]))
        report.add(ensure_pgbouncer(cfg, paths, services, values["DB_PASS"]))
        report.add(backup_units.ensure_setup(paths, cfg, services))
        report.add(ensure_selfsigned(cfg, paths))
        report.add(ensure_backend_limits(cfg, paths, services))
        report.add(ensure_nginx(cfg, paths, services))
        report.add(ensure_state(paths, version))
        report.add(shared.repair_in_use(paths))
    audit("setup", "ok" if report.changes else "unchanged", changes=len(report.changes))
    return report
