"""The nginx side of the appliance: render the site, the main-context snippet and the live
color's upstream include (pure), then apply them so that a broken render never reaches the
running nginx: the candidate is tested with `nginx -t` before it is put in place."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance import frontend_assets, tls_store, validate
from appliance.colors import LIVE_ADDR
from appliance.config import Config
from appliance.errors import CommandError, NginxConfigError
from appliance.fsutil import write_if_changed
from appliance.paths import Paths
from appliance.release.manifest import MANIFEST_NAME
from appliance.run import run
from appliance.services import Services
from appliance.templates import render

NGINX_CONF = Path("/etc/nginx/nginx.conf")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


def tls_files(cfg: Config, paths: Paths) -> TlsFiles:
    """Where the certificate to serve comes from: the ACME certificate for the configured
    domain when certbot has one, else the self-signed one made at install. nginx serves a
    checked copy from appliance.tls_store."""
    if cfg.site.domain:
        live = paths.root / "etc/letsencrypt/live" / cfg.site.domain
        if (live / "fullchain.pem").exists() and (live / "privkey.pem").exists():
            return TlsFiles(live / "fullchain.pem", live / "privkey.pem")
    return TlsFiles(paths.selfsigned_cert, paths.selfsigned_key)


def render_site(
    cfg: Config,
    paths: Paths,
    *,
    ipv6: bool,
    maintenance: bool = False,
    tls_dir: Path | None = None,
) -> str:
    """`maintenance`: /api/, the WebSocket routes and the service ports answer 503 with
    Retry-After (the @aipbx_unavailable page) while `aipbxctl restore` runs. `tls_dir`:
    the certificate store's directory to serve (default: the one served now)."""
    bind = cfg.nginx.service_bind
    host = f"[{bind}]" if ":" in bind else bind

    def service_listen(port: int) -> str:
        return f"{host}:{port}"

    return render(
        "nginx/site.conf.j2",
        nginx=cfg.nginx,
        backend=cfg.backend,
        server_name=cfg.site.domain or "_",
        domain=cfg.site.domain,
        self_signed=tls_files(cfg, paths).cert == paths.selfsigned_cert,
        tls_dir=tls_dir or tls_store.served_dir(paths),
        ipv6=ipv6,
        upstream_path=paths.nginx_upstream,
        acme_webroot=paths.acme_webroot,
        frontend_root=paths.frontend / "current",
        frontend_assets=paths.frontend / frontend_assets.LINK,
        manifest_name=MANIFEST_NAME,
        service_listen=service_listen,
        maintenance=maintenance,
    )


def render_main(cfg: Config) -> str:
    return render(
        "nginx/main.conf.j2",
        drain_s=validate.duration_seconds(cfg.nginx.worker_shutdown_timeout),
    )


def render_upstream(cfg: Config) -> str:
    return render(
        "nginx/upstream.conf.j2",
        live_addr=LIVE_ADDR,
        http_port=cfg.backend.http_port,
        ws_port=cfg.backend.ws_port,
    )


def ipv6_available(paths: Paths) -> bool:
    return (paths.root / "proc/net/if_inet6").exists()


# --- applying -------------------------------------------------------------------------


def _test_main_conf(nginx_conf: str, paths: Paths, site: Path, main: Path) -> str | None:
    """A copy of nginx.conf whose conf.d and modules-enabled globs are expanded, with our
    files swapped for the candidates. None when nginx.conf has no such includes (an admin
    changed it): the caller then tests in place."""
    ours = {
        "conf.d": (paths.nginx_site.name, site),
        "modules-enabled": (paths.nginx_main_snippet.name, main),
    }
    seen: set[str] = set()

    def expand(m: re.Match[str]) -> str:
        name, candidate = ours[m.group(2)]
        seen.add(m.group(2))
        directory = paths.root / m.group(1).lstrip("/")
        files = [p for p in sorted(directory.glob("*.conf")) if p.name != name]
        return "\n".join(f"include {f};" for f in [*files, candidate])

    text = re.sub(
        r"include\s+(/etc/nginx/(conf\.d|modules-enabled))/\*\.conf\s*;", expand, nginx_conf
    )
    return text if seen == set(ours) else None


def nginx_test(conf: Path | None = None) -> None:
    argv = ["nginx", "-t", "-q"] + (["-c", str(conf)] if conf else [])
    try:
        run(argv)
    except CommandError as e:
        raise NginxConfigError(
            f"nginx refused the configuration: {e.stderr.strip().splitlines()[-1]}"
            if e.stderr.strip()
            else f"nginx -t failed ({e.returncode})",
            hint="nothing was reloaded; check /etc/aipbx/aipbx.toml (`aipbxctl config check`)",
        ) from e


def _put(files: dict[Path, str]) -> bool:
    changed = False
    for path, text in files.items():
        changed |= write_if_changed(path, text)
    return changed


def test_candidates(paths: Paths, *, site: str, main: str, upstream: str) -> bool:
    """nginx -t the candidate files without putting them in place. False when nginx.conf
    was changed by an admin and the candidates cannot be tested beside it."""
    with tempfile.TemporaryDirectory(prefix="aipbx-nginx-") as tmp:
        t = Path(tmp)
        cand_site, cand_main, cand_up = t / "aipbx.conf", t / "main.conf", t / "upstream.conf"
        cand_up.write_text(upstream)
        cand_site.write_text(site.replace(str(paths.nginx_upstream), str(cand_up)))
        cand_main.write_text(main)
        nginx_conf = (paths.root / NGINX_CONF.relative_to("/")).read_text()
        test_conf = _test_main_conf(nginx_conf, paths, cand_site, cand_main)
        if test_conf is None:
            return False
        # `nginx -t` creates and removes the pid file it names: its own, not the running
        # master's /run/nginx.pid (which a sandboxed caller, certbot's hook, cannot write).
        (t / "nginx.conf").write_text(with_pid(test_conf, t / "nginx.pid"))
        nginx_test(t / "nginx.conf")
        return True


def with_pid(nginx_conf: str, pid: Path) -> str:
    """Pure: nginx.conf with its main-context `pid` directive naming `pid` instead."""
    text, n = re.subn(r"(?m)^\s*pid\s+[^;]*;", f"pid {pid};", nginx_conf, count=1)
    return text if n else f"pid {pid};\n{nginx_conf}"


def apply(
    paths: Paths,
    services: Services,
    *,
    site: str,
    main: str,
    upstream: str,
    reload: bool = True,
) -> bool:
    """Test the candidate files with nginx -t, put them in place atomically, reload nginx
    gracefully if anything changed and it runs. Returns whether anything changed."""
    files = {paths.nginx_upstream: upstream, paths.nginx_main_snippet: main, paths.nginx_site: site}
    if test_candidates(paths, site=site, main=main, upstream=upstream):
        changed = _put(files)
    else:
        # nginx.conf was changed by an admin: test in place and put the old files back
        # if nginx refuses the new ones, before anything reloads.
        before = {p: p.read_text() if p.exists() else None for p in files}
        changed = _put(files)
        try:
            nginx_test()
        except NginxConfigError:
            for p, old in before.items():
                if old is None:
                    p.unlink(missing_ok=True)
                else:
                    write_if_changed(p, old)
            raise
    if changed and reload:
        reload_nginx(services)
    return changed


def reload_nginx(services: Services) -> None:
    """Graceful: new workers take new connections, old ones finish theirs (WebSockets up to
    worker_shutdown_timeout)."""
    if services.is_active("nginx.service"):
        services.reload("nginx.service")
    else:
        services.start("nginx.service")
