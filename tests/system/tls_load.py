"""HTTPS load for the certificate tests, copied into the booted machine and run there with
/usr/bin/python3 (stdlib only): python3 tls_load.py HOST PATH RATE SECONDS MODE

MODE "fresh": a new TLS connection for every request (as browsers open them while a
certificate changes); each request reports the serial of the certificate that connection
was served, so the switch from the old serial to the new one is seen.

MODE "keepalive": 16 HTTP/1.1 connections, each opened once and reused for every request
(as API clients and SDKs hold them). A request that fails is counted and its connection
opened again, never retried; `connections_opened` above 16 means the server closed a
connection under the client (what a graceful nginx reload does to idle keep-alive
connections: the request racing the close is reset).

Requests are paced at RATE a second, whatever the server does. Prints one JSON summary."""

from __future__ import annotations

import collections
import http.client
import json
import ssl
import sys
import threading
import time

THREADS = 16

host, path, rate, seconds, mode = (
    sys.argv[1],
    sys.argv[2],
    float(sys.argv[3]),
    float(sys.argv[4]),
    sys.argv[5],
)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE


def der_serial(der: bytes) -> str:
    """serialNumber of a DER X.509 certificate (the one field needed, no parser)."""

    def header(i: int) -> tuple[int, int]:
        n = der[i + 1]
        if n < 0x80:
            return i + 2, n
        k = n & 0x7F
        return i + 2 + k, int.from_bytes(der[i + 2 : i + 2 + k], "big")

    i, _ = header(header(0)[0])
    if der[i] == 0xA0:  # [0] version
        start, length = header(i)
        i = start + length
    start, length = header(i)
    value = der[start : start + length]
    if len(value) > 1 and value[0] == 0:  # the sign byte: openssl does not print it
        value = value[1:]
    return value.hex().upper()


lock = threading.Lock()
Result = tuple[float, "int | None", "str | None", "str | None"]
results: list[Result] = []
nxt, opened = [0], [0]
total, t0 = int(rate * seconds), time.monotonic()


def due() -> int | None:
    """The next request's index and wait until it is due; None when all were sent."""
    with lock:
        i = nxt[0]
        nxt[0] += 1
    if i >= total:
        return None
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return i


def connect() -> tuple[http.client.HTTPSConnection, str]:
    conn = http.client.HTTPSConnection(host, 443, timeout=5, context=ctx)
    conn.connect()
    with lock:
        opened[0] += 1
    assert isinstance(conn.sock, ssl.SSLSocket)
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return conn, der_serial(der)


def request(conn: http.client.HTTPSConnection) -> int:
    conn.request("POST", path, body=b'{"probe":1}', headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def fresh() -> None:
    while due() is not None:
        at = time.monotonic() - t0
        serial: str | None = None
        status: int | None = None
        error: str | None = None
        conn: http.client.HTTPSConnection | None = None
        try:
            conn, serial = connect()
            status = request(conn)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            if conn is not None:
                conn.close()
        with lock:
            results.append((at, status, error, serial))


def keepalive() -> None:
    conn: http.client.HTTPSConnection | None = None
    serial: str | None = None
    while due() is not None:
        at = time.monotonic() - t0
        status: int | None = None
        error: str | None = None
        try:
            if conn is None:
                conn, serial = connect()
            status = request(conn)
            if conn.sock is None:  # the server said Connection: close
                conn = None
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
            conn = None
        with lock:
            results.append((at, status, error, serial))
    if conn is not None:
        conn.close()


threads = [threading.Thread(target=fresh if mode == "fresh" else keepalive) for _ in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - t0
results.sort(key=lambda r: r[0])
serials: list[list[object]] = []
for at, _status, _error, serial in results:
    if serial and (not serials or serials[-1][0] != serial):
        serials.append([serial, round(at, 3)])
print(
    json.dumps(
        {
            "mode": mode,
            "requests": len(results),
            "seconds": round(elapsed, 2),
            "rate": round(len(results) / elapsed, 1),
            "connections_opened": opened[0],
            "statuses": dict(collections.Counter(str(s) for _, s, _, _ in results if s)),
            # no backend is deployed in these tests: nginx's 503 page is the answer
            "failures": [f"{at:.3f} s: {e or s}" for at, s, e, _ in results if e or s != 503],
            "serials": serials,
        }
    )
)
