from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ExitCode, UsageError
from appliance.release.manifest import (
    Health,
    Kind,
    Manifest,
    link_stays_inside,
    load_manifest,
    manifest_from_dict,
    parse_manifest,
    render_manifest,
)

FULL = """
name = "aipbx-backend"
version = "1.4.2+b1"
kind = "backend"
command = ["node", "dist/main.js"]
migrate = ["node", "dist/migrate.js"]
shared_dirs = ["static", "public/uploads"]
runtime = "runtime/bin"

[health]
http_path = "/api/health"
ws_path = "/socket.io/?EIO=4&transport=websocket"
timeout_s = 90

[env]
NODE_ENV = "production"
"""


def test_full_manifest() -> None:
    m = parse_manifest(FULL)
    assert m == Manifest(
        name="aipbx-backend",
        version="1.4.2+b1",
        kind=Kind.BACKEND,
        command=("node", "dist/main.js"),
        health=Health(http_path="/api/health", timeout_s=90),
        migrate=("node", "dist/migrate.js"),
        shared_dirs=("static", "public/uploads"),
        runtime="runtime/bin",
        env=(("NODE_ENV", "production"),),
    )
    assert m.release_dirname == "aipbx-backend-1.4.2+b1"
    assert m.artifact_name == "aipbx-backend-1.4.2+b1.tar.gz"


def test_defaults() -> None:
    m = parse_manifest('name = "x"\nversion = "2"\nkind = "backend"\ncommand = ["node", "a.js"]')
    assert m.health == Health("/api", "/socket.io/?EIO=4&transport=websocket", 120)
    assert m.shared_dirs == ("static", "public")
    assert m.migrate == () and m.runtime is None and m.env == ()


def test_frontend_needs_no_command() -> None:
    m = parse_manifest('name = "aipbx-frontend"\nversion = "1.0.0~rc1"\nkind = "frontend"')
    assert m.kind is Kind.FRONTEND and m.command == ()


@pytest.mark.parametrize("text", [FULL, 'name = "f"\nversion = "0.1"\nkind = "frontend"'])
def test_render_round_trip(text: str) -> None:
    m = parse_manifest(text)
    assert parse_manifest(render_manifest(m)) == m


BASE = {"name": "app", "version": "1.0", "kind": "backend", "command": ["node", "main.js"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": None}, "name: is missing"),
        ({"name": "App"}, "name: 'App' is not valid"),
        ({"name": "-app"}, "name: '-app' is not valid"),
        ({"name": 3}, "name: must be a string"),
        ({"version": "v1.0"}, "version: 'v1.0' is not valid"),
        ({"version": "1.0 beta"}, "version: '1.0 beta' is not valid"),
        ({"version": "1/0"}, "version: '1/0' is not valid"),
        ({"kind": "daemon"}, "kind: 'daemon' is unknown"),
        ({"kind": None}, "kind: is missing"),
        ({"command": None}, "command: a backend needs a command"),
        ({"command": "node main.js"}, "command: must be an array of strings"),
        ({"command": ["node", 1]}, "command: must be an array of strings"),
        ({"command": [""]}, "command: the program (first element) is empty"),
        ({"kind": "frontend"}, "command: a frontend is served by nginx"),
        ({"migrate": "x"}, "migrate: must be an array of strings"),
        ({"shared_dirs": "static"}, "shared_dirs: must be an array of paths"),
        ({"shared_dirs": ["/var/x"]}, "shared_dirs: '/var/x' must stay inside"),
        ({"shared_dirs": ["a/../../x"]}, "shared_dirs: 'a/../../x' must stay inside"),
        ({"shared_dirs": ["static", "static/"]}, "shared_dirs: lists a directory twice"),
        ({"runtime": "../node"}, "runtime: '../node' must stay inside"),
        ({"runtime": ""}, "runtime: '' is not a path"),
        ({"health": {"http_path": "api"}}, "health.http_path: 'api' is not a URL path"),
        ({"health": {"timeout_s": 0}}, "health.timeout_s: 0 is not 1..3600"),
        ({"health": {"timeout_s": True}}, "health.timeout_s: True is not 1..3600"),
        ({"health": {"timeout": 5}}, "health.timeout: unknown key"),
        ({"health": "x"}, "health: must be a table"),
        ({"env": {"1X": "a"}}, "env.1X: is not a variable name"),
        ({"env": {"X": 1}}, "env.X: must be a string"),
        ({"comand": ["x"]}, "comand: unknown key"),
    ],
)
def test_invalid_names_the_key(change: dict[str, object], message: str) -> None:
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(UsageError) as e:
        manifest_from_dict(data, "m.toml")
    assert e.value.message.startswith("m.toml: ")
    assert message in e.value.message
    assert e.value.hint
    assert e.value.exit_code == ExitCode.USAGE


def test_not_toml() -> None:
    with pytest.raises(UsageError, match="not valid TOML"):
        parse_manifest("name = ")


def test_load_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no release manifest"):
        load_manifest(tmp_path / "aipbx-release.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_manifest(bad)
    big = tmp_path / "big.toml"
    big.write_text("#" * 70_000)
    with pytest.raises(UsageError, match="larger than"):
        load_manifest(big)


@pytest.mark.parametrize(
    ("member", "target", "inside"),
    [
        ("node_modules/.bin/tsc", "../typescript/bin/tsc", True),
        ("a/b/c", "../../x", True),
        ("a/b/c", "../../../x", False),
        ("top", ".", True),
        ("top", "..", False),
        ("a/link", "./b/./c", True),
        ("a/link", "b/../../..", False),
        ("a/link", "/etc/passwd", False),
        ("a/link", "", False),
        ("./a/link", "../b", True),
    ],
)
def test_link_stays_inside(member: str, target: str, inside: bool) -> None:
    assert link_stays_inside(member, target) is inside
