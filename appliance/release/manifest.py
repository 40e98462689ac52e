"""`aipbx-release.toml`, the manifest at the top of every release artifact, parsed and
validated once into a frozen Manifest. Every problem is a UsageError naming the key."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w

from appliance import appenv
from appliance.errors import UsageError

MANIFEST_NAME = "aipbx-release.toml"
# A manifest is a few hundred bytes; anything near this is not one.
MAX_MANIFEST_BYTES = 64 * 1024

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
VERSION_RE = re.compile(r"[0-9][0-9A-Za-z.+~-]{0,63}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Kind(StrEnum):
    BACKEND = "backend"
    FRONTEND = "frontend"


@dataclass(frozen=True)
class Health:
    http_path: str = "/api"
    ws_path: str = "/socket.io/?EIO=4&transport=websocket"
    timeout_s: int = 120


# [migrations] baseline: when the database has no tables yet (a first deploy, the app
# creates its schema itself), "empty-database" records every file without running it;
# "never" runs them (an app whose SQL files are its schema).
SQL_BASELINES = ("empty-database", "never")
MIGRATIONS_KEYS = ("sql_dir", "baseline")


@dataclass(frozen=True)
class SqlMigrations:
    """[migrations]: the release's SQL files (appliance.sqlmigrations runs them)."""

    sql_dir: str  # relative to the release top; its *.sql files, in name order
    baseline: str = SQL_BASELINES[0]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    kind: Kind
    # argv started from the release dir; empty for a frontend (nginx serves it)
    command: tuple[str, ...] = ()
    health: Health = field(default_factory=Health)
    # argv run from the release dir before the new color starts; empty: no migration
    migrate: tuple[str, ...] = ()
    # dirs the app writes, under /var/lib/aipbx/shared/<name>/ and linked into each release
    # (appliance.shared); this default is for manifests that predate `--shared-dir`
    shared_dirs: tuple[str, ...] = ("static", "public")
    # dir inside the release put first on PATH (a release may carry its own `node`)
    runtime: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    # [migrations] sql_dir: SQL files run before the migrate command; None: none
    migrations: SqlMigrations | None = None
    # variables the release needs in /etc/aipbx/backend.env (the upgrade refuses it while
    # one is missing or empty), and those the appliance generates once as secrets
    required_env: tuple[str, ...] = ()
    generated_env: tuple[str, ...] = ()

    @property
    def release_dirname(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def artifact_name(self) -> str:
        return f"{self.release_dirname}.tar.gz"


TOP_KEYS = (
    "name",
    "version",
    "kind",
    "command",
    "health",
    "migrate",
    "migrations",
    "shared_dirs",
    "runtime",
    "required_env",
    "generated_env",
)
HEALTH_KEYS = ("http_path", "ws_path", "timeout_s")


def _fail(source: str, key: str, what: str, hint: str | None = None) -> UsageError:
    return UsageError(f"{source}: {key}: {what}", hint=hint)


def _string(data: Mapping[str, Any], key: str, source: str, hint: str) -> str:
    if key not in data:
        raise _fail(source, key, "is missing", hint)
    value = data[key]
    if not isinstance(value, str):
        raise _fail(source, key, f"must be a string, not {type(value).__name__}", hint)
    return value


def _argv(value: Any, key: str, source: str) -> tuple[str, ...]:
    hint = 'an array of strings, e.g. ["node", "dist/main.js"]'
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _fail(source, key, "must be an array of strings", hint)
    if value and not value[0]:
        raise _fail(source, key, "the program (first element) is empty", hint)
    if any("\0" in a for a in value):
        raise _fail(source, key, "contains a NUL byte", hint)
    return tuple(value)


def relative_path(value: Any, key: str, source: str = MANIFEST_NAME) -> str:
    """A normalized relative path that stays inside the release ('a/b', never '/x' or '..')."""
    hint = "a relative path inside the release, without '..'"
    if not isinstance(value, str) or not value or "\0" in value:
        raise _fail(source, key, f"{value!r} is not a path", hint)
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or str(p) == ".":
        raise _fail(source, key, f"{value!r} must stay inside the release", hint)
    return str(p)


def link_stays_inside(member: str, target: str) -> bool:
    """Whether symlink `member` (a path relative to the release top) pointing at `target`
    stays inside the release, resolving lexically from the link's own directory."""
    if not target or target.startswith("/") or "\0" in target:
        return False
    where = [p for p in member.split("/") if p not in ("", ".")][:-1]
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not where:
                return False
            where.pop()
        else:
            where.append(comp)
    return True


def _health(value: Any, source: str) -> Health:
    if not isinstance(value, dict):
        raise _fail(source, "health", "must be a table", "[health] with http_path, ws_path")
    unknown = sorted(set(value) - set(HEALTH_KEYS))
    if unknown:
        raise _fail(source, f"health.{unknown[0]}", "unknown key", f"known: {HEALTH_KEYS}")
    d = Health()
    paths = {}
    for key in ("http_path", "ws_path"):
        path = value.get(key, getattr(d, key))
        if not isinstance(path, str) or not path.startswith("/") or any(c.isspace() for c in path):
            raise _fail(source, f"health.{key}", f"{path!r} is not a URL path", "e.g. '/api'")
        paths[key] = path
    timeout = value.get("timeout_s", d.timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 3600:
        raise _fail(source, "health.timeout_s", f"{timeout!r} is not 1..3600", "seconds")
    return Health(http_path=paths["http_path"], ws_path=paths["ws_path"], timeout_s=timeout)


def _env(value: Any, source: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _fail(source, "env", "must be a table", '[env] with KEY = "value" lines')
    out = []
    for k, v in value.items():
        if not ENV_KEY_RE.fullmatch(k):
            raise _fail(source, f"env.{k}", "is not a variable name", "letters, digits, '_'")
        if not isinstance(v, str) or "\0" in v:
            raise _fail(source, f"env.{k}", "must be a string", 'quote it: KEY = "1"')
        out.append((k, v))
    return tuple(out)


def shared_dirs(value: Any, source: str = MANIFEST_NAME) -> tuple[str, ...]:
    """shared_dirs: relative dirs inside the release, each once, none inside another, none
    the manifest or a name the appliance keeps (`.aipbx-…`: appliance.shared)."""
    hint = 'e.g. ["static", "tts_voices"]: the dirs the app writes at run time'
    if not isinstance(value, list):
        raise _fail(source, "shared_dirs", "must be an array of paths", hint)
    dirs = tuple(relative_path(d, "shared_dirs", source) for d in value)
    if len(set(dirs)) != len(dirs):
        raise _fail(source, "shared_dirs", "lists a directory twice", "list each once")
    for d in dirs:
        top = d.split("/")[0]
        if top == MANIFEST_NAME or top.startswith(".aipbx-"):
            raise _fail(source, "shared_dirs", f"{d!r} is the appliance's name", "pick another")
        inner = next((o for o in dirs if o.startswith(f"{d}/")), None)
        if inner is not None:
            raise _fail(
                source,
                "shared_dirs",
                f"{inner!r} is inside {d!r}",
                "list the outer one only: everything in it is shared",
            )
    return dirs


def _migrations(value: Any, shared: tuple[str, ...], source: str) -> SqlMigrations:
    if not isinstance(value, dict):
        raise _fail(source, "migrations", "must be a table", '[migrations] sql_dir = "dir"')
    unknown = sorted(set(value) - set(MIGRATIONS_KEYS))
    if unknown:
        raise _fail(source, f"migrations.{unknown[0]}", "unknown key", f"known: {MIGRATIONS_KEYS}")
    if "sql_dir" not in value:
        raise _fail(source, "migrations.sql_dir", "is missing", 'e.g. "migrations/postgres"')
    sql_dir = relative_path(value["sql_dir"], "migrations.sql_dir", source)
    if sql_dir == MANIFEST_NAME:
        raise _fail(source, "migrations.sql_dir", "is the manifest", "name a directory")
    for d in shared:
        if sql_dir == d or sql_dir.startswith(f"{d}/") or d.startswith(f"{sql_dir}/"):
            # A shared dir is the app's data (its user writes it): not the release's SQL.
            raise _fail(
                source,
                "migrations.sql_dir",
                f"{sql_dir!r} overlaps the shared dir {d!r}",
                "SQL files belong to the release: keep them out of shared_dirs",
            )
    baseline = value.get("baseline", SQL_BASELINES[0])
    if baseline not in SQL_BASELINES:
        raise _fail(
            source, "migrations.baseline", f"{baseline!r} is unknown", " or ".join(SQL_BASELINES)
        )
    return SqlMigrations(sql_dir=sql_dir, baseline=baseline)


def _env_names(data: Mapping[str, Any], key: str, source: str) -> tuple[str, ...]:
    """required_env / generated_env: variable names, each once, none the appliance's."""
    value = data.get(key, [])
    hint = 'an array of variable names, e.g. ["OPENAI_API_KEY"]'
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise _fail(source, key, "must be an array of variable names", hint)
    for k in value:
        if not ENV_KEY_RE.fullmatch(k):
            raise _fail(source, key, f"{k!r} is not a variable name", "letters, digits, '_'")
        if appenv.is_owned(k):
            raise _fail(source, key, f"{k} is set by the appliance", appenv.OWNED[k])
    if len(set(value)) != len(value):
        raise _fail(source, key, "lists a variable twice", "list each once")
    return tuple(value)


def _app_env(
    data: Mapping[str, Any], kind: Kind, fixed: tuple[tuple[str, str], ...], source: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    required = _env_names(data, "required_env", source)
    generated = _env_names(data, "generated_env", source)
    if kind is Kind.FRONTEND and (required or generated):
        key = "required_env" if required else "generated_env"
        raise _fail(source, key, "a frontend runs nothing", f"drop {key}")
    both = next((k for k in required if k in generated), None)
    if both:
        raise _fail(source, "generated_env", f"{both} is also required", "list it in one only")
    in_env = next((k for k, _ in fixed if k in (*required, *generated)), None)
    if in_env:
        what = "has a fixed value and is listed in required_env or generated_env"
        raise _fail(source, f"env.{in_env}", what, "drop one")
    return required, generated


def manifest_from_dict(data: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
    unknown = sorted(set(data) - {*TOP_KEYS, "env"})
    if unknown:
        raise _fail(source, unknown[0], "unknown key", f"known keys: {', '.join(TOP_KEYS)}, env")
    name = _string(data, "name", source, "lower-case letters, digits and '-'")
    if not NAME_RE.fullmatch(name):
        raise _fail(source, "name", f"{name!r} is not valid", "lower-case [a-z0-9-], max 63")
    version = _string(data, "version", source, "e.g. '1.4.2' or '2.0.0~rc1'")
    if not VERSION_RE.fullmatch(version):
        raise _fail(
            source, "version", f"{version!r} is not valid", "[0-9A-Za-z.+~-], starting with a digit"
        )
    kind_s = _string(data, "kind", source, "'backend' or 'frontend'")
    try:
        kind = Kind(kind_s)
    except ValueError:
        raise _fail(source, "kind", f"{kind_s!r} is unknown", "'backend' or 'frontend'") from None
    command = _argv(data.get("command", []), "command", source)
    migrate = _argv(data.get("migrate", []), "migrate", source)
    if kind is Kind.BACKEND and not command:
        raise _fail(source, "command", "a backend needs a command", 'e.g. ["node", "dist/main.js"]')
    if kind is Kind.FRONTEND and (command or migrate):
        key = "command" if command else "migrate"
        raise _fail(source, key, "a frontend is served by nginx and runs nothing", f"drop {key}")
    shared = shared_dirs(data.get("shared_dirs", list(Manifest.shared_dirs)), source)
    runtime = data.get("runtime")
    migrations = None
    if "migrations" in data:
        if kind is Kind.FRONTEND:
            raise _fail(source, "migrations", "a frontend runs nothing", "drop [migrations]")
        migrations = _migrations(data["migrations"], shared, source)
    env = _env(data.get("env", {}), source)
    required_env, generated_env = _app_env(data, kind, env, source)
    return Manifest(
        name=name,
        version=version,
        kind=kind,
        command=command,
        health=_health(data.get("health", {}), source),
        migrate=migrate,
        shared_dirs=shared,
        runtime=None if runtime is None else relative_path(runtime, "runtime", source),
        env=env,
        migrations=migrations,
        required_env=required_env,
        generated_env=generated_env,
    )


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> Manifest:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{source}: not valid TOML: {e}", hint="fix the manifest") from None
    except RecursionError:  # arrays or inline tables nested thousands deep
        raise UsageError(f"{source}: nested too deeply", hint="fix the manifest") from None
    return manifest_from_dict(data, source)


def load_manifest(path: Path) -> Manifest:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"{path}: not a regular file")
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(
            f"{path}: no release manifest", hint=f"a release has {MANIFEST_NAME} at its top"
        ) from None
    except OSError as e:  # a symlink (ELOOP), unreadable
        raise UsageError(f"{path}: {e.strerror} (a manifest is a regular file)") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: manifest is not UTF-8 text") from None
    return parse_manifest(text, source=str(path))


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    out: dict[str, Any] = {"name": m.name, "version": m.version, "kind": m.kind.value}
    if m.command:
        out["command"] = list(m.command)
    if m.migrate:
        out["migrate"] = list(m.migrate)
    out["shared_dirs"] = list(m.shared_dirs)
    if m.runtime is not None:
        out["runtime"] = m.runtime
    out["health"] = {
        "http_path": m.health.http_path,
        "ws_path": m.health.ws_path,
        "timeout_s": m.health.timeout_s,
    }
    if m.env:
        out["env"] = dict(m.env)
    if m.migrations is not None:
        out["migrations"] = {"sql_dir": m.migrations.sql_dir, "baseline": m.migrations.baseline}
    if m.required_env:
        out["required_env"] = list(m.required_env)
    if m.generated_env:
        out["generated_env"] = list(m.generated_env)
    return out


def render_manifest(m: Manifest) -> str:
    return tomli_w.dumps(manifest_to_dict(m))
