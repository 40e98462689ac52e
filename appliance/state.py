"""The appliance's state (/var/lib/aipbx/state.json): which color is live and what each color
runs. Written atomically with fsync so it survives power loss; reconciled at boot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.colors import Color
from appliance.errors import AipbxError
from appliance.fsutil import atomic_write

SCHEMA = 1


@dataclass(frozen=True)
class State:
    live_color: Color | None = None
    colors: dict[str, str] = field(default_factory=dict)  # color -> release dir name
    setup_version: str = ""

    def to_json(self) -> str:
        d: dict[str, Any] = asdict(self)
        d["schema"] = SCHEMA
        d["live_color"] = str(self.live_color) if self.live_color else None
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> State:
        d = json.loads(text)
        live = d.get("live_color")
        return State(
            live_color=Color(live) if live else None,
            colors={str(k): str(v) for k, v in (d.get("colors") or {}).items()},
            setup_version=str(d.get("setup_version", "")),
        )


def load(path: Path) -> State:
    try:
        return State.from_json(path.read_text())
    except FileNotFoundError:
        return State()
    except (ValueError, KeyError) as e:
        raise AipbxError(
            f"{path}: unreadable state ({e})",
            hint="restore it from the journal's audit entries or remove it and run setup",
        ) from None


def save(path: Path, state: State) -> None:
    atomic_write(path, state.to_json(), mode=0o644)
