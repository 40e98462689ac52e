"""A release whose rollout failed goes first when gc removes releases (state.failed)."""

from __future__ import annotations

from pathlib import Path

from appliance import releases, state
from appliance.colors import Color
from appliance.release.manifest import Kind, Manifest


def _rel(dirname: str, mtime: float, kind: Kind = Kind.BACKEND) -> releases.Installed:
    name, _, version = dirname.rpartition("-")
    return releases.Installed(dirname, Manifest(name, version, kind), Path("/x") / dirname, mtime)


def _names(rs: list[releases.Installed]) -> list[str]:
    return sorted(r.dirname for r in rs)


ALL = [_rel(f"app-{i}", float(i)) for i in range(1, 7)]  # app-6 is the newest


def test_without_failures_the_oldest_beyond_keep_go() -> None:
    assert _names(releases.to_remove(ALL, 3, {"app-6"})) == ["app-1", "app-2", "app-3"]


def test_failed_releases_go_before_any_that_went_live() -> None:
    # app-5 and app-4 failed: the 3 kept are the newest good ones, not the newest ones.
    out = releases.to_remove(ALL, 3, {"app-6"}, frozenset({"app-5", "app-4"}))
    assert _names(out) == ["app-1", "app-4", "app-5"]


def test_failed_releases_are_kept_while_there_is_room() -> None:
    assert releases.to_remove(ALL[:3], 5, set(), frozenset({"app-3"})) == []
    # with room for one more than the good ones: the newest failed one stays
    out = releases.to_remove(ALL[:4], 3, set(), frozenset({"app-4", "app-3"}))
    assert _names(out) == ["app-3"]


def test_a_failed_release_a_color_still_points_at_is_not_removed() -> None:
    out = releases.to_remove(ALL, 2, {"app-6", "app-5"}, frozenset({"app-5"}))
    assert _names(out) == ["app-1", "app-2", "app-3"]


def test_kinds_are_counted_apart() -> None:
    fronts = [_rel(f"spa-{i}", float(i), Kind.FRONTEND) for i in range(1, 3)]
    out = releases.to_remove(ALL[:2] + fronts, 1, set(), frozenset({"app-2"}))
    assert _names(out) == ["app-2", "spa-1"]


def test_state_records_failures_and_clears_them() -> None:
    st = state.State(live_color=Color.BLUE, colors={"blue": "app-1"})
    st = st.with_failed("app-2")
    assert st.failed == {"app-2"}
    # the live release has not failed, whatever happened to an attempt on the other color
    assert st.with_failed("app-1").failed == {"app-2"}
    assert st.without_failed("app-2", "app-9").failed == frozenset()


def test_state_json_round_trip_and_old_files_load(tmp_path: Path) -> None:
    st = state.State(
        live_color=Color.GREEN, colors={"green": "app-1"}, failed=frozenset({"b", "a"})
    )
    assert '"failed": [\n    "a",\n    "b"\n  ]' in st.to_json()
    assert state.State.from_json(st.to_json()) == st
    # a state.json written before `failed` existed
    old = '{"schema": 1, "live_color": "blue", "colors": {"blue": "app-1"}, "history": ["app-1"]}'
    path = tmp_path / "state.json"
    path.write_text(old)
    loaded = state.load(path)
    assert loaded.failed == frozenset() and loaded.live_release() == "app-1"
