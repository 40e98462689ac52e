"""Pure validators for configuration values. Each returns the normalised value or raises
ValueError with a short reason (the caller adds file:line)."""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SIZE = re.compile(r"^([0-9]+)([kKmMgG]?)$")
_DURATION = re.compile(r"^([0-9]+)(ms|s|m|h|d)?$")
_RATE = re.compile(r"^[0-9]+r/[sm]$")


def port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise ValueError(f"port {v} is out of range 1-65535")
    return v


def domain(v: str) -> str:
    """A DNS name for a certificate: at least two labels, LDH only, no wildcard."""
    if v == "":
        return v
    name = v.lower().rstrip(".")
    if len(name) > 253 or "." not in name or not all(_LABEL.match(p) for p in name.split(".")):
        raise ValueError(f"{v!r} is not a valid domain name")
    if name.split(".")[-1].isdigit():
        raise ValueError(f"{v!r} is an address, not a domain name")
    return name


def email(v: str) -> str:
    if v and not _EMAIL.match(v):
        raise ValueError(f"{v!r} is not a valid email address")
    return v


def ip_address(v: str) -> str:
    if v == "":
        return v
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


def ipv4_network(v: str) -> str:
    try:
        net = ipaddress.IPv4Network(v, strict=True)
    except ValueError as e:
        raise ValueError(f"{v!r} is not an IPv4 subnet ({e})") from None
    if net.prefixlen > 29:
        raise ValueError(f"subnet {v} is too small: it needs room for two /30 color links")
    return str(net)


def size(v: str) -> str:
    """nginx/systemd style size: 512k, 50m, 2g (or a bare number of bytes)."""
    if not _SIZE.match(v):
        raise ValueError(f"{v!r} is not a size like 50m or 2g")
    return v.lower()


def size_bytes(v: str) -> int:
    m = _SIZE.match(v)
    if not m:
        raise ValueError(f"{v!r} is not a size like 50m or 2g")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(m.group(1)) * mult


def duration_seconds(v: str | int) -> int:
    """30, '30s', '5m', '2h', '1d' -> seconds."""
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"duration {v} is negative")
        return v
    m = _DURATION.match(v)
    if not m:
        raise ValueError(f"{v!r} is not a duration like 30s, 5m or 2h")
    n = int(m.group(1))
    unit = m.group(2) or "s"
    if unit == "ms":
        return max(1, n // 1000) if n else 0
    return n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def rate(v: str) -> str:
    if not _RATE.match(v):
        raise ValueError(f"{v!r} is not a rate like 10r/s or 3r/m")
    return v


def cpu_quota(v: str) -> str:
    if not re.match(r"^[0-9]+%$", v) or int(v[:-1]) == 0:
        raise ValueError(f"{v!r} is not a CPU quota like 200% (100% = one core)")
    return v


def identifier(v: str) -> str:
    """A PostgreSQL role or database name we create: lower-case, safe unquoted."""
    if not re.match(r"^[a-z_][a-z0-9_]{0,62}$", v):
        raise ValueError(f"{v!r} must be lower-case letters, digits and _ (max 63)")
    return v


def pool_mode(v: str) -> str:
    if v not in ("session", "transaction", "statement"):
        raise ValueError(f"{v!r} is not a PgBouncer pool mode (session, transaction, statement)")
    return v
