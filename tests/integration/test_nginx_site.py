"""The rendered site under a real nginx on loopback: TLS, headers, routes, the 503 page."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance import cert, config, frontend_assets, nginx, tls_store
from appliance.paths import Paths
from tests.integration.procs import free_port, port_open, stop, wait_for

pytestmark = pytest.mark.integration


class _Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"api {self.path} host={self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def www_root() -> Iterator[Path]:
    """A root nginx's unprivileged workers can traverse, as on a real host (pytest's
    tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="aipbx-nginx-it-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def backend() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sk", "--max-time", "5", *args], capture_output=True, text=True, check=False
    )


def _start(
    tmp: Path, backend_port: int | None, *, maintenance: bool = False, ca_issued: bool = True
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """`ca_issued`: serve the certificate as certbot's for the domain `pbx.example.com` (HSTS is
    sent); otherwise as the self-signed default with no domain configured."""
    ports = {k: free_port() for k in ("http", "https", "svc_http", "svc_ws")}
    base = config.parse('[site]\ndomain = "pbx.example.com"\n' if ca_issued else "")
    cfg = replace(
        base,
        nginx=replace(
            base.nginx,
            http_port=ports["http"],
            https_port=ports["https"],
            client_max_body_size="1k",
        ),
        backend=replace(base.backend, http_port=ports["svc_http"], ws_port=ports["svc_ws"]),
    )
    paths = Paths(tmp)
    cert.make_selfsigned(paths.selfsigned_cert, paths.selfsigned_key, ["localhost", "127.0.0.1"])
    if ca_issued:
        live = tmp / "etc/letsencrypt/live/pbx.example.com"
        live.mkdir(parents=True)
        shutil.copy(paths.selfsigned_cert, live / "fullchain.pem")
        shutil.copy(paths.selfsigned_key, live / "privkey.pem")
    # What setup does: a checked copy in the store, which the workers read at each handshake.
    placed = tls_store.place(paths, paths.selfsigned_cert, paths.selfsigned_key, kind="x")
    tls_store.commit(paths, placed.dir)
    site = nginx.render_site(cfg, paths, ipv6=False, tls_dir=placed.dir, maintenance=maintenance)
    # No nft table here: point the live-color address straight at the test's backend (or
    # at a closed port, as when no color is live).
    upstream = nginx.render_upstream(cfg)
    target = f"127.0.0.1:{backend_port}" if backend_port is not None else "127.0.0.1:9"
    for port in (ports["svc_http"], ports["svc_ws"]):
        upstream = upstream.replace(f"127.203.0.1:{port}", target)
    paths.nginx_upstream.parent.mkdir(parents=True, exist_ok=True)
    paths.nginx_upstream.write_text(upstream)
    challenge = paths.acme_webroot / ".well-known/acme-challenge"
    challenge.mkdir(parents=True)
    (challenge / "tok").write_text("challenge-ok")
    for d in (tmp / "var", tmp / "var/www", paths.acme_webroot, challenge.parent, challenge):
        d.chmod(0o755)
    (tmp / "site.conf").write_text(site)
    (tmp / "main.conf").write_text(nginx.render_main(cfg))
    (tmp / "nginx.conf").write_text(
        f"""daemon off;
user {tls_store.NGINX_GROUP};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
include {tmp}/main.conf;
events {{}}
http {{
  access_log off;
  include /etc/nginx/mime.types;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  include {tmp}/site.conf;
}}
"""
    )
    subprocess.run(["nginx", "-t", "-q", "-c", f"{tmp}/nginx.conf"], check=True)
    proc = subprocess.Popen(["nginx", "-c", f"{tmp}/nginx.conf"])
    wait_for(lambda: port_open(ports["https"]), what="nginx")
    return proc, ports


def test_tls_site_with_headers_routes_and_redirect(www_root: Path, backend: int) -> None:
    proc, ports = _start(www_root, backend)
    try:
        https = f"https://127.0.0.1:{ports['https']}"
        r = _curl("-D", "-", f"{https}/api/calls")
        assert r.stdout.startswith("HTTP/2 200"), r.stdout
        headers = r.stdout.lower()
        for h in (
            "strict-transport-security: max-age=63072000",
            "x-frame-options: sameorigin",
            "x-content-type-options: nosniff",
            "referrer-policy: strict-origin-when-cross-origin",
            "content-security-policy: default-src 'self'",
        ):
            assert h in headers, h
        assert "api /api/calls" in r.stdout
        # port 80 serves the ACME webroot and redirects everything else
        http = f"http://127.0.0.1:{ports['http']}"
        assert _curl(f"{http}/.well-known/acme-challenge/tok").stdout == "challenge-ok"
        redirect = _curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", f"{http}/x")
        assert redirect.stdout == f"301 https://pbx.example.com:{ports['https']}/x"
        # the host's service port follows the live color
        assert "api /api/x" in _curl(f"http://127.0.0.1:{ports['svc_http']}/api/x").stdout
        # a body over client_max_body_size is refused by nginx
        big = _curl(
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--data-binary",
            "x" * 2048,
            f"{https}/api/upload",
        )
        assert big.stdout == "413"
    finally:
        stop(proc)


def test_no_live_color_gives_a_503_with_retry_after(www_root: Path) -> None:
    proc, ports = _start(www_root, None)
    try:
        r = _curl("-D", "-", f"https://127.0.0.1:{ports['https']}/api/x")
        assert r.stdout.startswith("HTTP/2 503"), r.stdout
        assert "retry-after: 5" in r.stdout.lower()
        assert '"error":"backend unavailable"' in r.stdout
        assert "x-frame-options" in r.stdout.lower()
    finally:
        stop(proc)


# --- the real app's answers through nginx: route precedence, one value per header --------

# What the real backend (NestJS + helmet 8, serve-static for ./static) sends on every answer.
APP_HEADERS = {
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-XSS-Protection": "0",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'",
    "Cross-Origin-Resource-Policy": "cross-origin",
}
# The appliance's (nginx/site.conf.j2), lower-cased as HTTP/2 sends them.
OURS = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-xss-protection": "1; mode=block",
    "referrer-policy": "strict-origin-when-cross-origin",
    "x-frame-options": "SAMEORIGIN",
    "x-content-type-options": "nosniff",
}
IMAGE = bytes(range(256)) * 37 + b"\xff\xd9"  # not text: the bytes must arrive unchanged


class _App(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/static/"):
            body, ctype = IMAGE, "image/jpeg"
            extra = {"Cache-Control": "public, max-age=0", "ETag": 'W/"1"'}
        else:
            body, ctype = f"app {self.path}".encode(), "text/plain"
            extra = {"Cache-Control": "no-store, no-cache, must-revalidate", "Pragma": "no-cache"}
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**APP_HEADERS, **extra}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def _get(url: str, tmp: Path) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, every header line (name lower-cased, in order) and the body's bytes."""
    head, body = tmp / "curl-head", tmp / "curl-body"  # tmp/body is nginx's temp dir
    subprocess.run(
        ["curl", "-sk", "--max-time", "5", "-D", str(head), "-o", str(body), url], check=True
    )
    lines = head.read_text().splitlines()
    headers = []
    for ln in lines[1:]:
        name, sep, value = ln.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    return int(lines[0].split()[1]), headers, body.read_bytes()


def _values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n == name]


def _spa(tmp: Path, subdir: str = "") -> None:
    """A frontend build where nginx serves it from: index.html and a hashed chunk (and a
    prerendered route's directory)."""
    root = Paths(tmp).frontend / "current"
    root.mkdir(parents=True)
    (root / "index.html").write_text("<html>spa</html>")
    if subdir:
        (root / subdir).mkdir()
        (root / subdir / "index.html").write_text("<html>prerendered</html>")
        (root / subdir).chmod(0o755)
    (root / "main.3f2a9c.js").write_text("console.log('spa')")
    for d in (root, *root.parents):
        if d == tmp:
            break
        d.chmod(0o755)


def test_backend_routes_win_over_spa_assets_with_one_value_per_header(
    www_root: Path, app: int
) -> None:
    _spa(www_root)
    proc, ports = _start(www_root, app)
    try:
        https = f"https://127.0.0.1:{ports['https']}"
        # /static/ (the app's shipped and uploaded images): the backend's bytes, 7 days public
        status, headers, body = _get(f"{https}/static/invoice-pechat.jpg", www_root)
        assert status == 200 and body == IMAGE
        assert sorted(_values(headers, "cache-control")) == ["max-age=604800", "public"]
        assert len(_values(headers, "expires")) == 1
        assert _values(headers, "etag") == ['W/"1"']
        # backend routes whose names look like SPA assets reach the backend
        for path in ("/api/files/x.png", "/socket.io/socket.io.js", "/ws/x.css", "/api/calls"):
            status, headers, body = _get(f"{https}{path}", www_root)
            assert (status, body) == (200, f"app {path}".encode()), path
            # the app's own no-store survives where nginx sets no caching of its own
            assert _values(headers, "cache-control") == [
                "no-store, no-cache, must-revalidate"
            ], path
        # every answer carries exactly one value of each security header: the appliance's
        for path in ("/static/x.jpg", "/api/x.png", "/socket.io/socket.io.js", "/api/x"):
            _, headers, _ = _get(f"{https}{path}", www_root)
            for name, value in OURS.items():
                assert _values(headers, name) == [value], (path, name)
            assert len(_values(headers, "content-security-policy")) == 1, path
            assert _values(headers, "cross-origin-resource-policy") == ["cross-origin"], path
        # the SPA's hashed assets: from the frontend root, cached for good
        status, headers, body = _get(f"{https}/main.3f2a9c.js", www_root)
        assert (status, body) == (200, b"console.log('spa')")
        assert "public, immutable" in _values(headers, "cache-control")
        assert _values(headers, "x-frame-options") == ["SAMEORIGIN"]
        assert _get(f"{https}/missing.3f2a9c.js", www_root)[0] == 404
        assert _get(f"{https}/calls/42", www_root)[2] == b"<html>spa</html>"
    finally:
        stop(proc)


def test_maintenance_answers_503_on_every_backend_route(www_root: Path, app: int) -> None:
    _spa(www_root)
    proc, ports = _start(www_root, app, maintenance=True)
    try:
        https = f"https://127.0.0.1:{ports['https']}"
        for path in ("/static/x.jpg", "/api/x.png", "/socket.io/socket.io.js", "/ws/x"):
            status, headers, body = _get(f"{https}{path}", www_root)
            assert status == 503, path
            assert b"maintenance" in body and _values(headers, "retry-after") == ["30"], path
        assert _get(f"{https}/main.3f2a9c.js", www_root)[0] == 200
    finally:
        stop(proc)


@pytest.mark.parametrize("maintenance", [False, True])
def test_nginx_answers_the_watchdogs_health_request_itself(
    www_root: Path, maintenance: bool
) -> None:
    """/aipbx-health on the loopback service listener: 204 from nginx itself, with no live
    color and in maintenance alike (the watchdog's nginx check must not depend on the
    backend); every other path there still goes to the live color."""
    proc, ports = _start(www_root, None, maintenance=maintenance)
    try:
        svc = f"http://127.0.0.1:{ports['svc_http']}"
        r = _curl("-o", "/dev/null", "-w", "%{http_code}", f"{svc}/aipbx-health")
        assert r.stdout == "204"
        r = _curl("-o", "/dev/null", "-w", "%{http_code}", f"{svc}/aipbx-healthz")
        # not ours: proxied to the live color (none here), or refused in maintenance
        assert r.stdout == ("503" if maintenance else "502")
    finally:
        stop(proc)


# --- the edges a client can poke (issue 11, item 4) ----------------------------------------


def _head(url: str, *extra: str) -> str:
    """The answer's status line and headers, lower-cased."""
    return _curl("-o", "/dev/null", "-D", "-", *extra, url).stdout.lower()


@pytest.mark.parametrize("ca_issued", [False, True])
def test_http_edges_redirect_tokens_hsts_and_no_frontend(
    www_root: Path, app: int, ca_issued: bool
) -> None:
    proc, ports = _start(www_root, app, ca_issued=ca_issued)
    try:
        http = f"http://127.0.0.1:{ports['http']}"
        https = f"https://127.0.0.1:{ports['https']}"
        # the redirect never reflects the client's Host header
        for host in ("evil.example", "127.0.0.1", "localhost"):
            head = _head(f"{http}/x?y=1", "-H", f"Host: {host}")
            assert head.startswith("http/1.1 301"), head
            want = "pbx.example.com" if ca_issued else "127.0.0.1"
            assert f"location: https://{want}:{ports['https']}/x?y=1\n" in head, head
            assert "evil" not in head
        # no port announces nginx's version, on answers and on nginx's own error pages
        for url in (
            f"{http}/x",
            f"{http}/.well-known/acme-challenge/missing",
            f"{https}/api/x",
            f"{https}/missing.3f2a9c.js",
            f"http://127.0.0.1:{ports['svc_http']}/x",
            f"http://127.0.0.1:{ports['svc_ws']}/x",
        ):
            head = _head(url)
            assert "server: nginx\n" in head, (url, head)
        # HSTS only with a CA-issued certificate, never `preload` by default; the app's
        # own HSTS never gets through
        for path in ("/api/x", "/static/x.jpg", "/socket.io/x"):
            _, headers, _ = _get(f"{https}{path}", www_root)
            hsts = _values(headers, "strict-transport-security")
            assert hsts == (["max-age=63072000; includeSubDomains"] if ca_issued else []), path
        # nginx's own redirect (a directory without its slash) is relative, whatever Host
        _spa(www_root, subdir="pricing")
        head = _head(f"{https}/pricing?x=1", "-H", "Host: evil.example")
        assert head.startswith("http/2 301") and "location: /pricing/?x=1\n" in head, head
        shutil.rmtree(Paths(www_root).frontend / "current")
        # no frontend deployed: GET / is a plain 404 that says so, with no rewrite cycle
        for path in ("/", "/calls/42", "/index.html"):
            status, _, body = _get(f"{https}{path}", www_root)
            assert (status, body) == (404, b"no frontend is deployed on this appliance\n"), path
        assert "cycle" not in (www_root / "error.log").read_text()
    finally:
        stop(proc)


def test_a_tab_of_the_earlier_frontend_gets_its_chunks_after_an_upgrade(
    www_root: Path, app: int
) -> None:
    """Release N's lazily loaded chunk is still served once N+1 is live; its index.html is
    not; pages are never cached, chunks for good; a collected release's chunks are gone."""
    paths = Paths(www_root)
    releases = {}
    for name, chunk in (("web-1", "412.aaaa.js"), ("web-2", "412.bbbb.js")):
        root = paths.releases / name
        (root / "css").mkdir(parents=True)
        (root / "index.html").write_text(f"<html>{name}</html>")
        (root / chunk).write_text(f"chunk of {name}")
        (root / "css/main.css").write_text(name)
        (root / "aipbx-release.toml").write_text("kind = 'frontend'")
        releases[name] = root
    for d in (
        paths.opt,
        paths.releases,
        *releases.values(),
        *(r / "css" for r in releases.values()),
    ):
        d.chmod(0o755)
    # what deploying web-2 does: earlier releases' links first, then the switch
    frontend_assets.rebuild(paths.frontend, [frontend_assets.Source("web-1", releases["web-1"])])
    paths.frontend.chmod(0o755)
    (paths.frontend / "current").symlink_to(releases["web-2"])
    proc, ports = _start(www_root, app)
    try:
        https = f"https://127.0.0.1:{ports['https']}"
        status, headers, body = _get(f"{https}/412.aaaa.js", www_root)
        assert (status, body) == (200, b"chunk of web-1")
        assert "public, immutable" in _values(headers, "cache-control")
        assert _values(headers, "x-content-type-options") == ["nosniff"]
        assert _get(f"{https}/412.bbbb.js", www_root)[2] == b"chunk of web-2"
        assert _get(f"{https}/css/main.css", www_root)[2] == b"web-2"  # the live one wins
        status, headers, body = _get(f"{https}/", www_root)
        assert (status, body) == (200, b"<html>web-2</html>")
        assert _values(headers, "cache-control") == ["no-cache"]
        assert _values(headers, "x-frame-options") == ["SAMEORIGIN"]
        assert _get(f"{https}/calls/42", www_root)[2] == b"<html>web-2</html>"
        assert _get(f"{https}/aipbx-release.toml", www_root)[0] == 404
        # web-1 collected: its chunk is gone, no reload needed
        frontend_assets.rebuild(paths.frontend, [])
        assert _get(f"{https}/412.aaaa.js", www_root)[0] == 404
        assert _get(f"{https}/412.bbbb.js", www_root)[0] == 200
    finally:
        stop(proc)
