"""aipbx.toml, parsed and validated once into frozen dataclasses.

Every section is a dataclass; a field's metadata may name a validator from
appliance.validate. Unknown keys, wrong types and bad values are reported as
`file:line: what is wrong`, all at once, and nothing is applied."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import validate as v
from appliance.errors import ConfigError
from appliance.tomlpos import key_lines, line_of


def _check(fn: Callable[[Any], Any]) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class Site:
    domain: str = field(default="", metadata=_check(v.domain))
    email: str = field(default="", metadata=_check(v.email))
    public_ip: str = field(default="", metadata=_check(v.ip_address))


@dataclass(frozen=True)
class Nginx:
    http_port: int = field(default=80, metadata=_check(v.port))
    https_port: int = field(default=443, metadata=_check(v.port))
    # Address where the host's service ports (backend http/ws) are served for local
    # clients that used to speak to `backend:5005` directly.
    service_bind: str = field(default="127.0.0.1", metadata=_check(v.ip_address))
    client_max_body_size: str = field(default="50m", metadata=_check(v.size))
    api_rate: str = field(default="10r/s", metadata=_check(v.rate))
    api_burst: int = 20
    login_rate: str = field(default="3r/m", metadata=_check(v.rate))
    login_burst: int = 5
    # Clients never rate-limited (monitoring, local tools, load tests on loopback).
    rate_limit_exempt: tuple[str, ...] = ("127.0.0.1", "::1")
    # How long old workers may keep WebSocket connections after a reload (the drain).
    worker_shutdown_timeout: str = field(default="30m", metadata=_check(v.duration_seconds))


@dataclass(frozen=True)
class Backend:
    http_port: int = field(default=5005, metadata=_check(v.port))
    ws_port: int = field(default=3033, metadata=_check(v.port))
    udp_port: int = field(default=3032, metadata=_check(v.port))
    # docker-compose.production.yml limits of seed 003: backend 2G, 2 CPUs
    memory_max: str = field(default="2g", metadata=_check(v.size))
    cpu_quota: str = field(default="200%", metadata=_check(v.cpu_quota))


@dataclass(frozen=True)
class Network:
    # Small subnet split into one /30 per color (host side .1, namespace side .2).
    subnet: str = field(default="10.203.0.0/24", metadata=_check(v.ipv4_network))


@dataclass(frozen=True)
class Database:
    name: str = field(default="aipbx_production", metadata=_check(v.identifier))
    user: str = field(default="aipbx_user", metadata=_check(v.identifier))
    pool_size: int = 20
    max_client_conn: int = 500
    pgbouncer_port: int = field(default=6432, metadata=_check(v.port))
    # Debian's PostgreSQL cluster, reached by PgBouncer on loopback
    postgres_port: int = field(default=5432, metadata=_check(v.port))
    # transaction pooling lets many clients share pool_size server connections
    pool_mode: str = field(default="transaction", metadata=_check(v.pool_mode))


@dataclass(frozen=True)
class Releases:
    keep: int = 5
    max_unpacked_size: str = field(default="4g", metadata=_check(v.size))


@dataclass(frozen=True)
class Upgrade:
    health_timeout: str = field(default="120s", metadata=_check(v.duration_seconds))
    probation: str = field(default="60s", metadata=_check(v.duration_seconds))
    drain: str = field(default="30m", metadata=_check(v.duration_seconds))


@dataclass(frozen=True)
class Config:
    site: Site = field(default_factory=Site)
    nginx: Nginx = field(default_factory=Nginx)
    backend: Backend = field(default_factory=Backend)
    network: Network = field(default_factory=Network)
    database: Database = field(default_factory=Database)
    releases: Releases = field(default_factory=Releases)
    upgrade: Upgrade = field(default_factory=Upgrade)


_POSITIVE = {("database", "pool_size"), ("database", "max_client_conn"), ("releases", "keep")}


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
        if "check" in f.metadata:
            try:
                f.metadata["check"](value)
            except ValueError as e:
                errors.append(f"{where(path)}: {name}.{key}: {e}")
                continue
        if path in _POSITIVE and value < 1:
            errors.append(f"{where(path)}: {name}.{key} must be at least 1")
            continue
        values[key] = value
    return cls(**values), errors


def _cross_checks(cfg: Config, where: Callable[[tuple[str, ...]], str]) -> list[str]:
    errors: list[str] = []
    b = cfg.backend
    ports = {"backend.http_port": b.http_port, "backend.ws_port": b.ws_port}
    if b.http_port == b.ws_port:
        errors.append(f"{where(('backend', 'ws_port'))}: backend.ws_port equals backend.http_port")
    n = cfg.nginx
    for key, p in (("http_port", n.http_port), ("https_port", n.https_port)):
        if p in ports.values():
            errors.append(f"{where(('nginx', key))}: nginx.{key} {p} clashes with a backend port")
    if n.http_port == n.https_port:
        errors.append(f"{where(('nginx', 'https_port'))}: nginx.https_port equals http_port")
    for addr in n.rate_limit_exempt:
        try:
            ipaddress.ip_network(addr, strict=False)
        except ValueError:
            errors.append(
                f"{where(('nginx', 'rate_limit_exempt'))}: {addr!r} is not an address or subnet"
            )
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


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found", hint="reinstall aipbx-appliance to restore the default file"
        ) from None
    return parse(text, str(path))
