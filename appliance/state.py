"""The appliance's state (/var/lib/aipbx/state.json): which color is live, what each color
runs, what is draining, what an upgrade in progress had reached. Written atomically with
fsync so it survives power loss; at boot the network and units are reconciled with it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.colors import Color
from appliance.errors import AipbxError
from appliance.fsutil import atomic_write

SCHEMA = 1


@dataclass(frozen=True)
class Draining:
    color: Color
    deadline: float  # epoch seconds


@dataclass(frozen=True)
class State:
    live_color: Color | None = None
    colors: dict[str, str] = field(default_factory=dict)  # color -> release dir name
    previous_color: Color | None = None  # the color a rollback switches back to
    draining: Draining | None = None
    history: tuple[str, ...] = ()  # backend releases made live, oldest first
    frontend: str = ""  # the live frontend release dir name
    upgrading: str = ""  # release being rolled out, "" when none (a crash leaves it set)
    setup_version: str = ""
    # releases whose last rollout did not make them live (refused, migration, health,
    # probation or an interrupted upgrade): the first that `gc` removes
    failed: frozenset[str] = frozenset()

    def live_release(self) -> str | None:
        return self.colors.get(str(self.live_color)) if self.live_color else None

    def with_(self, **changes: Any) -> State:
        return replace(self, **changes)

    def with_failed(self, dirname: str) -> State:
        """`dirname` did not go live; a release that is live (on another color) has not
        failed, whatever happened to this attempt."""
        if dirname in (self.live_release(), self.frontend):
            return self
        return replace(self, failed=self.failed | {dirname})

    def without_failed(self, *dirnames: str) -> State:
        """Live now (or removed): no longer failed."""
        return replace(self, failed=self.failed - set(dirnames))

    def to_json(self) -> str:
        d: dict[str, Any] = asdict(self)
        d["schema"] = SCHEMA
        for key in ("live_color", "previous_color"):
            d[key] = str(d[key]) if d[key] else None
        if self.draining:
            d["draining"] = {"color": str(self.draining.color), "deadline": self.draining.deadline}
        d["history"] = list(self.history)
        d["failed"] = sorted(self.failed)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> State:
        d = json.loads(text)

        def color(v: Any) -> Color | None:
            return Color(v) if v else None

        dr = d.get("draining")
        return State(
            live_color=color(d.get("live_color")),
            colors={str(k): str(v) for k, v in (d.get("colors") or {}).items()},
            previous_color=color(d.get("previous_color")),
            draining=Draining(Color(dr["color"]), float(dr["deadline"])) if dr else None,
            history=tuple(str(h) for h in d.get("history") or ()),
            frontend=str(d.get("frontend") or ""),
            upgrading=str(d.get("upgrading") or ""),
            setup_version=str(d.get("setup_version", "")),
            failed=frozenset(str(f) for f in d.get("failed") or ()),  # absent in older files
        )


def load(path: Path) -> State:
    try:
        return State.from_json(path.read_text())
    except FileNotFoundError:
        return State()
    except (ValueError, KeyError, TypeError) as e:
        raise AipbxError(
            f"{path}: unreadable state ({e})",
            hint="the journal's audit entries say what was live; fix or remove the file",
        ) from None


def save(path: Path, state: State) -> None:
    atomic_write(path, state.to_json(), mode=0o644)
