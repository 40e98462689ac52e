"""TLS certificates: the self-signed one made at install so nginx serves TLS from the first
minute, and reading what a certificate file says."""

from __future__ import annotations

import ipaddress
import socket
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.fsutil import atomic_write
from appliance.run import run


@dataclass(frozen=True)
class CertInfo:
    subject: str
    issuer: str
    serial: str
    not_after: str  # as openssl prints it: "Feb 28 12:00:00 2027 GMT"

    def expires(self) -> datetime:
        return datetime.strptime(self.not_after, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)

    def days_left(self, now: datetime | None = None) -> int:
        return (self.expires() - (now or datetime.now(UTC))).days


def selfsigned_names(domain: str) -> list[str]:
    names = [domain] if domain else []
    names += [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(n for n in names if n))


def _san(names: list[str]) -> str:
    parts = []
    for n in names:
        try:
            ipaddress.ip_address(n)
            parts.append(f"IP:{n}")
        except ValueError:
            parts.append(f"DNS:{n}")
    return ",".join(parts)


def make_selfsigned(cert: Path, key: Path, names: list[str], days: int = 825) -> None:
    """Generate a key and certificate in a temp dir, then move both into place."""
    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    with tempfile.TemporaryDirectory(dir=cert.parent) as tmp:
        k, c = Path(tmp) / "key", Path(tmp) / "crt"
        run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                str(days),
                "-keyout",
                str(k),
                "-out",
                str(c),
                "-subj",
                f"/CN={names[0]}/O=aipbx-appliance self-signed",
                "-addext",
                f"subjectAltName={_san(names)}",
            ]
        )
        atomic_write(key, k.read_bytes(), mode=0o600, uid=0, gid=0)
        atomic_write(cert, c.read_bytes(), mode=0o644)


def info(cert: Path) -> CertInfo:
    out = run(
        [
            "openssl",
            "x509",
            "-in",
            str(cert),
            "-noout",
            "-subject",
            "-issuer",
            "-serial",
            "-enddate",
            "-nameopt",
            "RFC2253",
        ]
    ).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return CertInfo(
        subject=fields.get("subject", ""),
        issuer=fields.get("issuer", ""),
        serial=fields.get("serial", ""),
        not_after=fields.get("notAfter", ""),
    )
