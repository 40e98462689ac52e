"""`aipbxctl upgrade`, `rollback`, `restart`, `release pack`, `releases`, `reconcile`:
orchestration only; the state machine is appliance.upgrade."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from appliance import config as config_mod
from appliance import reconcile, releases, state, upgrade, validate
from appliance.actions import db_cmd
from appliance.colors import Color
from appliance.errors import AipbxError, UsageError
from appliance.fsutil import locked
from appliance.log import audit
from appliance.oserror import as_error
from appliance.paths import Paths
from appliance.release.pack import pack
from appliance.services import Services


def options(cfg: config_mod.Config, a: dict[str, Any]) -> upgrade.Options:
    probation = a["probation"]
    if probation is None:
        probation = validate.duration_seconds(cfg.upgrade.probation)
    drain = a["drain"]
    if drain is None:
        drain = validate.duration_seconds(cfg.upgrade.drain)
    if probation < 0 or drain < 0:
        raise UsageError("--probation and --drain take seconds >= 0")
    return upgrade.Options(
        probation_s=float(probation),
        drain_s=float(drain),
        health_timeout_s=a["health_timeout"],
        restore_db=bool(a.get("restore_db")),
    )


def confirm(what: str, yes: bool) -> None:
    """Asks on a terminal unless --yes; a script (no terminal) is not asked."""
    if yes or not sys.stdin.isatty():
        return
    if input(f"{what}? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was changed")


def confirm_risky(what: str, yes: bool) -> None:
    """A risky step (a downgrade): --yes, or yes at a prompt on a terminal; a script
    without --yes is refused (exit 2) before anything changed."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{what}: refused without --yes", hint="add --yes to go ahead anyway")
    print(f"{what}? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was changed")


def pending_note(paths: Paths) -> str | None:
    """What an interrupted rollout left for `aipbxctl reconcile`, after a failure."""
    try:
        st = state.load(paths.state)
    except AipbxError:
        return None
    phase = st.phase()
    if phase == "probation" and st.probation:
        return (
            f"the switch to {st.probation.color} is recorded: `aipbxctl reconcile` resumes "
            "its probation, then the drain"
        )
    if phase == "starting":
        return f"`aipbxctl reconcile` stops the color {st.upgrading} was started on"
    if phase == "draining" and st.draining:
        return f"`aipbxctl reconcile` resumes the drain of {st.draining.color}"
    return None


def _failed(e: AipbxError | OSError, paths: Paths) -> AipbxError:
    """The error to report (an OSError made one line), with what reconcile will finish."""
    err = as_error(e) if isinstance(e, OSError) else e
    note = pending_note(paths)
    if note and note not in (err.hint or ""):
        err.hint = f"{err.hint}; {note}" if err.hint else note
    return err


def run_rollout(paths: Paths, services: Services, a: dict[str, Any], verb: str) -> dict[str, Any]:
    cfg = config_mod.load(paths.config)
    opts = options(cfg, a)
    out = (lambda _s: None) if a["json"] else (lambda s: print(s, flush=True))
    tl = upgrade.Timeline(out=out)
    ctx = upgrade.Ctx(paths, cfg, services, tl)
    ctx.confirm = lambda what: confirm_risky(what, a["yes"])
    before = state.load(paths.state).live_release()
    if verb == "restart":
        target = before or "the live release"
    else:
        target = a.get("artifact") or a.get("to") or "previous"
    # --restore-db never happens silently: the backup is found and checked, and the
    # operator confirms, before anything changes.
    restore_file = None
    if a.get("restore_db") and verb == "rollback":
        restore_file, verified = db_cmd.pre_upgrade_backup(paths, cfg, before)
        db_cmd.confirm(
            f"roll back to {target} and restore the database from {restore_file.name} "
            "(every write since that backup is lost)",
            a["yes"],
        )
    elif verb == "restart":
        confirm(f"restart {target} (blue/green, with the current environment)", a["yes"])
    else:
        confirm(f"{verb} to {target}", a["yes"])
    with locked(paths.lock, "upgrade or rollback"):
        try:
            if verb == "upgrade":
                figures = upgrade.upgrade(ctx, Path(a["artifact"]), opts)
            elif verb == "restart":
                figures = upgrade.restart(ctx, opts)
            elif restore_file is not None:
                figures = db_cmd.rollback_restoring(
                    paths,
                    cfg,
                    services,
                    restore_file,
                    verified,
                    out,
                    lambda: upgrade.rollback(ctx, a["to"], opts),
                )
            else:
                figures = upgrade.rollback(ctx, a["to"], opts)
        except (AipbxError, OSError) as caught:
            # An OSError (a full disk under state.json...) is one line too, never a traceback.
            e = _failed(caught, paths)
            if verb == "upgrade" and a.get("restore_db"):
                # The upgrade failed after its migration: put the pre-upgrade backup back.
                db_cmd.restore_after_failed_upgrade(paths, cfg, services, tl.figures, out)
                if tl.figures.get("restored_db"):
                    e.message += f"; --restore-db: restored {tl.figures['restored_db']}"
                elif str(tl.figures.get("database", "")).startswith("restore failed"):
                    e.message += f"; --restore-db: {tl.figures['database']}"
            audit(verb, "failed", target=target, from_release=before, error=e.message)
            if a["json"]:
                failed = {"ok": False, "error": e.message, "steps": tl.steps, **tl.figures}
                print(json.dumps(failed, indent=2, sort_keys=True))
            if e is caught:
                raise
            raise e from caught
    drain_color = figures.pop("drain_color", None)
    if drain_color:
        try:
            figures["old_color"] = upgrade.drain_and_stop(ctx, Color(drain_color), opts.drain_s)
        except (AipbxError, OSError) as caught:
            e = _failed(caught, paths)
            e.message = f"{verb} done, but the drain of {drain_color} failed: {e.message}"
            audit(verb, "failed", target=target, from_release=before, error=e.message)
            if e is caught:
                raise
            raise e from caught
    figures["upgrade_s"] = round(tl.steps[-1]["elapsed_s"], 2) if tl.steps else 0.0
    audit(verb, "ok", target=target, from_release=before, to_release=figures.get("release"))
    return {"ok": True, "steps": tl.steps, **figures}


def release_pack(a: dict[str, Any]) -> Path:
    return pack(
        Path(a["dir"]),
        Path(a["out"]),
        name=a["name"],
        version=a["release_version"],
        kind=a["kind"],
        command=shlex.split(a["release_cmd"]) if a["release_cmd"] else None,
        migrate=shlex.split(a["migrate"]) if a["migrate"] else None,
        runtime=a["runtime"],
        sql_migrations=a["sql_migrations"],
        sql_baseline=a["sql_baseline"],
        shared_dirs=a["shared_dirs"],
        required_env=a["required_env"],
        generated_env=a["generated_env"],
    )


def list_releases(paths: Paths) -> dict[str, Any]:
    st = state.load(paths.state)
    by_release: dict[str, list[str]] = {}
    for color, dirname in st.colors.items():
        by_release.setdefault(dirname, []).append(color)
    rows = []
    for r in releases.installed(paths):
        rows.append(
            {
                "release": r.dirname,
                "name": r.manifest.name,
                "version": r.manifest.version,
                "kind": str(r.manifest.kind),
                "colors": sorted(by_release.get(r.dirname, [])),
                "live": r.dirname == st.live_release() or r.dirname == st.frontend,
                # its last rollout did not make it live: the first that gc removes
                "failed": r.dirname in st.failed and r.dirname != st.upgrading,
            }
        )
    return {"live_color": str(st.live_color) if st.live_color else None, "releases": rows}


def format_releases(data: dict[str, Any]) -> str:
    lines = [f"{'RELEASE':40} {'KIND':9} {'COLORS':12} LIVE"]
    for r in data["releases"]:
        lines.append(
            f"{r['release']:40} {r['kind']:9} {','.join(r['colors']) or '-':12} "
            f"{'yes' if r['live'] else 'failed' if r.get('failed') else ''}"
        )
    return "\n".join(lines) if data["releases"] else "no releases installed"


def run_reconcile(paths: Paths, services: Services) -> list[str]:
    """nft and the colors' links from state.json; an interrupted rollout resumed where it
    stopped (its probation to the recorded deadline, then the drain of the old color
    until its deadline, without the lock, as the upgrade would); the units in line."""
    cfg = config_mod.load(paths.config)
    tl = upgrade.Timeline(out=lambda s: print(s, flush=True))
    ctx = upgrade.Ctx(paths, cfg, services, tl)
    try:
        with locked(paths.lock, "change"):
            changes = reconcile.network(paths, cfg)
            changes += reconcile.links(paths)
            changes += reconcile.resume_probation(ctx)
            changes += reconcile.units(paths, services, cfg, clock=ctx.clock)
        st = ctx.load()
        # a resumed probation that failed switched back: report the table as it ends
        changes[0] = reconcile.table_line(st.live_color)
        if st.draining and st.draining.color != st.live_color:
            color = st.draining.color
            outcome = upgrade.drain_and_stop(ctx, color, 0)  # to the recorded deadline
            changes.append(f"the drain of {color} ended: {outcome}")
    except (AipbxError, OSError) as caught:
        e = _failed(caught, paths)
        audit("reconcile", "failed", error=e.message)
        if e is caught:
            raise
        raise e from caught
    if len(changes) > 1:  # the first line is always the nft table's
        audit("reconcile", "ok", changes="; ".join(changes[1:]))
    return changes
