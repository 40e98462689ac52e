"""Fixtures for the system tests: a cached Debian 12 rootfs, one booted machine per test
module, and the built .deb. Nothing here skips: a system test that cannot run fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.harness import harness_problem
from tests.system.leftovers import sweep_stale_machines
from tests.system.machine import Machine
from tests.system.rootfs import ensure_rootfs

REPO_TOP = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_TOP / "build" / "cache"


@pytest.fixture(scope="session")
def rootfs(request: pytest.FixtureRequest) -> Path:
    problem = harness_problem()
    if problem:
        pytest.fail(f"system tests cannot run: {problem}", pytrace=False)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    sweep_stale_machines(CACHE_DIR)
    # The first build takes a minute or more: show its progress live instead of capturing it.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        return ensure_rootfs(CACHE_DIR)


@pytest.fixture(scope="module")
def machine(rootfs: Path) -> Iterator[Machine]:
    with Machine(rootfs) as m:
        yield m


def _built_deb_path() -> Path:
    """Where `make deb` leaves the package (the Makefile's DEB variable)."""
    version = tomllib.loads((REPO_TOP / "pyproject.toml").read_text())["project"]["version"]
    return REPO_TOP / "build" / f"aipbx-appliance_{version}_all.deb"


@pytest.fixture(scope="session")
def deb() -> Path:
    """The .deb under test: $AIPBX_DEB if set (already built), else `make deb`."""
    given = os.environ.get("AIPBX_DEB")
    if given:
        path = Path(given)
        if not path.is_file():
            pytest.fail(f"AIPBX_DEB={given} is not a file", pytrace=False)
        return path.resolve()
    proc = subprocess.run(
        ["make", "deb"], cwd=REPO_TOP, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"`make deb` failed ({proc.returncode}):\n{tail}", pytrace=False)
    path = _built_deb_path()
    if not path.is_file():
        pytest.fail(f"`make deb` succeeded but {path} does not exist", pytrace=False)
    return path
