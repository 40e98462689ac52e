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

from appliance import cert, config, nginx, tls_store
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


def _start(tmp: Path, backend_port: int | None) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {k: free_port() for k in ("http", "https", "svc_http", "svc_ws")}
    base = config.parse("")
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
    # What setup does: a checked copy in the store, which the workers read at each handshake.
    placed = tls_store.place(paths, paths.selfsigned_cert, paths.selfsigned_key, kind="x")
    tls_store.commit(paths, placed.dir)
    site = nginx.render_site(cfg, paths, ipv6=False, tls_dir=placed.dir)
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
        assert redirect.stdout == f"301 https://127.0.0.1:{ports['https']}/x"
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
