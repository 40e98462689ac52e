"""Run `aipbxctl restart`'s rollout on the fake host of tests/rollout_world.py, in a process
of its own, so that a test can SIGKILL it at a chosen line of its output.

python -m tests.integration.rollout_driver ROOT WORLD PROBATION DRAIN"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from appliance.actions import rollout
from appliance.paths import Paths
from tests.rollout_world import Units, World, install


def main(argv: list[str]) -> int:
    root, world_file, probation, drain = argv
    w = World(Path(world_file))
    mp = pytest.MonkeyPatch()
    install(mp, w)
    a = {
        "probation": float(probation),
        "drain": float(drain),
        "health_timeout": None,
        "json": False,
        "yes": True,
        "restore_db": False,
        "to": None,
        "artifact": None,
    }
    rollout.run_rollout(Paths(Path(root)), Units(w), a, "restart")
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
