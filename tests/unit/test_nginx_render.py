from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config, nginx
from appliance.errors import ConfigError
from appliance.paths import Paths


def test_site_has_seed_routes_headers_and_limits(tmp_path: Path) -> None:
    cfg = config.parse('[site]\ndomain = "pbx.example.com"\n[nginx]\napi_rate = "20r/s"\n')
    site = nginx.render_site(cfg, Paths(tmp_path), ipv6=False)
    for needle in (
        "server_name pbx.example.com;",
        "location ^~ /api/ {",
        "location ^~ /static/ {",
        "location ^~ /ws/ {",
        "location ^~ /socket.io/ {",
        "location /.well-known/acme-challenge/ {",
        "limit_req_zone $aipbx_limit_key zone=aipbx_api:10m rate=20r/s;",
        "client_max_body_size 50m;",
        'add_header X-Frame-Options "SAMEORIGIN" always;',
        "proxy_set_header Upgrade $http_upgrade;",
        "try_files $uri $uri/ /index.html @aipbx_no_frontend;",
        # the redirect names the configured domain, never the client's Host header
        "return 301 https://pbx.example.com$request_uri;",
        "listen 127.0.0.1:5005;",
        "listen 127.0.0.1:3033;",
        f"include {tmp_path}/etc/aipbx/nginx-upstream.conf;",
        # loaded at every handshake from the store's current directory (no reload to renew)
        "ssl_certificate     $aipbx_tls_dir/fullchain.pem;",
        "ssl_certificate_key $aipbx_tls_dir/privkey.pem;",
        f"default {tmp_path}/etc/aipbx-tls/current;",
    ):
        assert needle in site, needle
    assert "listen [::]" not in site


def test_every_location_that_adds_headers_keeps_the_security_headers(tmp_path: Path) -> None:
    # nginx drops inherited add_header lines in a block that has its own.
    site = nginx.render_site(config.parse(""), Paths(tmp_path), ipv6=True)
    blocks = site.split("location ")
    for block in blocks[1:]:
        body = block.split("\n    }")[0]
        if "add_header" in body:
            assert "X-Content-Type-Options" in body, body


def _tls_locations(site: str) -> dict[str, str]:
    """The TLS server's location blocks, by their head (`^~ /api/`, `= /api/auth/login`)."""
    tls = site.split("listen 443 ssl")[1].split("\n}\n")[0]
    blocks = {}
    for block in tls.split("\n    location ")[1:]:
        head, _, body = block.partition(" {\n")
        blocks[head] = body.split("\n    }")[0]
    return blocks


def _header_names(body: str, directive: str) -> set[str]:
    return {
        ln.split()[1].rstrip(";").lower()
        for ln in body.splitlines()
        if ln.strip().startswith(directive + " ")
    }


@pytest.mark.parametrize("maintenance", [False, True])
def test_backend_routes_win_over_the_spa_asset_regex(tmp_path: Path, maintenance: bool) -> None:
    # A prefix location without ^~ loses to any regex that matches: /static/x.jpg,
    # /api/files/x.png and /socket.io/socket.io.js would be looked up in the SPA's root.
    locations = _tls_locations(
        nginx.render_site(config.parse(""), Paths(tmp_path), ipv6=False, maintenance=maintenance)
    )
    for head, body in locations.items():
        if "proxy_pass" in body or "return 503;" in body:
            assert head.startswith(("^~ ", "= ")), head
    assert {"^~ /api/", "= /api/auth/login", "^~ /static/", "^~ /ws/", "^~ /socket.io/"} <= set(
        locations
    )
    if maintenance:
        for head in ("^~ /api/", "= /api/auth/login", "^~ /static/", "^~ /ws/", "^~ /socket.io/"):
            assert "return 503;" in locations[head], head


def _ca_issued(tmp_path: Path, domain: str = "pbx.example.com") -> config.Config:
    """A config whose domain has a certbot certificate (tls_files only looks for the files)."""
    live = tmp_path / "etc/letsencrypt/live" / domain
    live.mkdir(parents=True)
    (live / "fullchain.pem").write_text("x")
    (live / "privkey.pem").write_text("x")
    return config.parse(f'[site]\ndomain = "{domain}"\n')


@pytest.mark.parametrize("ca_issued", [False, True])
def test_every_proxied_location_hides_the_apps_version_of_our_headers(
    tmp_path: Path, ca_issued: bool
) -> None:
    cfg = _ca_issued(tmp_path) if ca_issued else config.parse("")
    site = nginx.render_site(cfg, Paths(tmp_path), ipv6=False)
    server_level = site.split("listen 443 ssl")[1].split("    location")[0]
    ours = _header_names(server_level, "add_header")
    assert "referrer-policy" in ours
    assert ("strict-transport-security" in ours) == ca_issued
    proxied = {h: b for h, b in _tls_locations(site).items() if "proxy_pass" in b}
    assert len(proxied) == 5
    for head, body in proxied.items():
        hidden = _header_names(body, "proxy_hide_header")
        assert ours | {"strict-transport-security"} <= hidden, (head, ours - hidden)
        # whatever a location adds itself is hidden from the app too
        assert _header_names(body, "add_header") <= hidden, head
    static = proxied["^~ /static/"]
    assert "expires 7d;" in static and 'add_header Cache-Control "public";' in static
    assert {"cache-control", "expires"} <= _header_names(static, "proxy_hide_header")
    # the service ports pass the app's answer through untouched
    assert "proxy_hide_header" not in site.split("# The host's service ports")[1]


def test_spa_assets_keep_immutable_caching(tmp_path: Path) -> None:
    locations = _tls_locations(nginx.render_site(config.parse(""), Paths(tmp_path), ipv6=False))
    (asset,) = [b for h, b in locations.items() if h.startswith("~*")]
    assert 'add_header Cache-Control "public, immutable";' in asset
    assert "try_files $uri @aipbx_earlier_asset;" in asset and "proxy_pass" not in asset
    # what the live release lacks comes from the earlier releases' links, cached the same
    earlier = locations["@aipbx_earlier_asset"]
    assert f"root {tmp_path}/opt/aipbx/frontend/assets;" in earlier
    assert 'add_header Cache-Control "public, immutable";' in earlier
    assert "try_files $uri =404;" in earlier and "X-Frame-Options" in earlier
    # pages are asked again at every load; the manifest is not the site's
    assert 'add_header Cache-Control "no-cache" always;' in locations["/"]
    assert "return 404;" in locations["= /aipbx-release.toml"]


def test_letsencrypt_cert_is_preferred_when_present(tmp_path: Path) -> None:
    live = tmp_path / "etc/letsencrypt/live/pbx.example.com"
    live.mkdir(parents=True)
    (live / "fullchain.pem").write_text("x")
    (live / "privkey.pem").write_text("x")
    cfg = config.parse('[site]\ndomain = "pbx.example.com"\n')
    assert nginx.tls_files(cfg, Paths(tmp_path)).cert == live / "fullchain.pem"


def test_upstream_is_the_live_color_address_without_keepalive() -> None:
    text = nginx.render_upstream(config.parse(""))
    assert "server 127.203.0.1:5005;" in text
    assert "server 127.203.0.1:3033;" in text
    # a kept-alive upstream connection would stay on the old color after a switch
    assert not any(ln.strip().startswith("keepalive") for ln in text.splitlines())


def test_drain_goes_to_worker_shutdown_timeout() -> None:
    cfg = config.parse('[nginx]\nworker_shutdown_timeout = "5m"\n')
    assert "worker_shutdown_timeout 300s;" in nginx.render_main(cfg)


def test_test_conf_swaps_in_the_candidates(tmp_path: Path) -> None:
    confd = tmp_path / "etc/nginx/conf.d"
    confd.mkdir(parents=True)
    (confd / "other.conf").write_text("")
    (confd / "aipbx.conf").write_text("old")
    (tmp_path / "etc/nginx/modules-enabled").mkdir(parents=True)
    text = (
        "include /etc/nginx/modules-enabled/*.conf;\nhttp {\n"
        "  include /etc/nginx/conf.d/*.conf;\n}\n"
    )
    site, main = tmp_path / "cand-site", tmp_path / "cand-main"
    out = nginx._test_main_conf(text, Paths(tmp_path), site, main)
    assert out is not None
    assert f"include {confd}/other.conf;" in out
    assert f"include {site};" in out and f"include {main};" in out
    assert "aipbx.conf" not in out
    assert nginx._test_main_conf("http {}", Paths(tmp_path), site, main) is None


@pytest.mark.parametrize(
    ("toml", "ca_issued", "want"),
    [
        ("", False, None),
        ("[nginx]\nhsts_preload = true\n", False, None),
        ("", True, "max-age=63072000; includeSubDomains"),
        ("[nginx]\nhsts_preload = true\n", True, "max-age=63072000; includeSubDomains; preload"),
    ],
)
def test_hsts_only_with_a_ca_issued_certificate_and_preload_only_when_asked(
    tmp_path: Path, toml: str, ca_issued: bool, want: str | None
) -> None:
    cfg = _ca_issued(tmp_path) if ca_issued else config.parse("")
    cfg = config.parse(toml + (f'[site]\ndomain = "{cfg.site.domain}"\n' if ca_issued else ""))
    site = nginx.render_site(cfg, Paths(tmp_path), ipv6=False)
    sent = {ln.split('"')[1] for ln in site.splitlines() if "add_header Strict-Transport" in ln}
    assert sent == ({want} if want else set())


def test_the_redirect_never_uses_the_clients_host_header(tmp_path: Path) -> None:
    for cfg in (config.parse(""), config.parse('[site]\ndomain = "pbx.example.com"\n')):
        site = nginx.render_site(cfg, Paths(tmp_path), ipv6=True)
        assert "$host" not in site.split("return 301")[1].splitlines()[0]
    # every server block hides nginx's version
    assert site.count("server {") == site.count("server_tokens off;") == 4


def test_hsts_preload_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="hsts_preload"):
        config.parse('[nginx]\nhsts_preload = "yes"\n')


def test_the_candidates_test_names_its_own_pid_file() -> None:
    debian = "user www-data;\nworker_processes auto;\npid /run/nginx.pid;\ninclude x;\n"
    assert nginx.with_pid(debian, Path("/tmp/t/nginx.pid")) == debian.replace(
        "/run/nginx.pid", "/tmp/t/nginx.pid"
    )
    assert nginx.with_pid("user www-data;\n", Path("/t/p")) == "pid /t/p;\nuser www-data;\n"
