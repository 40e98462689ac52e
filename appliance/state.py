"""The appliance's state (/var/lib/aipbx/state.json): which color is live, what each color
runs, what is draining, what an upgrade in progress had reached. Written atomically with
fsync so it survives power loss; at boot the network and units are reconciled with it.

A rollout's phase is recorded before each step (appliance.phases): `upgrading` alone (a
color is being started; nothing switched), `probation` (written with the switch, with its
deadline), `draining` (with its deadline), then neither (done). Deadlines are boot-time
ones (appliance.boottime): a clock jump neither ends nor prolongs them."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.boottime import Deadline
from appliance.colors import Color
from appliance.errors import AipbxError
from appliance.fsutil import atomic_write

SCHEMA = 1
MAX_BYTES = 1 << 20  # a real one is under 2 KiB


class StateError(AipbxError):
    """state.json cannot be read or is not what the appliance writes."""


@dataclass(frozen=True)
class Draining:
    color: Color
    until: Deadline  # then it is stopped, whatever still uses it


@dataclass(frozen=True)
class Probation:
    """Recorded with the switch: `color` (running `release`) is live and on probation
    until `until`; a failure switches back to `old_color`, a pass drains `old_color` for
    `drain_s` seconds."""

    color: Color
    release: str
    old_color: Color | None
    until: Deadline
    drain_s: float
    verb: str = "upgrade"  # upgrade | restart | rollback: what the operator ran


@dataclass(frozen=True)
class State:
    live_color: Color | None = None
    colors: dict[str, str] = field(default_factory=dict)  # color -> release dir name
    previous_color: Color | None = None  # the color a rollback switches back to
    draining: Draining | None = None
    probation: Probation | None = None  # the live color's, while it lasts
    history: tuple[str, ...] = ()  # backend releases made live, oldest first
    frontend: str = ""  # the live frontend release dir name
    upgrading: str = ""  # release being rolled out, "" when none (a crash leaves it set)
    setup_version: str = ""
    # releases whose last rollout did not make them live (refused, migration, health,
    # probation or an interrupted upgrade): the first that `gc` removes
    failed: frozenset[str] = frozenset()

    def live_release(self) -> str | None:
        return self.colors.get(str(self.live_color)) if self.live_color else None

    def phase(self) -> str:
        """Where a rollout stands: starting (a color is being started, nothing switched),
        probation, draining, or done."""
        if self.probation is not None:
            return "probation"
        if self.upgrading:
            return "starting"
        if self.draining is not None:
            return "draining"
        return "done"

    def colors_kept(self) -> set[str]:
        """The colors that must keep running: the live one, the one draining, and the one
        a probation would switch back to."""
        keep = {str(c) for c in (self.live_color,) if c}
        if self.draining:
            keep.add(str(self.draining.color))
        if self.probation and self.probation.old_color:
            keep.add(str(self.probation.old_color))
        return keep

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
            d["draining"] = {"color": str(self.draining.color), **self.draining.until.to_doc()}
        if self.probation:
            p = self.probation
            d["probation"] = {
                "color": str(p.color),
                "release": p.release,
                "old_color": str(p.old_color) if p.old_color else None,
                "drain_s": p.drain_s,
                "verb": p.verb,
                **p.until.to_doc(),
            }
        d["history"] = list(self.history)
        d["failed"] = sorted(self.failed)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> State:
        """ValueError (or KeyError, TypeError) when `text` is not a state this writes."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")

        def color(v: Any) -> Color | None:
            return Color(v) if v else None

        def obj(key: str) -> Mapping[str, Any] | None:
            v = d.get(key)
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"{key!r} is not an object")
            return v or None

        colors, dr, pr = obj("colors") or {}, obj("draining"), obj("probation")
        return State(
            live_color=color(d.get("live_color")),
            colors={str(Color(k)): str(v) for k, v in colors.items()},
            previous_color=color(d.get("previous_color")),
            draining=Draining(Color(dr["color"]), Deadline.from_doc(dr)) if dr else None,
            probation=(
                Probation(
                    color=Color(pr["color"]),
                    release=str(pr["release"]),
                    old_color=color(pr.get("old_color")),
                    until=Deadline.from_doc(pr),
                    drain_s=float(pr.get("drain_s") or 0.0),
                    verb=str(pr.get("verb") or "upgrade"),
                )
                if pr
                else None
            ),
            history=tuple(str(h) for h in d.get("history") or ()),
            frontend=str(d.get("frontend") or ""),
            upgrading=str(d.get("upgrading") or ""),
            setup_version=str(d.get("setup_version", "")),
            failed=frozenset(str(f) for f in d.get("failed") or ()),  # absent in older files
        )


CORRUPT_HINT = (
    "look at it; `ls -l /opt/aipbx/colors` and the journal (`journalctl -t aipbxctl -g "
    "audit`) say what ran. Fix it by hand, or move it away and deploy again (without it "
    "nothing is live: `aipbxctl reconcile` would stop both colors)"
)


def read_text(path: Path) -> str | None:
    """state.json's text (None when there is none): a regular file, never a link, never
    blocking, at most MAX_BYTES, UTF-8. StateError otherwise, naming the file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        why = "a symlink (not followed)" if e.errno == errno.ELOOP else e.strerror
        raise StateError(f"{path}: cannot read the state: {why}", hint=CORRUPT_HINT) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError(f"{path}: not a regular file", hint=CORRUPT_HINT)
        chunks: list[bytes] = []
        got = 0
        while got <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - got)):
            chunks.append(chunk)
            got += len(chunk)
        raw = b"".join(chunks)
    except OSError as e:
        why = e.strerror
        raise StateError(f"{path}: cannot read the state: {why}", hint=CORRUPT_HINT) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_BYTES:
        raise StateError(f"{path}: larger than {MAX_BYTES} bytes", hint=CORRUPT_HINT)
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise StateError(f"{path}: not UTF-8 text (byte {e.start})", hint=CORRUPT_HINT) from None


def load(path: Path) -> State:
    """The state; State() when there is none; StateError (one line, the file named) when
    it cannot be read or is not what the appliance writes."""
    text = read_text(path)
    if text is None:
        return State()
    try:
        return State.from_json(text)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        detail = f"no {e}" if isinstance(e, KeyError) else (str(e) or type(e).__name__)
        raise StateError(
            f"{path}: corrupt state ({detail.splitlines()[0][:200]})", hint=CORRUPT_HINT
        ) from None


def save(path: Path, state: State) -> None:
    """Atomically, fsynced. An OSError (a full disk) names the file and leaves the old
    one as it was."""
    try:
        atomic_write(path, state.to_json(), mode=0o644)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
