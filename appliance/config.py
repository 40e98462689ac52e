"""aipbx.toml, parsed and validated once into frozen dataclasses.

Every section is a dataclass; a field's metadata may name a validator from
appliance.validate, and every integer has a range (validate.int_range). Unknown keys, wrong
types and bad values are reported as `file:line: what is wrong`, all at once, and nothing
is applied. No string may hold a control character (a trailing newline included). The file
is read as a regular file of at most MAX_BYTES, UTF-8 (a fifo, a device, a directory or
another user's link is refused, never waited on)."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import safefs
from appliance import validate as v
from appliance.acme import acme_url
from appliance.errors import ConfigError
from appliance.tomlpos import key_lines, line_of

MAX_BYTES = 1 << 20  # the shipped file is 6 KiB


def _check(fn: Callable[[Any], Any]) -> dict[str, Any]:
    return {"check": fn}


def _in(lo: int, hi: int, what: str = "") -> dict[str, Any]:
    return _check(v.int_range(lo, hi, what))


@dataclass(frozen=True)
class Site:
    domain: str = field(default="", metadata=_check(v.domain))
    email: str = field(default="", metadata=_check(v.email))
    public_ip: str = field(default="", metadata=_check(v.ip_address))
    # The ACME directory `aipbxctl cert issue` asks (Let's Encrypt's production one).
    acme_server: str = field(
        default="https://acme-v02.api.letsencrypt.org/directory", metadata=_check(acme_url)
    )


@dataclass(frozen=True)
class Nginx:
    http_port: int = field(default=80, metadata=_check(v.port))
    https_port: int = field(default=443, metadata=_check(v.port))
    # Address where the host's service ports (backend http/ws) are served for local
    # clients that used to speak to `backend:5005` directly.
    service_bind: str = field(default="127.0.0.1", metadata=_check(v.ip_address))
    client_max_body_size: str = field(default="50m", metadata=_check(v.size))
    api_rate: str = field(default="10r/s", metadata=_check(v.rate))
    api_burst: int = field(default=20, metadata=_in(1, 100_000))
    login_rate: str = field(default="3r/m", metadata=_check(v.rate))
    login_burst: int = field(default=5, metadata=_in(1, 100_000))
    # Clients never rate-limited (monitoring, local tools, load tests on loopback).
    rate_limit_exempt: tuple[str, ...] = ("127.0.0.1", "::1")
    # How long old workers may keep WebSocket connections after a reload (the drain).
    worker_shutdown_timeout: str = field(default="30m", metadata=_check(v.duration_seconds))
    # Add `preload` to HSTS (sent only with a CA-issued certificate): a request to be on
    # browsers' preload lists, for the whole registrable domain; off unless its owner says.
    hsts_preload: bool = False


@dataclass(frozen=True)
class Backend:
    http_port: int = field(default=5005, metadata=_check(v.port))
    ws_port: int = field(default=3033, metadata=_check(v.port))
    udp_port: int = field(default=3032, metadata=_check(v.port))
    # docker-compose.production.yml limits of seed 003: backend 2G, 2 CPUs
    memory_max: str = field(default="2g", metadata=_check(v.memory_limit))
    cpu_quota: str = field(default="200%", metadata=_check(v.cpu_quota))


@dataclass(frozen=True)
class Network:
    # Small subnet split into one /30 per color (host side .1, namespace side .2).
    subnet: str = field(default="10.203.0.0/24", metadata=_check(v.ipv4_network))
    # Ports of this host a color may connect to besides PgBouncer (its own veth address),
    # DNS and nginx's ports, e.g. ["tcp/5038"] for Asterisk's AMI here (appliance.nft).
    host_ports: tuple[str, ...] = field(default=(), metadata=_check(v.host_ports))


@dataclass(frozen=True)
class Database:
    name: str = field(default="aipbx_production", metadata=_check(v.identifier))
    user: str = field(default="aipbx_user", metadata=_check(v.identifier))
    pool_size: int = field(default=20, metadata=_in(1, 1000))
    # aipbx-pgbouncer.service has LimitNOFILE=8192: a client and a server fd each
    max_client_conn: int = field(default=500, metadata=_in(1, 8000, "PgBouncer's file limit"))
    pgbouncer_port: int = field(default=6432, metadata=_check(v.port))
    # Debian's PostgreSQL cluster, reached by PgBouncer on loopback
    postgres_port: int = field(default=5432, metadata=_check(v.port))
    # transaction pooling lets many clients share pool_size server connections
    pool_mode: str = field(default="transaction", metadata=_check(v.pool_mode))


@dataclass(frozen=True)
class Releases:
    keep: int = field(default=5, metadata=_in(1, 100))
    max_unpacked_size: str = field(default="4g", metadata=_check(v.size))


@dataclass(frozen=True)
class Upgrade:
    health_timeout: str = field(default="120s", metadata=_check(v.duration_seconds))
    probation: str = field(default="60s", metadata=_check(v.duration_seconds))
    drain: str = field(default="30m", metadata=_check(v.duration_seconds))


def _hh_mm(t: str) -> str:
    """A time of day, HH:MM (24 h, UTC)."""
    parts = t.split(":")
    ok = len(parts) == 2 and all(len(p) == 2 and p.isdigit() for p in parts)
    if not ok or int(parts[0]) > 23 or int(parts[1]) > 59:
        raise ValueError(f"{t!r} is not a time of day like 03:00 (HH:MM, UTC)")
    return t


@dataclass(frozen=True)
class Backups:
    # pg_dump -Fc files (0600 postgres), each verified before it gets its final name.
    dir: str = field(default="/var/backups/aipbx", metadata=_check(v.backup_dir))
    # Backups older than this are deleted after a good backup; the newest good one never.
    retention_days: int = field(default=30, metadata=_in(1, 3650))
    # When aipbx-backup.timer runs every day, in UTC.
    time: str = field(default="03:00", metadata=_check(_hh_mm))


def _bind_address(a: str) -> str:
    if not a:
        raise ValueError("an address is required (127.0.0.1 keeps it on this host)")
    return v.ip_address(a)


def _url(u: str) -> str:
    if u and (not u.startswith(("http://", "https://")) or any(c.isspace() for c in u)):
        raise ValueError(f"{u!r} is not an http:// or https:// URL")
    return u


def _emails(addrs: tuple[str, ...]) -> tuple[str, ...]:
    for a in addrs:
        if not a:
            raise ValueError("an empty address")
        v.email(a)
    return addrs


@dataclass(frozen=True)
class Watchdog:
    # Durations also take milliseconds ("200ms"); the watchdog keeps their precision.
    interval: str = field(default="2s", metadata=_check(v.duration_seconds))
    timeout: str = field(default="2s", metadata=_check(v.duration_seconds))
    slow_threshold: str = field(default="1s", metadata=_check(v.duration_seconds))
    failures_to_open: int = field(default=3, metadata=_in(1, 100))
    # Time an opened breaker waits (the unit is restarting) before one probe decides.
    cooldown: str = field(default="15s", metadata=_check(v.duration_seconds))
    backoff_initial: str = field(default="1s", metadata=_check(v.duration_seconds))
    backoff_max: str = field(default="5m", metadata=_check(v.duration_seconds))
    restart_budget: int = field(default=5, metadata=_in(1, 1000))
    restart_window: str = field(default="10m", metadata=_check(v.duration_seconds))
    critical_after: str = field(default="60s", metadata=_check(v.duration_seconds))
    api_port: int = field(default=6030, metadata=_check(v.port))
    api_bind: str = field(default="127.0.0.1", metadata=_check(_bind_address))
    disk_warn_pct: int = field(default=10, metadata=_in(1, 99, "a percentage"))
    disk_crit_pct: int = field(default=5, metadata=_in(1, 99, "a percentage"))
    memory_warn_pct: int = field(default=90, metadata=_in(1, 99, "a percentage"))
    cert_warn_days: int = field(default=14, metadata=_in(1, 365))
    cert_crit_days: int = field(default=3, metadata=_in(1, 365))


@dataclass(frozen=True)
class Alerts:
    # Credentials are not here: TELEGRAM_BOT_TOKEN, TELEGRAM_ADMIN_CHATID and
    # ALERT_SMTP_PASSWORD come from /etc/aipbx/alerts.env (0600 root; never the backend's).
    telegram_base_url: str = field(default="https://api.telegram.org", metadata=_check(_url))
    telegram_chat_id: str = ""
    webhook_url: str = field(default="", metadata=_check(_url))
    smtp_host: str = ""
    smtp_port: int = field(default=587, metadata=_check(v.port))
    smtp_starttls: bool = True
    smtp_user: str = ""
    smtp_from: str = field(default="", metadata=_check(v.email))
    smtp_to: tuple[str, ...] = field(default=(), metadata=_check(_emails))
    rate_limit_per_min: int = field(default=20, metadata=_in(1, 10_000))
    queue_size: int = field(default=100, metadata=_in(1, 100_000))
    send_timeout: str = field(default="10s", metadata=_check(v.duration_seconds))


@dataclass(frozen=True)
class Config:
    site: Site = field(default_factory=Site)
    nginx: Nginx = field(default_factory=Nginx)
    backend: Backend = field(default_factory=Backend)
    network: Network = field(default_factory=Network)
    database: Database = field(default_factory=Database)
    releases: Releases = field(default_factory=Releases)
    upgrade: Upgrade = field(default_factory=Upgrade)
    watchdog: Watchdog = field(default_factory=Watchdog)
    alerts: Alerts = field(default_factory=Alerts)
    backups: Backups = field(default_factory=Backups)


def _watchdog_cross_checks(cfg: Config, where: Callable[[tuple[str, ...]], str]) -> list[str]:
    w = cfg.watchdog
    errors: list[str] = []
    for key in ("interval", "timeout", "cooldown", "backoff_initial", "restart_window"):
        if duration_ms(getattr(w, key)) == 0:
            errors.append(f"{where(('watchdog', key))}: watchdog.{key} must be longer than 0")
        elif key in ("interval", "timeout") and duration_ms(getattr(w, key)) < 100:
            # every check of every service, ten times a second or more: the watchdog
            # would take a core of the PBX it guards
            errors.append(f"{where(('watchdog', key))}: watchdog.{key} must be at least 100ms")
    if duration_ms(w.slow_threshold) >= duration_ms(w.timeout):
        errors.append(
            f"{where(('watchdog', 'slow_threshold'))}: watchdog.slow_threshold must be "
            "shorter than watchdog.timeout"
        )
    if w.disk_crit_pct >= w.disk_warn_pct:
        errors.append(
            f"{where(('watchdog', 'disk_crit_pct'))}: watchdog.disk_crit_pct must be below "
            "disk_warn_pct"
        )
    if w.cert_crit_days >= w.cert_warn_days:
        errors.append(
            f"{where(('watchdog', 'cert_crit_days'))}: watchdog.cert_crit_days must be below "
            "cert_warn_days"
        )
    return errors


def duration_ms(duration: str) -> int:
    """A validated duration in milliseconds (validate.duration_seconds rounds "200ms" up)."""
    if duration.endswith("ms"):
        return int(duration[:-2])
    return v.duration_seconds(duration) * 1000


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return False


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", str: "a string"}.get(hint, str(hint))


def _build_section(
    cls: type[Any], data: dict[str, Any], where: Callable[[tuple[str, ...]], str], name: str
) -> tuple[Any, list[str]]:
    errors: list[str] = []
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = (name, key)
        if key not in known:
            errors.append(f"{where(path)}: unknown key {name}.{key}")
            continue
        f = known[key]
        if not _type_ok(value, hints[key]):
            errors.append(
                f"{where(path)}: {name}.{key} must be {_type_name(hints[key])}, "
                f"not {type(value).__name__}"
            )
            continue
        if isinstance(value, list):
            value = tuple(value)
        try:
            for s in value if isinstance(value, tuple) else (value,):
                if isinstance(s, str):
                    v.no_control(s)
        except ValueError as e:
            errors.append(f"{where(path)}: {name}.{key}: {e}")
            continue
        if "check" in f.metadata:
            try:
                f.metadata["check"](value)
            except ValueError as e:
                errors.append(f"{where(path)}: {name}.{key}: {e}")
                continue
        values[key] = value
    return cls(**values), errors


# The TCP ports the appliance listens on (nginx serves the backend's two on service_bind),
# in the order a clash is reported: the later key of two equal ones is named.
_TCP_PORTS = (
    ("backend", "http_port"),
    ("backend", "ws_port"),
    ("nginx", "http_port"),
    ("nginx", "https_port"),
    ("database", "postgres_port"),
    ("database", "pgbouncer_port"),
    ("watchdog", "api_port"),
)
# Durations that break the appliance when shorter: 0 s keeps nginx's old workers forever
# (no shutdown timer) or fails every upgrade's health gate.
_MIN_SECONDS = {
    ("nginx", "worker_shutdown_timeout"): 1,
    ("upgrade", "health_timeout"): 1,
}
# Names PostgreSQL or PgBouncer already use: the backend would own (or be) them.
_RESERVED_DATABASES = {"postgres", "template0", "template1", "pgbouncer"}
_RESERVED_ROLES = {"postgres", "pgbouncer", "public", "none"}


def _port_clashes(cfg: Config, where: Callable[[tuple[str, ...]], str]) -> list[str]:
    """Each port two keys share, reported at the key written lowest in the file (the one
    the operator set, when the other is a default)."""
    by_port: dict[int, list[tuple[str, str]]] = {}
    for section, key in _TCP_PORTS:
        by_port.setdefault(getattr(getattr(cfg, section), key), []).append((section, key))
    errors: list[str] = []
    for port, keys in by_port.items():
        if len(keys) < 2:
            continue
        at = max(keys, key=lambda k: int(where(k).rsplit(":", 1)[1]))
        others = " and ".join(f"{s}.{k}" for s, k in keys if (s, k) != at)
        errors.append(
            f"{where(at)}: {at[0]}.{at[1]} {port} is also {others}: each TCP port the "
            "appliance listens on must be its own"
        )
    return errors


def _host_cross_checks(cfg: Config, where: Callable[[tuple[str, ...]], str]) -> list[str]:
    errors = _port_clashes(cfg, where)
    for (section, key), least in _MIN_SECONDS.items():
        if v.duration_seconds(getattr(getattr(cfg, section), key)) < least:
            errors.append(f"{where((section, key))}: {section}.{key} must be at least {least}s")
    if v.size_bytes(cfg.nginx.client_max_body_size) == 0:
        errors.append(
            f"{where(('nginx', 'client_max_body_size'))}: nginx.client_max_body_size 0 "
            "lifts nginx's limit; give a size like 50m"
        )
    if v.size_bytes(cfg.releases.max_unpacked_size) < 1 << 20:
        errors.append(
            f"{where(('releases', 'max_unpacked_size'))}: releases.max_unpacked_size must be "
            "at least 1m"
        )
    db = cfg.database
    if db.name in _RESERVED_DATABASES:
        errors.append(
            f"{where(('database', 'name'))}: database.name {db.name!r} is PostgreSQL's or "
            "PgBouncer's own database"
        )
    if db.user in _RESERVED_ROLES or db.user.startswith("pg_"):
        errors.append(
            f"{where(('database', 'user'))}: database.user {db.user!r} is a role PostgreSQL "
            "reserves or a superuser: the backend needs a role of its own"
        )
    return errors


def _cross_checks(cfg: Config, where: Callable[[tuple[str, ...]], str]) -> list[str]:
    errors = _host_cross_checks(cfg, where)
    n = cfg.nginx
    for addr in n.rate_limit_exempt:
        try:
            ipaddress.ip_network(addr, strict=False)
        except ValueError:
            errors.append(
                f"{where(('nginx', 'rate_limit_exempt'))}: {addr!r} is not an address or subnet"
            )
    errors.extend(_watchdog_cross_checks(cfg, where))
    return errors


def parse(text: str, filename: str = "aipbx.toml") -> Config:
    """Parse and validate aipbx.toml text; raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        line = 1
        if "(at line " in msg:
            line = int(msg.split("(at line ")[1].split(",")[0])
            msg = msg.split(" (at line ")[0]
        raise ConfigError(f"{filename}:{line}: {msg}", hint="fix the TOML syntax") from None
    except RecursionError:  # arrays or inline tables nested thousands deep
        raise ConfigError(f"{filename}:1: nested too deeply", hint="fix the TOML") from None
    lines = key_lines(text)

    def where(path: tuple[str, ...]) -> str:
        return f"{filename}:{line_of(lines, path)}"

    errors: list[str] = []
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for name, value in data.items():
        if name not in hints:
            errors.append(f"{where((name,))}: unknown section [{name}]")
            continue
        if not isinstance(value, dict):
            errors.append(f"{where((name,))}: {name} must be a table [{name}]")
            continue
        sections[name], errs = _build_section(hints[name], value, where, name)
        errors.extend(errs)
    cfg = Config(**sections)
    if not errors:
        errors.extend(_cross_checks(cfg, where))
    if errors:
        raise ConfigError(
            "\n".join(errors), hint=f"fix {filename} and run `aipbxctl config check` again"
        )
    return cfg


def read_text(path: Path) -> str:
    """aipbx.toml's text: a regular UTF-8 file of at most MAX_BYTES (ConfigError, exit 2,
    as `file:line: what is wrong`, otherwise)."""
    try:
        raw = safefs.read_input(path, MAX_BYTES)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found", hint="reinstall aipbx-appliance to restore the default file"
        ) from None
    except safefs.BadInput as e:
        raise ConfigError(f"{path}:1: {e.message.removeprefix(f'{path}: ')}") from None
    except OSError as e:
        raise ConfigError(f"{path}:1: {e.strerror}") from None
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {e.start})", hint=f"fix {path}"
        ) from None


def load(path: Path) -> Config:
    return parse(read_text(path), str(path))


def check_host(cfg: Config, path: Path, routes: list[dict[str, Any]]) -> None:
    """The checks that need the host: the colors' subnet must not overlap a host route."""
    from appliance.netcheck import clashes

    found = clashes(cfg.network.subnet, routes)
    if found:
        try:
            line = line_of(key_lines(read_text(path)), ("network", "subnet"))
        except ConfigError:
            line = 1
        raise ConfigError(
            f"{path}:{line}: network.subnet {cfg.network.subnet} overlaps the host's route "
            f"{', '.join(found)}",
            hint="choose another private subnet in [network] subnet",
        )
