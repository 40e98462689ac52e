"""`aipbxctl migrations list | mark`: a release's SQL files against the database's records
(appliance.sqlmigrations does the work)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from appliance import config as config_mod
from appliance import releases, sqlmigrations, state
from appliance.errors import UsageError
from appliance.fsutil import locked
from appliance.log import audit
from appliance.paths import Paths


def choose_release(paths: Paths, wanted: str | None) -> tuple[releases.Installed, bool]:
    """The release named (a version or a dir name), else the newest installed one with SQL
    files (after a failed upgrade: the one that failed); and whether it is live."""
    live = state.load(paths.state).live_release()
    if wanted:
        name = releases.get(paths, live).manifest.name if live else None
        rel = releases.find(paths, wanted, prefer_name=name)
    else:
        with_sql = [r for r in releases.installed(paths) if r.manifest.migrations is not None]
        if not with_sql:
            raise UsageError(
                "no installed release has SQL migrations ([migrations] sql_dir)",
                hint="`aipbxctl release pack --sql-migrations DIR` packs a release with them",
            )
        rel = with_sql[-1]
    return rel, rel.dirname == live


def run_list(paths: Paths, a: Mapping[str, Any]) -> dict[str, Any]:
    cfg = config_mod.load(paths.config)
    rel, live = choose_release(paths, a.get("release"))
    prep = sqlmigrations.inspect(sqlmigrations.target(paths, cfg), rel)
    return sqlmigrations.listing(prep, live=live)


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def format_list(data: Mapping[str, Any]) -> str:
    files: Sequence[Mapping[str, Any]] = data["files"]
    live = " (live)" if data["live"] else ""
    table = "present" if data["tracking_table"] else "not created yet"
    lines = [
        f"{data['release']}{live}: {len(files)} SQL file(s) in {data['sql_dir']}; database "
        f"{data['database']}: {data['app_tables']} table(s) of the app, tracking table "
        f"{sqlmigrations.QUALIFIED} {table}",
    ]
    if files:
        width = max(40, *(len(f["name"]) for f in files))
        lines.append(f"{'FILE':{width}} {'STATUS':9} {'RECORDED (UTC)':19}  BY")
        for f in files:
            lines.append(
                f"{f['name']:{width}} {f['status']:9} {_when(f['recorded_at']):19}  "
                f"{f['recorded_by'] or '-'}"
            )
    counts = data["counts"]
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no SQL files")
    pending = len(data["pending"])
    nxt = {
        "refused": f"an upgrade to it is refused: {counts.get('changed', 0)} file(s) changed "
        "after they were recorded (mark them if the database has their new content)",
        "baseline": f"an upgrade to it records the {pending} pending file(s) as baseline "
        "without running them (the database has no tables of the app's yet)",
        "run": f"an upgrade to it runs the {pending} pending file(s), each once, in this order"
        if pending
        else "an upgrade to it runs nothing",
    }[data["next_upgrade"]]
    lines.append(nxt)
    if data["not_shipped"]:
        lines.append(f"recorded, not shipped by this release: {', '.join(data['not_shipped'])}")
    return "\n".join(lines)


def run_mark(paths: Paths, a: Mapping[str, Any]) -> dict[str, Any]:
    if bool(a.get("all")) == bool(a["files"]):
        raise UsageError(
            "name the files to mark, or --all (not both)",
            hint="aipbxctl migrations mark FILE... | aipbxctl migrations mark --all",
        )
    cfg = config_mod.load(paths.config)
    rel, _live = choose_release(paths, a.get("release"))
    mig = rel.manifest.migrations
    if mig is None:
        raise UsageError(
            f"{rel.dirname} has no SQL migrations ([migrations] sql_dir)",
            hint="name a release that has them: --release VERSION",
        )
    files = sqlmigrations.release_files(rel.path, mig)
    wanted = list(a["files"])
    if a.get("all"):
        wanted = [f.name for f in files]
    t = sqlmigrations.target(paths, cfg)
    with locked(paths.lock, "change"):
        done = sqlmigrations.mark(t, rel, files, wanted)
    audit(
        "migrations mark",
        "ok" if done["marked"] else "unchanged",
        release=rel.dirname,
        files=",".join(m["name"] for m in done["marked"]),
    )
    return done


def format_mark(done: Mapping[str, Any]) -> str:
    lines = []
    for m in done["marked"]:
        was = (
            f" (it was recorded with sha256 {sqlmigrations.short(m['replaced_sha256'])}…)"
            if m["replaced_sha256"]
            else ""
        )
        lines.append(
            f"marked {m['name']} of {done['release']} as handled (sha256 "
            f"{sqlmigrations.short(m['sha256'])}…){was}: upgrades will not run it"
        )
    for m in done["already"]:
        lines.append(f"{m['name']}: already recorded as {m['how']} with this content")
    return "\n".join(lines)
