"""The certificate nginx serves, loaded at every TLS handshake, so that a renewal needs no
reload (DESIGN decision 10; docs/DECISIONS.md).

nginx reads `ssl_certificate` once, at start and reload, unless its path has a variable;
then (nginx >= 1.15.9) the worker loads the files at each handshake. A graceful reload is
not free: the old workers close their idle HTTP/1.1 keep-alive connections, and a request
a client sends on one at that moment is reset (nginx fixed this only in 1.27.4, with
keepalive_min_timeout; Debian 12 has 1.22). So the site names
`$aipbx_tls_dir/fullchain.pem` and `$aipbx_tls_dir/privkey.pem`, and $aipbx_tls_dir is a
directory of this store named after the key's public key, `key-<sha256, 16 hex>`:

- a renewal that keeps the key (certbot's reuse_key, which `aipbxctl cert issue` sets)
  replaces fullchain.pem in the same directory by a rename: the next handshake serves it;
  no reload, no connection closed;
- a new key gets a new directory, then the site is rendered with it and nginx reloaded
  (after `nginx -t`): a certificate and its key must switch together, and two files cannot
  be renamed at once; the directory name switches both.

Nothing enters the store before `check_pair` has seen a certificate that matches its key
and has not expired (with a variable path, `nginx -t` no longer loads the files).
Modes: the store and its directories 0750 root:www-data; fullchain.pem 0644; privkey.pem
0640 root:www-data (the workers load it at every handshake; they hold it in memory anyway).
`current` points at the directory the rendered site names, for the tools that read it."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import AipbxError, CommandError
from appliance.fsutil import atomic_symlink, atomic_write, fsync_dir, locked
from appliance.paths import Paths
from appliance.run import run

NGINX_GROUP = "www-data"  # the `user` of Debian's nginx.conf
CHAIN = "fullchain.pem"
KEY = "privkey.pem"
ORIGIN = "origin.json"
CURRENT = "current"
_DIR = re.compile(r"^key-[0-9a-f]{16}$")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TlsError(AipbxError):
    """A certificate or key that must not be served."""


@dataclass(frozen=True)
class Placed:
    dir: Path
    created: bool  # a new key, a new directory: the site must name it (render + reload)
    chain_changed: bool  # fullchain.pem replaced: served from the next handshake on


def nginx_gid() -> int:
    try:
        return grp.getgrnam(NGINX_GROUP).gr_gid
    except KeyError:
        return -1  # no such group (a test tree): leave the group alone


def leaf_der(chain: bytes) -> bytes:
    """The DER of the first certificate of a PEM chain (the one a handshake presents)."""
    m = _PEM_CERT.search(chain)
    if not m:
        raise TlsError("no PEM certificate in the chain")
    return ssl.PEM_cert_to_DER_cert(m.group(0).decode())


def key_dir_name(public_key_pem: str) -> str:
    digest = hashlib.sha256("".join(public_key_pem.split()).encode()).hexdigest()
    return f"key-{digest[:16]}"


def _openssl(argv: list[str], what: str) -> str:
    try:
        return run(["openssl", *argv], timeout=30).stdout
    except CommandError as e:
        raise TlsError(f"{what}: {e.message}") from None


def check_pair(cert: Path, key: Path) -> str:
    """Refuse a chain and key nginx must not serve; return the key's public key (PEM)."""
    pub = _openssl(["pkey", "-in", str(key), "-pubout"], f"{key} is not a private key")
    leaf = _openssl(["x509", "-in", str(cert), "-noout", "-pubkey"], f"{cert} is not a certificate")
    if "".join(pub.split()) != "".join(leaf.split()):
        raise TlsError(f"{cert} and {key} do not match (the certificate is for another key)")
    expired = run(["openssl", "x509", "-in", str(cert), "-noout", "-checkend", "0"], check=False)
    if expired.returncode != 0:
        raise TlsError(f"{cert} has expired")
    return pub


def current(paths: Paths) -> Path | None:
    """The directory the rendered site names, or None before the first `place`."""
    try:
        target = os.readlink(paths.tls_served / CURRENT)
    except OSError:
        return None
    return paths.tls_served / target


def served_dir(paths: Paths) -> Path:
    """What the site should name now: the current directory (the link itself only before
    anything was placed, as in a test tree)."""
    return current(paths) or paths.tls_served / CURRENT


def served_chain(paths: Paths) -> Path:
    return served_dir(paths) / CHAIN


def origin(directory: Path) -> dict[str, str]:
    """Where a directory's files came from: {"kind", "cert", "key"} ({} if unknown)."""
    try:
        doc = json.loads((directory / ORIGIN).read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def _lock(paths: Paths) -> contextlib.AbstractContextManager[None]:
    return locked(paths.run / "tls-store.lock", "certificate switch", wait=60)


def place(paths: Paths, cert: Path, key: Path, *, kind: str) -> Placed:
    """Put a checked chain and key in the store: into the key's directory (replacing
    fullchain.pem by a rename when it changed) or into a new directory, made whole
    under a temporary name and renamed into place."""
    pub = check_pair(cert, key)
    chain, key_bytes = cert.read_bytes(), key.read_bytes()
    gid = nginx_gid()
    store = paths.tls_served
    target = store / key_dir_name(pub)
    about = json.dumps({"kind": kind, "cert": str(cert), "key": str(key)}, indent=2) + "\n"
    with _lock(paths):
        store.mkdir(parents=True, exist_ok=True)
        os.chmod(store, 0o750)
        if os.geteuid() == 0:
            os.chown(store, 0, gid)
        if target.is_dir():
            if (target / CHAIN).read_bytes() == chain:
                return Placed(target, created=False, chain_changed=False)
            atomic_write(target / CHAIN, chain, mode=0o644)
            atomic_write(target / ORIGIN, about, mode=0o644)
            return Placed(target, created=False, chain_changed=True)
        tmp = Path(tempfile.mkdtemp(dir=store, prefix=".new-"))
        try:
            os.chmod(tmp, 0o750)
            if os.geteuid() == 0:
                os.chown(tmp, 0, gid)
            atomic_write(tmp / KEY, key_bytes, mode=0o640, uid=0 if gid != -1 else -1, gid=gid)
            atomic_write(tmp / CHAIN, chain, mode=0o644)
            atomic_write(tmp / ORIGIN, about, mode=0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(store)
        return Placed(target, created=True, chain_changed=True)


def restore_chain(directory: Path, chain: bytes) -> None:
    """Put a previous fullchain.pem back (a renewal nginx did not serve)."""
    atomic_write(directory / CHAIN, chain, mode=0o644)


def commit(paths: Paths, directory: Path, keep: int = 2) -> list[Path]:
    """Record `directory` as what the site names, and remove key directories beyond the
    newest `keep` (the previous one stays for handshakes old workers are still doing).
    Returns what was removed."""
    with _lock(paths):
        atomic_symlink(directory.name, paths.tls_served / CURRENT)
        dirs = [d for d in paths.tls_served.iterdir() if d.is_dir() and _DIR.fullmatch(d.name)]
        dirs.sort(key=lambda d: (d == directory, d.stat().st_mtime), reverse=True)
        gone = [d for d in dirs[keep:] if d != directory]
        for d in gone:
            shutil.rmtree(d, ignore_errors=True)
        return gone


def served_leaf(port: int, server_name: str, timeout: float = 5) -> bytes:
    """The DER certificate nginx presents on loopback to a new connection for server_name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name or None) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise TlsError(f"nginx on port {port} presented no certificate")
    return der


def wait_served(port: int, server_name: str, chain: bytes, timeout: float = 10) -> bool:
    """True once a new handshake on loopback presents the chain's leaf."""
    want = leaf_der(chain)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ssl.SSLError, TlsError):
            if served_leaf(port, server_name) == want:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
