"""A fake host for rollouts (upgrade, restart, rollback, reconcile) under a temporary root:
systemd units, the nft switch, health, conntrack and the clock, all recorded in one JSON
file so that a process killed mid-rollout and the one resuming it see the same host.

`install(world_file, root)` replaces the pieces that touch the host; what is left is the
appliance's own code (state.json, the colors' links, the decisions, the lock)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import boottime, config, drain, health, nft, shared, state
from appliance.colors import Color, color_net
from appliance.paths import Paths
from appliance.release.manifest import Kind, Manifest, render_manifest
from appliance.services import UnitState

CFG = config.Config()


class World:
    """The fake host's state, kept in a JSON file (read and written at every call)."""

    def __init__(self, file: Path) -> None:
        self.file = file
        if not file.exists():
            self.put(
                {
                    "active": [],
                    "enabled": [],
                    "events": [],
                    "nft": None,
                    "unhealthy": [],
                    "busy": {},  # color -> WebSocket connections still open
                    "clock": None,  # None: the real clock; else [boot_id, boottime]
                }
            )

    def get(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.file.read_text())
        return doc

    def put(self, doc: dict[str, Any]) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.file)

    def event(self, what: str) -> None:
        doc = self.get()
        doc["events"].append(what)
        self.put(doc)

    def events(self) -> list[str]:
        return list(self.get()["events"])

    def set(self, key: str, value: Any) -> None:
        doc = self.get()
        doc[key] = value
        self.put(doc)


class Units:
    """Services backed by the World file."""

    def __init__(self, world: World) -> None:
        self.w = world

    def _change(self, key: str, unit: str, add: bool, verb: str) -> None:
        doc = self.w.get()
        items = set(doc[key])
        items = items | {unit} if add else items - {unit}
        doc[key] = sorted(items)
        doc["events"].append(f"{verb} {unit}")
        self.w.put(doc)

    def state(self, unit: str) -> UnitState:
        doc = self.w.get()
        active = "active" if unit in doc["active"] else "inactive"
        enabled = "enabled" if unit in doc["enabled"] else "disabled"
        return UnitState(unit, active, "running", enabled, "", 1)

    def is_active(self, unit: str) -> bool:
        return unit in self.w.get()["active"]

    def start(self, unit: str) -> None:
        self._change("active", unit, True, "start")

    def restart(self, unit: str) -> None:
        self._change("active", unit, True, "restart")

    def stop(self, unit: str) -> None:
        self._change("active", unit, False, "stop")

    def enable(self, unit: str, *, now: bool = False) -> None:
        self._change("enabled", unit, True, "enable")

    def disable(self, unit: str, *, now: bool = False) -> None:
        self._change("enabled", unit, False, "disable")

    def reload(self, unit: str) -> None:
        self.w.event(f"reload {unit}")

    def daemon_reload(self) -> None:
        pass

    def reset_failed(self, unit: str) -> None:
        pass

    def kill(self, unit: str, signal: str) -> None:
        self.w.event(f"kill {unit}")


@dataclass
class FakeClock:
    """A boot-time clock that sleeping advances (and a wall clock that may jump)."""

    world: World

    def now(self) -> boottime.Now:
        boot, t = self.world.get()["clock"]
        return boottime.Now(boot, t, 1_700_000_000.0 + t)

    def sleep(self, seconds: float) -> None:
        doc = self.world.get()
        doc["clock"][1] += seconds
        self.world.put(doc)


def _color_of(host: str) -> str:
    for c in Color:
        if color_net(CFG.network.subnet, c).ns_addr == host:
            return str(c)
    raise AssertionError(host)


def install(mp: Any, world: World) -> None:
    """Replace what touches the host (`mp`: a pytest MonkeyPatch)."""

    def apply(ruleset: str, host: Any = ()) -> None:
        doc = world.get()
        doc["nft"] = ruleset.removeprefix("live=") or None
        doc["events"].append(f"nft {doc['nft']}")
        world.put(doc)

    mp.setattr(nft, "render", lambda cfg, color: f"live={color or ''}")
    mp.setattr(nft, "check", lambda ruleset: None)
    mp.setattr(nft, "apply", apply)

    def probe(host: str, port: int, path: str, timeout: float = 2.0) -> health.Probe:
        color = _color_of(host)
        world.event(f"probe {color}")
        bad = color in world.get()["unhealthy"]
        return health.Probe(not bad, 0.0, "HTTP 502" if bad else "HTTP 200")

    mp.setattr(health, "http_probe", probe)
    mp.setattr(health, "wait_healthy", lambda *a, **k: (True, "HTTP 200, WebSocket 101"))

    def usage(cfg: config.Config, color: Color) -> drain.Usage:
        return drain.Usage(ws=int(world.get()["busy"].get(str(color), 0)), udp_flows=0)

    mp.setattr(drain, "usage", usage)
    mp.setattr(drain, "forget_udp_flows", lambda cfg, color: 0)

    class _Report:
        def summary(self) -> str:
            return "nothing shipped"

    mp.setattr(shared, "ship", lambda *a, **k: _Report())
    if world.get()["clock"] is not None:
        clock = FakeClock(world)
        mp.setattr(boottime, "now", clock.now)
        mp.setattr(boottime, "sleep", clock.sleep)


def release(paths: Paths, version: str, name: str = "app") -> str:
    """An installed backend release (its manifest only)."""
    m = Manifest(name=name, version=version, kind=Kind.BACKEND, command=("x",), shared_dirs=())
    path = paths.releases / m.release_dirname
    path.mkdir(parents=True, exist_ok=True)
    (path / "aipbx-release.toml").write_text(render_manifest(m))
    return m.release_dirname


def live_on(paths: Paths, units: Units, color: Color, dirname: str) -> None:
    """`dirname` live on `color`, as a finished upgrade leaves it."""
    state.save(paths.state, state.State(live_color=color, colors={str(color): dirname}))
    paths.colors.mkdir(parents=True, exist_ok=True)
    (paths.colors / str(color)).symlink_to(Path("..") / "releases" / dirname)
    unit = f"aipbx-backend@{color}.service"
    doc = units.w.get()
    doc["active"], doc["enabled"], doc["nft"] = [unit], [unit], str(color)
    units.w.put(doc)
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    paths.config.write_text("")


def links(paths: Paths) -> dict[str, str]:
    """What each color's link names (the release dir), for the colors that have one."""
    out = {}
    if paths.colors.is_dir():
        for link in paths.colors.iterdir():
            if link.is_symlink() and not link.name.startswith("."):
                out[link.name] = Path(str(link.readlink())).name
    return out
