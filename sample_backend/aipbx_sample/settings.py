"""The sample backend's settings, read once from the environment into frozen dataclasses.

The contract's variables: PORT (gunicorn binds it), UDP_SERVER_PORT, DB_HOST, DB_PORT,
DB_USER, DB_PASS, DB_NAME, AIPBX_COLOR. Knobs for tests:
- SAMPLE_FAIL: `start` (exit 1 at start), `health` (GET /api answers 500), `after:N`
  (GET /api answers 500 from N seconds after start), `hang-after:N` (GET /api stops
  answering after N seconds: alive but hung).
- SAMPLE_WS_PORT: the WebSocket port. The real backend hard-codes 3033 and so does this one;
  the override exists ONLY so integration tests can run next to each other on one host.
- SAMPLE_WRITE_DELAY_S: seconds a write holds its transaction open before COMMIT (in-flight
  requests for drain and shutdown tests).
- SAMPLE_DB_WAIT_S: how long start waits for the database (default 30) before giving up.
- SAMPLE_VERSION: the version, when not run from a release directory with a manifest."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

WS_PORT = 3033  # hard-coded in the real backend's source
UDP_PORT = 3032
MANIFEST = Path(__file__).resolve().parent.parent / "aipbx-release.toml"


@dataclass(frozen=True)
class Fail:
    start: bool = False
    health_after_s: float | None = None  # GET /api answers 500 from then on
    hang_after_s: float | None = None  # GET /api never answers from then on


@dataclass(frozen=True)
class Db:
    host: str
    port: int
    user: str
    password: str
    name: str


@dataclass(frozen=True)
class Settings:
    version: str
    color: str | None
    ws_port: int = WS_PORT
    udp_port: int = UDP_PORT
    db: Db | None = None  # None: no DB_HOST, writes answer 503
    fail: Fail = field(default_factory=Fail)
    write_delay_s: float = 0.0
    db_wait_s: float = 30.0


def parse_fail(value: str) -> Fail:
    """SAMPLE_FAIL's value; ValueError for one it does not know."""
    kind, _, arg = value.strip().partition(":")
    if kind == "" and not arg:
        return Fail()
    if kind == "start" and not arg:
        return Fail(start=True)
    if kind == "health" and not arg:
        return Fail(health_after_s=0.0)
    if kind in ("after", "hang-after") and arg:
        seconds = float(arg)
        if seconds < 0:
            raise ValueError(f"SAMPLE_FAIL={value}: seconds must be >= 0")
        return Fail(health_after_s=seconds) if kind == "after" else Fail(hang_after_s=seconds)
    raise ValueError(f"SAMPLE_FAIL={value}: use start, health, after:N or hang-after:N")


def _port(env: Mapping[str, str], key: str, default: int) -> int:
    port = int(env.get(key, default))
    if not 0 < port < 65536:
        raise ValueError(f"{key}={port}: not a port")
    return port


def release_version(env: Mapping[str, str], manifest: Path = MANIFEST) -> str:
    if env.get("SAMPLE_VERSION"):
        return env["SAMPLE_VERSION"]
    try:
        version = tomllib.loads(manifest.read_text())["version"]
    except (FileNotFoundError, KeyError, tomllib.TOMLDecodeError):
        return "0+dev"
    return str(version)


def settings_from_env(env: Mapping[str, str], manifest: Path = MANIFEST) -> Settings:
    db = None
    if env.get("DB_HOST"):
        db = Db(
            host=env["DB_HOST"],
            port=_port(env, "DB_PORT", 5432),
            user=env.get("DB_USER", "postgres"),
            password=env.get("DB_PASS", ""),
            name=env.get("DB_NAME", "postgres"),
        )
    return Settings(
        version=release_version(env, manifest),
        color=env.get("AIPBX_COLOR") or None,
        ws_port=_port(env, "SAMPLE_WS_PORT", WS_PORT),
        udp_port=_port(env, "UDP_SERVER_PORT", UDP_PORT),
        db=db,
        fail=parse_fail(env.get("SAMPLE_FAIL", "")),
        write_delay_s=float(env.get("SAMPLE_WRITE_DELAY_S", "0")),
        db_wait_s=float(env.get("SAMPLE_DB_WAIT_S", "30")),
    )
