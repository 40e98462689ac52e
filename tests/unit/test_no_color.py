"""The backend's environment: no ANSI colour codes in the journal unless asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.colors import Color
from appliance.launcher import backend_env
from appliance.release.manifest import Kind, Manifest

CFG = config.parse("")
RELEASE = Path("/opt/aipbx/releases/aipbx-1.0.0")


def _env(base: dict[str, str], release_env: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    m = Manifest(
        name="aipbx", version="1.0.0", kind=Kind.BACKEND, command=("node",), env=release_env
    )
    return backend_env(CFG, Color.BLUE, m, RELEASE, base)


def test_no_color_by_default() -> None:
    assert _env({"PATH": "/usr/bin"})["NO_COLOR"] == "1"


@pytest.mark.parametrize(
    "base", [{"NO_COLOR": ""}, {"NO_COLOR": "0"}, {"FORCE_COLOR": "1"}, {"FORCE_COLOR": "0"}]
)
def test_the_operators_choice_is_kept(base: dict[str, str]) -> None:
    # /etc/aipbx/backend.env (EnvironmentFile=) reaches the launcher as its environment
    env = _env(base)
    assert {k: env[k] for k in base} == base
    if "NO_COLOR" not in base:
        assert "NO_COLOR" not in env


def test_a_release_may_ask_for_colour() -> None:
    assert "NO_COLOR" not in _env({}, (("FORCE_COLOR", "1"),))


def test_backend_env_file_may_ask_for_colour() -> None:
    from appliance import appenv

    m = Manifest(name="aipbx", version="1.0.0", kind=Kind.BACKEND, command=("node",))
    files = appenv.Files(operator={"FORCE_COLOR": "1"}, setup={})
    env = backend_env(CFG, Color.BLUE, m, RELEASE, {}, files)
    assert env["FORCE_COLOR"] == "1" and "NO_COLOR" not in env
    assert backend_env(CFG, Color.BLUE, m, RELEASE, {}, appenv.Files({}, {}))["NO_COLOR"] == "1"
