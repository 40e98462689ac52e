"""`make bench-tls`: what serving the TLS certificate through a variable path costs, and what
it saves at a renewal, measured on this host's nginx (/usr/sbin/nginx) over loopback. Writes
build/bench/tls.json.

The bench runs a private nginx of its own (prefix build/bench/tls-nginx/, its own pid file
and error log, `user www-data`, ports on 127.0.0.1 picked free below the ephemeral range) in
the foreground as its child, and stops it by that master PID; the host's nginx is not
touched. Certificates come from a CA made for the run (openssl), leaf certificates signed by
it with random serials.

- handshakes: full TLS handshakes per second (`openssl s_time -new`) against a server with a
  static `ssl_certificate` path and against the same files through a variable
  (`$aipbx_tls_dir/fullchain.pem` from a `map $ssl_server_name`), which nginx >= 1.15.9
  loads at every handshake in the worker; an EC P-256 key (certbot 2.x's default) and an
  RSA 2048 one; `worker_processes 1`, rounds alternating the two paths, medians. The same
  with `s_time -reuse -www /` (a GET per connection, so the client reads the TLS 1.3
  session ticket): resumed handshakes, where the certificate is not loaded; resumed_fraction
  says how many really resumed. Client and server share this host's CPUs.
- renewal: an HTTP/1.1 keep-alive HTTPS load, --connections persistent connections and
  --rate POSTs a second (open loop: a request is due at its time whatever the previous ones
  did; an idle connection takes it), a small JSON body each, nginx answering `return 200`.
  Without --rate, the rate is --share (0.5) of the sustainable rate, measured first with
  the same load and no renewal (bench/tls_rate.py: p99 <= 250 ms, nothing failed).
  The client is asyncio streams with a hand-written HTTP/1.1 exchange: it reuses a
  connection until the server closes it (a connection seen closed while idle is replaced
  before sending, as any client does), and never retries a failed request. During
  --duration seconds the certificate is renewed --renewals times, evenly spaced:
  - reload: a new key and certificate renamed over privkey.pem and fullchain.pem, then
    `nginx -s reload` (what a certbot deploy hook does) with static paths; the old workers
    close their idle keep-alive connections and a request racing that close is lost (nginx
    fixed it in 1.27.4 with keepalive_min_timeout).
  - swap: the variable path; a new certificate for the same key written beside
    fullchain.pem and renamed over it; no reload.
  After each renewal a fresh connection reads the served certificate until it is the new
  one (DER compared): serial_changed counts renewals served, first_try those served at the
  first fresh connection, delay_s how long it took.

Seen on this host (2 CPUs, nginx 1.22.1, OpenSSL 3.0): a full handshake cost the worker
~320 µs (EC) / ~530 µs (RSA) of CPU with a static path and ~980 / ~1360 µs through the
variable (loading and decoding the PEM files each time), so ~0.6x the full handshakes a
second; resumed handshakes do not load the certificate and cost the same (~270 µs). The
reload race is real but rare: five runs of the reload mode (5 reloads in 30 s, 500 req/s, 64
connections) lost 3, 1, 3, 2 and 3 of 15,000 requests ("closed before the response"), each
~0.12 s after a reload (nginx starts the new workers, waits 100 ms, then tells the old ones
to shut down); the swap mode lost none and served every new serial at the first fresh
connection. --renewals 10-20 makes a failure more certain. A benchmark reports and does not
gate: it exits 0 unless the variable path did not serve every renewed certificate or lost
requests (2)."""

from __future__ import annotations

import argparse
import asyncio
import grp
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parents[1]
NGINX = "/usr/sbin/nginx"
OPENSSL = "/usr/bin/openssl"
SCHEMA = "aipbx-bench-tls/1"
WORKER_USER = "www-data"
HOST = "127.0.0.1"
SNI = "localhost"
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
)
KEYGEN = {
    "ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
}
BODY = b'{"event":"call.started","call_id":"bench-0001","from":"+15550100","to":"+15550199"}'
REQUEST = (
    b"POST /api/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)
REQUEST_TIMEOUT_S = 10.0


def log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


def run(argv: list[str], timeout: float = 60) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1]} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1, below the ephemeral range (client sockets never get them)."""
    low = 20000
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 1
    except (OSError, ValueError, IndexError):
        high = 32767
    ports: list[int] = []
    for port in random.sample(range(low, high), min(2000, high - low)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports in {low}-{high}")


def write_atomic(path: Path, data: bytes, mode: int, gid: int) -> None:
    """data into a temporary file in path's directory, then renamed over path."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# ----------------------------------------------------------------------------- certificates


@dataclass
class Leaf:
    key: Path
    cert: Path  # the leaf alone
    fullchain: bytes  # leaf + CA, what fullchain.pem holds
    der: bytes
    serial: str


class Pki:
    """A CA for the run and leaf certificates (CN/SAN localhost, 127.0.0.1) it signs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca = root / "ca.key", root / "ca.pem"
        self.ext = root / "leaf.ext"
        self.ext.write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,"
            "keyEncipherment\nextendedKeyUsage=serverAuth\n"
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        )
        run([OPENSSL, "genpkey", *KEYGEN["ec"], "-out", str(self.ca_key)])
        run(
            [
                *(OPENSSL, "req", "-x509", "-new", "-key", str(self.ca_key), "-out", str(self.ca)),
                *("-days", "7", "-subj", "/CN=aipbx bench-tls CA", "-sha256"),
            ]
        )
        self.count = 0

    def key(self, kind: str) -> Path:
        self.count += 1
        path = self.root / f"{kind}-{self.count}.key"
        run([OPENSSL, "genpkey", *KEYGEN[kind], "-out", str(path)])
        return path

    def leaf(self, key: Path) -> Leaf:
        self.count += 1
        csr, cert = self.root / f"leaf-{self.count}.csr", self.root / f"leaf-{self.count}.pem"
        serial = secrets.randbits(63) | (1 << 62)
        run([OPENSSL, "req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr)])
        run(
            [
                *(OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey"),
                *(str(self.ca_key), "-set_serial", str(serial), "-days", "7", "-sha256"),
                *("-extfile", str(self.ext), "-out", str(cert)),
            ]
        )
        pem = cert.read_text()
        return Leaf(
            key=key,
            cert=cert,
            fullchain=(pem + self.ca.read_text()).encode(),
            der=ssl.PEM_cert_to_DER_cert(pem),
            serial=f"{serial:x}",
        )


# ----------------------------------------------------------------------------- private nginx


class Nginx:
    """A private nginx: its own prefix, config, pid file and error log, in the foreground
    (`daemon off`) as this process's child; stopped by that master PID."""

    def __init__(self, prefix: Path, http: str, workers: str) -> None:
        self.prefix = prefix
        self.conf = prefix / "conf" / "nginx.conf"
        self.error_log = prefix / "logs" / "error.log"
        self.pid_file = prefix / "logs" / "nginx.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        for d in ("conf", "logs", "tmp"):
            (prefix / d).mkdir(parents=True, exist_ok=True)
        temp = "\n".join(
            f"    {name}_temp_path {prefix}/tmp/{name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf.write_text(
            f"# written by bench/tls.py\nuser {WORKER_USER};\nworker_processes {workers};\n"
            f"daemon off;\npid {self.pid_file};\nerror_log {self.error_log} notice;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n    access_log off;\n{temp}\n    default_type application/json;\n"
            f"{http}}}\n"
        )

    def argv(self, *extra: str) -> list[str]:
        return [
            *(NGINX, "-p", f"{self.prefix}/", "-c", str(self.conf), "-e", str(self.error_log)),
            *extra,
        ]

    def start(self, ports: list[int]) -> None:
        self._stop_leftover()
        self.error_log.write_text("")
        run([*self.argv(), "-t"])
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not all(self._listening(p) for p in ports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {self.error_log.read_text()[-2000:]}")
            time.sleep(0.05)

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            return s.connect_ex((HOST, port)) == 0

    def _stop_leftover(self) -> None:
        """A master an interrupted run left: only if its command line names this prefix."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if f"{self.prefix}/".encode() in cmdline and cmdline[0].endswith(b"nginx"):
            log(f"stopping the nginx master {pid} an earlier run left")
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)

    async def reload(self) -> None:
        """`nginx -s reload`: the pid file names this instance's master."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv("-s", "reload"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"nginx -s reload exited {proc.returncode}: {err.decode()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def workers(self) -> list[int]:
        """The master's children."""
        assert self.proc is not None
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def log_levels(self) -> dict[str, int]:
        levels = Counter(re.findall(r"^\S+ \S+ \[(\w+)\]", self.error_log.read_text(), re.M))
        return dict(sorted(levels.items()))


def ssl_server(port: int, cert: str, key: str, extra: str = "") -> str:
    return (
        f"    server {{\n        listen {HOST}:{port} ssl{extra};\n"
        f"        server_name {SNI};\n        ssl_certificate {cert};\n"
        f"        ssl_certificate_key {key};\n        ssl_protocols TLSv1.2 TLSv1.3;\n"
        f"        ssl_ciphers {CIPHERS};\n        ssl_prefer_server_ciphers off;\n"
        "        ssl_session_cache shared:BENCH_SSL:10m;\n        ssl_session_timeout 10m;\n"
        "        location / {\n            return 200 '{\"ok\":true}\\n';\n        }\n    }\n"
    )


def tls_map(var: str, directory: Path) -> str:
    return f"    map $ssl_server_name ${var} {{\n        default {directory};\n    }}\n"


def install_pair(directory: Path, leaf: Leaf, gid: int) -> None:
    """fullchain.pem and privkey.pem as certbot's live/ dir has them, the key readable by
    the worker's group (with a variable path the worker opens it)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    write_atomic(directory / "privkey.pem", leaf.key.read_bytes(), 0o640, gid)
    write_atomic(directory / "fullchain.pem", leaf.fullchain, 0o644, gid)


# ----------------------------------------------------------------------------- handshakes


def s_time(port: int, mode: str, seconds: int, workers: list[int]) -> dict[str, Any]:
    """One `openssl s_time` run: connections per wall second, how many resumed, and the CPU
    the nginx workers spent per connection."""
    argv = [OPENSSL, "s_time", "-connect", f"{HOST}:{port}", f"-{mode}", "-time", str(seconds)]
    if mode == "reuse":
        argv += ["-www", "/"]  # reads the response, and with it the TLS 1.3 ticket
    cpu0, t0 = cpu_ticks(workers), time.monotonic()
    out = run(argv, timeout=seconds + 30)
    wall, cpu = time.monotonic() - t0, cpu_ticks(workers) - cpu0
    m = re.search(r"^(\d+) connections in [\d.]+s;", out, re.M)
    if not m:
        raise RuntimeError(f"s_time: no count in {out[-500:]!r}")
    marks = "".join(line for line in out.splitlines() if re.fullmatch(r"[*rt3]+", line))
    return {
        "connections": int(m.group(1)),
        "wall_s": round(wall, 3),
        "per_s": round(int(m.group(1)) / wall, 1),
        "resumed": marks.count("r"),
        "server_cpu_us": round(1e6 * cpu / os.sysconf("SC_CLK_TCK") / max(1, int(m.group(1)))),
    }


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of the processes, in clock ticks."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def handshakes(root: Path, pki: Pki, gid: int, rounds: int, seconds: int) -> dict[str, Any]:
    kinds = ("ec", "rsa")
    ports = dict(
        zip([(k, p) for k in kinds for p in ("static", "variable")], free_ports(4), strict=True)
    )
    http = ""
    for kind in kinds:
        leaf = pki.leaf(pki.key(kind))
        d = root / "hs" / kind
        install_pair(d, leaf, gid)
        http += tls_map(f"aipbx_tls_dir_{kind}", d)
        http += ssl_server(ports[kind, "static"], f"{d}/fullchain.pem", f"{d}/privkey.pem")
        http += ssl_server(
            ports[kind, "variable"],
            f"$aipbx_tls_dir_{kind}/fullchain.pem",
            f"$aipbx_tls_dir_{kind}/privkey.pem",
        )
    nginx = Nginx(root / "hs", http, "1")
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    try:
        nginx.start(list(ports.values()))
        workers = nginx.workers()
        for kind in kinds:  # warm-up: the worker's first handshakes, the page cache
            for path in ("static", "variable"):
                s_time(ports[kind, path], "new", 1, workers)
        for mode in ("new", "reuse"):
            for r in range(rounds):
                order = ("static", "variable") if r % 2 == 0 else ("variable", "static")
                for kind in kinds:
                    for path in order:
                        res = s_time(ports[kind, path], mode, seconds, workers)
                        runs.setdefault((kind, path, mode), []).append(res)
                        log(
                            f"handshakes {kind} {path} -{mode} round {r + 1}: "
                            f"{res['per_s']}/s, worker CPU {res['server_cpu_us']} µs each"
                        )
    finally:
        nginx.stop()
    out: dict[str, Any] = {"error_log": nginx.log_levels()}
    for kind in kinds:
        k: dict[str, Any] = {}
        for path in ("static", "variable"):
            new, reuse = runs[kind, path, "new"], runs[kind, path, "reuse"]
            k[path] = {
                "new_per_s": round(statistics.median(x["per_s"] for x in new), 1),
                "reuse_per_s": round(statistics.median(x["per_s"] for x in reuse), 1),
                "new_server_cpu_us": statistics.median(x["server_cpu_us"] for x in new),
                "reuse_server_cpu_us": statistics.median(x["server_cpu_us"] for x in reuse),
                "resumed_fraction": round(
                    sum(x["resumed"] for x in reuse) / max(1, sum(x["connections"] for x in reuse)),
                    3,
                ),
                "rounds": {"new": new, "reuse": reuse},
            }
        for mode in ("new", "reuse"):
            k[f"variable_vs_static_{mode}"] = round(
                k["variable"][f"{mode}_per_s"] / k["static"][f"{mode}_per_s"], 3
            )
        out[kind] = k
    return out


# ----------------------------------------------------------------------------- renewal


@dataclass
class Load:
    """What the keep-alive client saw."""

    sent: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    failed_at: list[float] = field(default_factory=list)  # seconds into the load
    latencies: list[float] = field(default_factory=list)  # from the request's due time
    connects: int = 0
    connect_failed: Counter[str] = field(default_factory=Counter)
    closed_idle: int = 0  # closed by the server while idle: replaced before sending
    closed_by_header: int = 0
    t0: float = 0.0  # when the load started (monotonic)


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, ctx: ssl.SSLContext) -> Stream:
    return await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=SNI), REQUEST_TIMEOUT_S
    )


async def exchange(stream: Stream) -> tuple[int, bool]:
    """One POST on the connection: the status, and whether the server keeps it open."""
    reader, writer = stream
    writer.write(REQUEST)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() != "close"


def reason(e: BaseException) -> str:
    if isinstance(e, asyncio.IncompleteReadError):
        return "closed before the response (EOF)" if not e.partial else "closed mid-response"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, BrokenPipeError):
        return "broken pipe on write"
    if isinstance(e, ssl.SSLError):
        return f"ssl: {e.reason or e}"
    return type(e).__name__


def close(stream: Stream | None) -> None:
    if stream is not None:
        stream[1].close()


async def worker(
    port: int, ctx: ssl.SSLContext, queue: asyncio.Queue[float | None], load: Load
) -> None:
    stream: Stream | None = None
    try:
        stream = await connect(port, ctx)
        load.connects += 1
    except (OSError, TimeoutError, ssl.SSLError) as e:
        load.connect_failed[reason(e)] += 1
    while (due := await queue.get()) is not None:
        if stream is not None and (stream[0].at_eof() or stream[1].is_closing()):
            load.closed_idle += 1
            close(stream)
            stream = None
        load.sent += 1
        if stream is None:
            try:
                stream = await connect(port, ctx)
                load.connects += 1
            except (OSError, TimeoutError, ssl.SSLError) as e:
                load.failed[f"connect: {reason(e)}"] += 1
                load.failed_at.append(round(time.monotonic() - load.t0, 3))
                continue
        try:
            status, keep = await asyncio.wait_for(exchange(stream), REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            load.failed[reason(e)] += 1
            load.failed_at.append(round(time.monotonic() - load.t0, 3))
            close(stream)
            stream = None
            continue
        load.latencies.append(time.monotonic() - due)
        if status == 200:
            load.ok += 1
        else:
            load.failed[f"HTTP {status}"] += 1
            load.failed_at.append(round(time.monotonic() - load.t0, 3))
        if not keep:
            load.closed_by_header += 1
            close(stream)
            stream = None
    close(stream)


async def served_der(port: int, ctx: ssl.SSLContext) -> bytes | None:
    """The certificate a fresh connection is served (DER)."""
    try:
        reader, writer = await connect(port, ctx)
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    obj = writer.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True) if isinstance(obj, ssl.SSLObject) else None
    writer.close()
    return der


async def await_serial(port: int, ctx: ssl.SSLContext, leaf: Leaf) -> dict[str, Any]:
    t0 = time.monotonic()
    tries = 0
    while True:
        tries += 1
        if await served_der(port, ctx) == leaf.der:
            return {
                "serial": leaf.serial,
                "served": True,
                "tries": tries,
                "delay_s": round(time.monotonic() - t0, 3),
            }
        if time.monotonic() - t0 > 5:
            return {"serial": leaf.serial, "served": False, "tries": tries, "delay_s": None}
        await asyncio.sleep(0.01)


async def drive(
    mode: str,
    nginx: Nginx,
    port: int,
    ctx: ssl.SSLContext,
    live: Path,
    leaves: list[Leaf],
    gid: int,
    args: argparse.Namespace,
) -> tuple[Load, list[dict[str, Any]]]:
    load = Load()
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    workers = [asyncio.create_task(worker(port, ctx, queue, load)) for _ in range(args.connections)]
    while load.connects + sum(load.connect_failed.values()) < args.connections:
        await asyncio.sleep(0.01)
    total = int(args.rate * args.duration)
    at = [args.duration * (i + 1) / (len(leaves) + 1) for i in range(len(leaves))]
    renewals: list[dict[str, Any]] = []

    async def renew() -> None:
        for leaf, when in zip(leaves, at, strict=True):
            await asyncio.sleep(max(0.0, load.t0 + when - time.monotonic()))
            started = time.monotonic()
            if mode == "reload":  # certbot without --reuse-key: a new key too
                write_atomic(live / "privkey.pem", leaf.key.read_bytes(), 0o640, gid)
                write_atomic(live / "fullchain.pem", leaf.fullchain, 0o644, gid)
                await nginx.reload()
            else:
                write_atomic(live / "fullchain.pem", leaf.fullchain, 0o644, gid)
            r = await await_serial(port, ctx, leaf)
            r["at_s"] = round(started - load.t0, 3)
            renewals.append(r)
            log(
                f"  {mode} at {r['at_s']:.1f} s: serial {leaf.serial} served={r['served']} "
                f"after {r['delay_s']} s ({r['tries']} tries)"
            )

    load.t0 = time.monotonic()
    renewer = asyncio.create_task(renew())
    for i in range(total):
        due = load.t0 + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(due)
    await renewer
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    load.latencies.sort()
    return load, renewals


def renewal(
    mode: str, root: Path, pki: Pki, key: Path, gid: int, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_ports(1)[0]
    live = root / mode / "live"
    install_pair(live, pki.leaf(key), gid)
    if mode == "reload":
        http = ssl_server(port, f"{live}/fullchain.pem", f"{live}/privkey.pem", " http2")
        leaves = [pki.leaf(pki.key("ec")) for _ in range(args.renewals)]
    else:
        http = tls_map("aipbx_tls_dir", live) + ssl_server(
            port, "$aipbx_tls_dir/fullchain.pem", "$aipbx_tls_dir/privkey.pem", " http2"
        )
        leaves = [pki.leaf(key) for _ in range(args.renewals)]
    nginx = Nginx(root / mode, http, args.workers)
    try:
        nginx.start([port])
        log(
            f"renewal {mode}: {args.connections} connections, {args.rate:g} req/s for "
            f"{args.duration:g} s, {args.renewals} renewals"
        )
        t0 = time.monotonic()
        load, renewals = asyncio.run(
            drive(mode, nginx, port, client_context(pki.ca), live, leaves, gid, args)
        )
        wall = time.monotonic() - t0
    finally:
        nginx.stop()
    lat = load.latencies
    failed = sum(load.failed.values())
    return {
        "sent": load.sent,
        "ok": load.ok,
        "failed": failed,
        "failed_reasons": dict(load.failed.most_common()),
        "failed_at_s": load.failed_at,
        "failed_per_renewal": round(failed / max(1, len(renewals)), 3),
        "rate_per_s": round(load.sent / wall, 1),
        "latency_ms": {
            "p50": round(1000 * lat[len(lat) // 2], 2) if lat else None,
            "p99": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None,
            "max": round(1000 * lat[-1], 2) if lat else None,
        },
        "connects": load.connects,
        "connect_failed_at_start": dict(load.connect_failed),
        "closed_idle_replaced": load.closed_idle,
        "closed_by_header": load.closed_by_header,
        "renewals": len(renewals),
        "serial_changed": sum(r["served"] for r in renewals),
        "serial_first_try": sum(r["served"] and r["tries"] == 1 for r in renewals),
        "serial_delay_s_max": max((r["delay_s"] or 0 for r in renewals), default=None),
        "renewal_log": renewals,
        "error_log": nginx.log_levels(),
    }


# ----------------------------------------------------------------------------- report


def table(doc: dict[str, Any]) -> str:
    hs: dict[str, Any] = doc.get("handshakes") or {}
    rows = [("handshakes/s (median)", "static", "variable", "var/static")] if hs else []
    for kind, name in (("ec", "EC P-256"), ("rsa", "RSA 2048")) if hs else ():
        for mode, label in (("new", "full"), ("reuse", "resumed")):
            s, v = hs[kind]["static"], hs[kind]["variable"]
            extra = ""
            if mode == "reuse":
                extra = f" ({s['resumed_fraction']:.0%}/{v['resumed_fraction']:.0%} resumed)"
            rows.append(
                (
                    f"  {name} {label}",
                    f"{s[f'{mode}_per_s']:g}",
                    f"{v[f'{mode}_per_s']:g}",
                    f"{hs[kind][f'variable_vs_static_{mode}']:.2f}{extra}",
                )
            )
            rows.append(
                (
                    "    nginx worker CPU µs each",
                    f"{s[f'{mode}_server_cpu_us']:g}",
                    f"{v[f'{mode}_server_cpu_us']:g}",
                    "",
                )
            )
    rows.append(("renewal under keep-alive load", "reload", "swap", ""))
    rn = doc["renewal"]
    r, w = rn["reload"], rn["swap"]

    def reasons(x: dict[str, Any]) -> str:
        return ", ".join(f"{n} {k}" for k, n in x["failed_reasons"].items()) or "—"

    for label, key in (
        ("  requests sent", "sent"),
        ("  ok", "ok"),
        ("  failed", "failed"),
        ("  renewals", "renewals"),
        ("  new serial served", "serial_changed"),
        ("  ... at the first fresh connection", "serial_first_try"),
        ("  connections opened", "connects"),
        ("  closed while idle, replaced", "closed_idle_replaced"),
        ("  achieved req/s", "rate_per_s"),
    ):
        rows.append((label, str(r[key]), str(w[key]), ""))
    for q in ("p50", "p99", "max"):
        rows.append((f"  latency {q} (ms)", str(r["latency_ms"][q]), str(w["latency_ms"][q]), ""))
    rows.append(("  failure reasons (reload)", reasons(r), "", ""))
    rows.append(("  failure reasons (swap)", reasons(w), "", ""))
    widths = [max(len(x[i]) for x in rows if not x[0].startswith("  failure")) for i in range(3)]
    return "\n".join(
        f"{x[0]:<{widths[0]}}  {x[1]:>{widths[1]}}  {x[2]:>{widths[2]}}  {x[3]}".rstrip()
        if not x[0].startswith("  failure")
        else f"{x[0]:<{widths[0]}}  {x[1]}"
        for x in rows
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="s_time rounds of each path")
    p.add_argument("--seconds", type=int, default=2, help="seconds of each s_time run")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="requests a second, open loop (default: --share of the sustainable rate)",
    )
    p.add_argument(
        "--share", type=float, default=0.5, help="of the sustainable rate, measured first"
    )
    p.add_argument("--duration", type=float, default=30, help="seconds of load in each mode")
    p.add_argument("--renewals", type=int, default=5, help="renewals during the load")
    p.add_argument("--workers", default="auto", help="worker_processes in the renewal runs")
    p.add_argument("--skip-handshakes", action="store_true")
    p.add_argument("--out", type=Path, default=TOP / "build" / "bench")
    args = p.parse_args(argv)
    if not 0 < args.share <= 1:
        p.error("--share: a fraction in (0, 1]")
    if os.geteuid() != 0:
        print(
            "bench: run as root (the private nginx runs its workers as www-data)", file=sys.stderr
        )
        return 1
    root = args.out / "tls-nginx"
    shutil.rmtree(root / "pki", ignore_errors=True)
    gid = grp.getgrnam(WORKER_USER).gr_gid
    version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    nginx_version = re.sub(r".*nginx/", "", version).strip()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    pki = Pki(root / "pki")
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "nginx": nginx_version,
        "openssl": run([OPENSSL, "version"]).strip(),
        "cpus": os.cpu_count(),
        "started": started,
        "params": vars(args) | {"out": str(args.out)},
    }
    if not args.skip_handshakes:
        log(f"handshakes: {args.rounds} rounds of {args.seconds} s, worker_processes 1")
        doc["handshakes"] = handshakes(root, pki, gid, args.rounds, args.seconds)
    key = pki.key("ec")  # certbot 2.x's default key, kept across renewals in swap mode
    if args.rate is None:
        from bench import sizing, tls_rate

        found = tls_rate.size(root, pki, key, gid, args)
        doc["sizing"] = found.as_dict()
        log(found.describe("req/s"))
        if found.sustainable <= 0:
            print("OVERLOADED: no rate held the bound; nothing measured", file=sys.stderr)
            return 3
        args.rate = sizing.rate_for(found.sustainable, args.share)
        doc["params"].update(rate=args.rate, share=args.share)
        log(f"renewal runs at {args.rate:g} req/s, {sizing.pct(args.share)} of that")
    doc["renewal"] = {mode: renewal(mode, root, pki, key, gid, args) for mode in ("reload", "swap")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tls.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(table(doc))
    print(f"bench: wrote {args.out / 'tls.json'}")
    swap = doc["renewal"]["swap"]
    return 0 if swap["failed"] == 0 and swap["serial_changed"] == swap["renewals"] else 2


if __name__ == "__main__":
    sys.exit(main())
