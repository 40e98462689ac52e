"""Pure validators for configuration values. Each returns the normalised value or raises
ValueError with a short reason (the caller adds file:line).

Patterns are matched whole (re.fullmatch): `^…$` with re.match accepts a trailing newline,
and "aipbx_production\n" is not a database name."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)")
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d)?")
_RATE = re.compile(r"[0-9]+r/[sm]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_DURATION_S = 366 * 86400  # a year: longer is a typo (and overflows nginx's timers)


def no_control(v: str) -> str:
    """Any string value: no control character (a newline, a tab, NUL...)."""
    if m := _CONTROL.search(v):
        raise ValueError(f"{v!r} contains a control character ({m.group()!r})")
    return v


def int_range(lo: int, hi: int, what: str = "") -> Callable[[int], int]:
    """A check that an integer is within lo..hi (both included)."""

    def check(n: int) -> int:
        if not lo <= n <= hi:
            raise ValueError(f"{n} is out of range {lo}-{hi}" + (f" ({what})" if what else ""))
        return n

    return check


def port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise ValueError(f"port {v} is out of range 1-65535")
    return v


def domain(v: str) -> str:
    """A DNS name for a certificate: at least two labels, LDH only, no wildcard."""
    if v == "":
        return v
    name = v.lower().rstrip(".")
    if len(name) > 253 or "." not in name or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError(f"{v!r} is not a valid domain name")
    if name.split(".")[-1].isdigit():
        raise ValueError(f"{v!r} is an address, not a domain name")
    return name


def email(v: str) -> str:
    if v and not _EMAIL.fullmatch(v):
        raise ValueError(f"{v!r} is not a valid email address")
    return v


def ip_address(v: str) -> str:
    if v == "":
        return v
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


# Ranges a colors' subnet must not touch: the host would route them to the veths.
_SPECIAL = tuple(
    (ipaddress.IPv4Network(n), what)
    for n, what in (
        ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
        ("127.0.0.0/8", "loopback (127.0.0.0/8, where nginx reaches the live color)"),
        ("169.254.0.0/16", "link-local (169.254.0.0/16)"),
        ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4, broadcast included)"),
    )
)
PRIVATE_NETS = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)


def ipv4_network(v: str) -> str:
    """The colors' subnet: an IPv4 network, room for two /30s, inside a private range (RFC
    1918, or the shared 100.64.0.0/10) and so in no special one: addresses the host routes
    to the veths are taken from whatever else used them (PgBouncer took 127.0.0.1 over)."""
    try:
        net = ipaddress.IPv4Network(v, strict=True)
    except ValueError as e:
        raise ValueError(f"{v!r} is not an IPv4 subnet ({e})") from None
    if net.prefixlen > 29:
        raise ValueError(f"subnet {v} is too small: it needs room for two /30 color links")
    for special, what in _SPECIAL:
        if net.overlaps(special):
            raise ValueError(f"subnet {v} overlaps {what}; choose a private subnet")
    if not any(net.subnet_of(p) for p in PRIVATE_NETS):
        ranges = ", ".join(str(p) for p in PRIVATE_NETS)
        raise ValueError(
            f"subnet {v} is not inside a private range ({ranges}): the host would stop "
            "reaching those addresses elsewhere"
        )
    return str(net)


def size(v: str) -> str:
    """nginx/systemd style size: 512k, 50m, 2g (or a bare number of bytes)."""
    if not _SIZE.fullmatch(v):
        raise ValueError(f"{v!r} is not a size like 50m or 2g")
    return v.lower()


_MEMORY = re.compile(r"([0-9]{1,20})([kKmMgGtT]?)")
_PERCENT = re.compile(r"([0-9]{1,3})%")
MIN_MEMORY = 64 << 20
_IEC = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def memory_limit(v: str) -> str:
    """[backend] memory_max, for systemd's MemoryMax=, refusing what systemd would ignore
    (it logs "ignoring" and runs the unit without a limit): bytes with an optional K, M, G
    or T suffix (1024-based; any case here, upper-cased for systemd, which reads only upper
    case), a percentage of the host's memory from 1% to 100%, or infinity. Zero, a value
    that overflows 64 bits, or less than 64M (the backend could not start) is refused."""
    if v == "infinity":
        return v
    if m := _PERCENT.fullmatch(v):
        if not 1 <= int(m.group(1)) <= 100:
            raise ValueError(f"{v!r}: a percentage of the host's memory is 1% to 100%")
        return v
    m = _MEMORY.fullmatch(v)
    if not m:
        raise ValueError(f"{v!r} is not a memory limit like 2g, 512m, 50% or infinity")
    n = int(m.group(1)) * _IEC[m.group(2).lower()]
    if n >= 2**64 - 1:
        raise ValueError(f"{v!r} is too large for systemd (64 bits)")
    if n < MIN_MEMORY:
        raise ValueError(f"{v!r} is less than 64m: the backend could not start")
    return v.lower()


def systemd_memory(v: str) -> str:
    """A validated memory_limit as MemoryMax= reads it."""
    return v if v == "infinity" or v.endswith("%") else v.upper()


# Where backups must not go: the system's own trees (anything inside them), and the
# directories that hold others' (the directory itself: it is made postgres's, 0700).
SYSTEM_TREES = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found",
    "/opt/aipbx", "/proc", "/root", "/run", "/sbin", "/snap", "/sys", "/tmp", "/usr",
    "/var/cache", "/var/lib", "/var/lock", "/var/log", "/var/mail", "/var/run",
    "/var/spool", "/var/tmp", "/var/www",
)  # fmt: skip
SYSTEM_DIRS = (
    "/", "/home", "/media", "/mnt", "/opt", "/srv", "/var", "/var/backups", "/var/local",
    "/var/opt",
)  # fmt: skip


def backup_dir(d: str) -> str:
    """[backups] dir: an absolute path of a directory of their own (it is made 0700
    postgres's and a sandboxed unit gets write access to it), not a system directory nor
    inside one (docs/DECISIONS.md §9)."""
    parts = d.split("/")
    if not d.startswith("/") or any(c.isspace() for c in d) or {".", ".."} & set(parts):
        raise ValueError(f"{d!r} is not an absolute directory path (no spaces, no . or ..)")
    no_control(d)
    norm = "/" + "/".join(p for p in parts if p)
    inside = [t for t in SYSTEM_TREES if norm == t or norm.startswith(f"{t}/")]
    if norm in SYSTEM_DIRS or inside:
        where = f"inside {inside[0]}" if inside and inside[0] != norm else "a system directory"
        raise ValueError(
            f"{d!r} is {where}: backups need a directory of their own, e.g. "
            "/var/backups/aipbx or /srv/aipbx-backups"
        )
    return norm


def size_bytes(v: str) -> int:
    m = _SIZE.fullmatch(v)
    if not m:
        raise ValueError(f"{v!r} is not a size like 50m or 2g")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(m.group(1)) * mult


def duration_seconds(v: str | int) -> int:
    """30, '30s', '5m', '2h', '1d' -> seconds."""
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"duration {v} is negative")
        if v > MAX_DURATION_S:
            raise ValueError(f"duration {v} is longer than a year")
        return v
    m = _DURATION.fullmatch(v)
    if not m:
        raise ValueError(f"{v!r} is not a duration like 30s, 5m or 2h")
    n = int(m.group(1))
    unit = m.group(2) or "s"
    if unit == "ms":
        seconds = max(1, n // 1000) if n else 0
    else:
        seconds = n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {v!r} is longer than a year")
    return seconds


def rate(v: str) -> str:
    if not _RATE.fullmatch(v):
        raise ValueError(f"{v!r} is not a rate like 10r/s or 3r/m")
    if int(v.split("r/")[0]) == 0:
        raise ValueError(f"{v!r}: a rate of 0 refuses every request (nginx refuses it too)")
    return v


def cpu_quota(v: str) -> str:
    if not re.fullmatch(r"[0-9]{1,6}%", v) or int(v[:-1]) == 0:
        raise ValueError(f"{v!r} is not a CPU quota like 200% (100% = one core)")
    return v


def identifier(v: str) -> str:
    """A PostgreSQL role or database name we create: lower-case, safe unquoted."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", v):
        raise ValueError(f"{v!r} must be lower-case letters, digits and _ (max 63)")
    return v


def pool_mode(v: str) -> str:
    if v not in ("session", "transaction", "statement"):
        raise ValueError(f"{v!r} is not a PgBouncer pool mode (session, transaction, statement)")
    return v


_HOST_PORT = re.compile(r"(tcp|udp)/([0-9]{1,5})(?:-([0-9]{1,5}))?")


def host_port(v: str) -> tuple[str, int, int]:
    """A port of this host the backend colors may connect to: "tcp/5038", "udp/5060" or a
    range "udp/10000-10100". Returns (protocol, first, last)."""
    m = _HOST_PORT.fullmatch(v)
    if not m:
        raise ValueError(f"{v!r} is not tcp/PORT, udp/PORT or tcp/FIRST-LAST")
    first = int(m.group(2))
    last = int(m.group(3) or first)
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{v!r}: ports are 1-65535, the first not above the last")
    return m.group(1), first, last


def host_ports(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        host_port(value)
    return values
