"""The blue/green upgrade (DESIGN decision 7) and rollback (decision 8): a health-gated state
machine, one at a time (the mutation lock), every step logged with its elapsed time.

verify -> unpack -> backup (when it migrates) -> migrate -> start the idle color -> wait
healthy -> switch -> probation (a failure switches back) -> drain -> stop the old color -> gc.
A release whose required variables are missing from backend.env is refused before it is
unpacked; the variables it has the appliance generate are written before it migrates
(appliance.appenv). `restart` runs the same path for the live release.
Before anything changes: room on the disks, PostgreSQL answering when it migrates, a
downgrade confirmed (appliance.preflight, appliance.pgready). A failure before the switch
leaves the live color untouched. From the switch on (appliance.phases) every step is
recorded in state.json before it is taken, so `aipbxctl reconcile` resumes an interrupted
rollout with the same steps (appliance.resume decides them), and a power cut mid-way is
healed at boot."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance import appenv, health, pgready, preflight, reconcile, releases, state
from appliance import drain as drain_mod
from appliance.boottime import in_seconds
from appliance.colors import Color, color_net
from appliance.errors import AipbxError, UsageError
from appliance.fsutil import atomic_symlink
from appliance.phases import abandon, conclude, drain_and_stop, earlier_frontends, switch_to, watch
from appliance.phases import gc as _gc
from appliance.phases import reship_live as _reship_live
from appliance.phases import ship as _ship
from appliance.phases import ship_or_log as _ship_or_log
from appliance.release.manifest import Kind, Manifest
from appliance.rollout_ctx import (
    Ctx,
    Options,
    Step,
    Timeline,
    UpgradeFailed,
    forget_flows,
    unit,
)

__all__ = [
    "Ctx",
    "Options",
    "Step",
    "Timeline",
    "UpgradeFailed",
    "deploy",
    "drain_and_stop",
    "restart",
    "rollback",
    "unit",
    "upgrade",
]

log = logging.getLogger("aipbx.upgrade")
_switch_to = switch_to  # the name tests replace


# --- pieces --------------------------------------------------------------------------


def _free_idle_color(ctx: Ctx, st: state.State) -> Color:
    """The color to deploy on: the one not live. If it still drains a previous release it
    may be stopped only when nothing uses it any more."""
    idle = st.live_color.other if st.live_color else Color.BLUE
    if ctx.services.is_active(unit(idle)):
        try:
            use = drain_mod.usage(ctx.cfg, idle)
        except drain_mod.UsageUnknown as e:
            raise AipbxError(
                f"{e.message}: {idle} may still carry calls of the previous release",
                hint="check `conntrack -L` works, or wait for the drain's deadline",
            ) from None
        if not use.idle:
            raise UsageError(
                f"{idle} still serves {use.ws} WebSocket connection(s) and {use.udp_flows} "
                f"call flow(s) of the previous release",
                hint="wait for them to end (`aipbxctl status`), or roll back to it",
            )
        ctx.services.stop(unit(idle))
        forgot = forget_flows(ctx.cfg, idle)
        ctx.tl.step(Step.STOP_OLD, f"stopped {idle}: it was drained{forgot}")
    if st.draining and st.draining.color == idle:
        ctx.save(st.with_(draining=None))
    return idle


def _start_and_gate(ctx: Ctx, color: Color, rel: releases.Installed, opts: Options) -> None:
    _ship(ctx, rel)
    # state.json names the release first, then the color's link follows: a failure between
    # the two (a full disk) leaves a link that reconcile (or the next command) puts right
    # from state.json, never a link to a release state.json does not name.
    st = ctx.load()
    ctx.save(st.with_(colors={**st.colors, str(color): rel.dirname}, upgrading=rel.dirname))
    atomic_symlink(Path("..") / "releases" / rel.dirname, ctx.paths.colors / str(color))
    ctx.services.reset_failed(unit(color))  # an earlier failure's start limit
    ctx.services.restart(unit(color))
    ctx.tl.step(Step.START, f"{rel.dirname} started on {color}")
    net = color_net(ctx.cfg.network.subnet, color)
    hc = rel.manifest.health
    timeout = opts.health_timeout_s or float(hc.timeout_s)
    ok, detail = health.wait_healthy(
        net.ns_addr,
        ctx.cfg.backend.http_port,
        ctx.cfg.backend.ws_port,
        hc.http_path,
        hc.ws_path,
        timeout,
        alive=lambda: ctx.services.state(unit(color)).active in ("active", "activating"),
    )
    if not ok:
        ctx.services.stop(unit(color))
        ctx.services.reset_failed(unit(color))  # refused, not an outage: no failed unit
        forgot = forget_flows(ctx.cfg, color)
        st = ctx.load()
        ctx.save(st.with_(upgrading="").with_failed(rel.dirname))
        ctx.tl.step(Step.HEALTH, f"FAILED: {detail}; {color} stopped, nothing switched{forgot}")
        _reship_live(ctx)
        raise UpgradeFailed(
            f"{rel.dirname} never became healthy on {color}: {detail}",
            hint="the live color is untouched; `aipbxctl logs backend` shows why",
        )
    ctx.tl.step(Step.HEALTH, f"{color} healthy ({detail})")


# --- the verbs -----------------------------------------------------------------------


def _prepare_env(ctx: Ctx, rel: releases.Installed) -> None:
    """Before `rel` migrates or starts: its required variables are checked (a missing one
    refuses it, nothing started), then the variables it has the appliance generate are
    written into backend.env once (names in the timeline, never values)."""
    m = rel.manifest
    if m.kind is not Kind.BACKEND or not (m.required_env or m.generated_env):
        return
    try:
        appenv.check_required(ctx.paths, m, rel.dirname)
    except UsageError:
        ctx.tl.step(Step.ENV, f"refused {rel.dirname}: required variables are missing")
        raise
    generated, adopted = appenv.generate_missing(ctx.paths, m)
    done = [f"generated {', '.join(generated)}"] if generated else []
    done += [f"took {', '.join(adopted)} over from secrets.env"] if adopted else []
    if done:
        ctx.tl.step(Step.ENV, f"{'; '.join(done)} into {ctx.paths.backend_env}")


def deploy(ctx: Ctx, rel: releases.Installed, opts: Options) -> dict[str, Any]:
    """Roll an installed backend release out to the idle color and switch to it. A failure
    before the switch stops that color again (appliance.phases.abandon); from the switch
    on every step is recorded first, and `aipbxctl reconcile` resumes it."""
    _prepare_env(ctx, rel)
    st = ctx.load()
    old = st.live_color
    idle = _free_idle_color(ctx, st)
    try:
        _start_and_gate(ctx, idle, rel, opts)
        ctx.services.enable(unit(idle))
        p = state.Probation(
            color=idle,
            release=rel.dirname,
            old_color=old,
            until=in_seconds(ctx.clock(), opts.probation_s),
            drain_s=opts.drain_s,
            verb=opts.verb,
        )
        history = (*ctx.load().history, rel.dirname)
        switch_ms = _switch_to(ctx, idle, why="switch", probation=p, history=history)
    except UpgradeFailed:
        raise  # refused by its health gate: already cleaned up
    except BaseException:
        abandon(ctx, idle, rel.dirname)
        raise
    ctx.tl.figures["switch_ms"] = round(switch_ms, 1)
    if old is not None:
        _disable_for_boot(ctx, old)
    passed, what = conclude(ctx, p, watch(ctx, p))
    if not passed:
        raise UpgradeFailed(what, hint="`aipbxctl logs backend`")
    if old is None:
        _gc(ctx)
    # else drained by the caller, outside the lock, until the deadline recorded now
    ctx.tl.figures.update(
        color=str(idle), release=rel.dirname, drain_color=str(old) if old else None
    )
    return ctx.tl.figures


def _disable_for_boot(ctx: Ctx, color: Color) -> None:
    """The color being left runs on (probation, drain) but a reboot, which ends both, must
    not start it again."""
    try:
        ctx.services.disable(unit(color))
    except AipbxError as e:
        log.warning("could not disable %s: %s", unit(color), e.message)


def deploy_frontend(ctx: Ctx, rel: releases.Installed) -> dict[str, Any]:
    st = ctx.load()
    # Before the switch: the release being replaced joins nginx's fallback, so a tab
    # opened on it still finds its lazily loaded chunks once `rel` is live.
    linked = earlier_frontends(ctx, rel.dirname)
    ctx.tl.step(Step.SHARED, f"earlier frontends' files kept for open tabs: {linked}")
    ctx.save(st.with_(frontend=rel.dirname))  # first: reconcile puts the link right after
    t0 = time.monotonic()
    atomic_symlink(Path("..") / "releases" / rel.dirname, ctx.paths.frontend / "current")
    ms = (time.monotonic() - t0) * 1000
    ctx.tl.step(Step.SWITCH, f"frontend is now {rel.dirname} ({ms:.1f} ms)")
    _gc(ctx)
    ctx.tl.figures.update(switch_ms=round(ms, 1), release=rel.dirname, kind="frontend")
    return ctx.tl.figures


def _migrate(ctx: Ctx, rel: releases.Installed) -> None:
    """_migrate_steps; a failure because PostgreSQL does not answer says so, and what
    became of the database (appliance.pgready)."""
    from appliance import migrate, sqlmigrations

    try:
        _migrate_steps(ctx, rel)
    except AipbxError as e:
        if isinstance(e, sqlmigrations.SqlMigrationFailed | migrate.MigrationFailed):
            consequence = e.message
        elif "pre_upgrade_backup" not in ctx.tl.figures:
            consequence = "nothing was migrated or switched"
        else:
            consequence = (
                f"the migration of {rel.dirname} was cut off: whether it changed the "
                "database cannot be checked until PostgreSQL answers; nothing was switched; "
                f"the pre-upgrade backup {ctx.tl.figures['pre_upgrade_backup']} is kept "
                "(`aipbxctl restore` puts it back)"
            )
        down = pgready.explain(ctx.cfg, e, consequence=consequence)
        if down is None:
            raise
        ctx.tl.step(Step.MIGRATE, f"FAILED: {down.message}")
        raise down from e


def _migrate_steps(ctx: Ctx, rel: releases.Installed) -> None:
    """The release's SQL files ([migrations] sql_dir), then its migrate command. A changed
    SQL file is refused before anything runs; the pre-upgrade backup is taken when
    something will run. A failing SQL file is rolled back and the ones before it stay
    applied (appliance.sqlmigrations); a failing command is undone as DESIGN decision 7
    says (appliance.migrate), which, when it restores the backup, undoes this run's SQL
    files too (the backup predates them, and so do its records)."""
    from appliance import migrate, sqlmigrations

    sql = None
    if rel.manifest.migrations:
        sql = sqlmigrations.prepare(ctx.paths, ctx.cfg, rel)
    backup = None
    if rel.manifest.migrate or (sql is not None and sql.plan.run):
        backup = migrate.backup_before(ctx.paths, ctx.cfg, rel)
        ctx.tl.figures["pre_upgrade_backup"] = str(backup)
        ctx.tl.step(Step.BACKUP, f"pre-upgrade backup {backup}")
    if sql is not None:
        try:
            ctx.tl.step(Step.MIGRATE, sqlmigrations.execute(sql, ctx.tl.figures))
        except sqlmigrations.SqlMigrationFailed as e:
            ctx.tl.step(Step.MIGRATE, f"FAILED: {e.file}: {e.error}; nothing switched")
            raise
    if rel.manifest.migrate:
        assert backup is not None
        sql_done = ctx.tl.figures.get("sql_migrations", {}).get("applied") or []
        try:
            # On a failure it says (and sets figures["database"]) what became of the database.
            done = migrate.run_migration(ctx.paths, ctx.cfg, rel, backup, ctx.tl.figures)
        except migrate.MigrationFailed as e:
            if sql_done and e.database == "restored":
                e.message += (
                    f"; the restore also undid the {len(sql_done)} SQL file(s) applied before "
                    "the command (the backup predates them and their records)"
                )
            raise
        ctx.tl.step(Step.MIGRATE, done)


def upgrade(ctx: Ctx, artifact: Path, opts: Options) -> dict[str, Any]:
    from appliance.release.checksum import verify

    for note in reconcile.settle(ctx, "upgrade"):
        ctx.tl.step(Step.PLAN, note)
    digest = verify(artifact)
    ctx.tl.step(Step.VERIFY, f"sha256 {digest[:16]}… ok")
    m = releases.peek_manifest(artifact)
    _refuse_unconfirmed_downgrade(ctx, m)
    if m.kind is Kind.BACKEND and m.required_env:  # refused before it is even unpacked
        try:
            appenv.check_required(ctx.paths, m, m.release_dirname)
        except UsageError:
            ctx.tl.step(Step.ENV, f"refused {m.release_dirname}: required variables are missing")
            raise
    preflight.check_space(ctx.paths, unpack_bytes=preflight.unpack_need(ctx.paths, artifact, m))
    if m.kind is Kind.BACKEND and (m.migrate or m.migrations):
        pgready.check(ctx.cfg, consequence="nothing was unpacked, migrated or switched")
    rel = releases.install(ctx.paths, ctx.cfg, artifact, digest=digest)
    ctx.tl.step(Step.UNPACK, f"{rel.dirname} in {rel.path}")
    if rel.manifest.kind is Kind.FRONTEND:
        return deploy_frontend(ctx, rel)
    # Failed until it goes live (the switch clears it): whatever stops it before then (a
    # refusal, its migration, its health, a crash) leaves it first in line for gc.
    ctx.save(ctx.load().with_failed(rel.dirname))
    _prepare_env(ctx, rel)  # generated secrets exist before the migration runs
    if rel.manifest.migrate or rel.manifest.migrations:
        _migrate(ctx, rel)
    return deploy(ctx, rel, opts)


def _refuse_unconfirmed_downgrade(ctx: Ctx, m: Manifest) -> None:
    """A version older than the live one's (of the same app) is deployed only when the
    operator confirms it (--yes, or yes at the prompt on a terminal)."""
    live = ctx.load().live_release() if m.kind is Kind.BACKEND else ctx.load().frontend
    try:
        live_m = releases.get(ctx.paths, live).manifest if live else None
    except AipbxError:
        live_m = None
    warning = preflight.downgrade(m, live_m)
    if warning:
        ctx.tl.step(Step.VERIFY, f"WARNING: {warning}")
        preflight.confirm_downgrade(warning, ctx.confirm)


def restart(ctx: Ctx, opts: Options) -> dict[str, Any]:
    """A blue/green restart of the live release, e.g. with a new environment: the same
    path as an upgrade (idle color, health gate, switch, probation, drain), no migration."""
    for note in reconcile.settle(ctx, "restart"):
        ctx.tl.step(Step.PLAN, note)
    preflight.check_space(ctx.paths, verb="restart")
    st = ctx.load()
    live = st.live_release()
    if st.live_color is None or not live:
        raise UsageError(
            "nothing is live: there is nothing to restart",
            hint="`aipbxctl upgrade ARTIFACT` deploys a release",
        )
    rel = releases.get(ctx.paths, live)
    ctx.tl.step(
        Step.START,
        f"restarting {rel.dirname} on {st.live_color.other} with the current environment",
    )
    return deploy(ctx, rel, replace(opts, verb="restart"))


def rollback(ctx: Ctx, to: str | None, opts: Options) -> dict[str, Any]:
    """Back to the previous release (or `to`): instant while its color still runs
    (probation, drain), else started on the idle color like an upgrade. Not a downgrade
    in the upgrade's sense: the intended way back, so not asked about; it says what it
    does, the database included (left as it is unless --restore-db)."""
    for note in reconcile.settle(ctx, "rollback"):
        ctx.tl.step(Step.PLAN, note)
    preflight.check_space(ctx.paths, verb="roll back")
    st = ctx.load()
    if st.live_color is None:
        raise UsageError("nothing is live: there is nothing to roll back")
    prev = st.previous_color
    target: releases.Installed | None = None
    if to is not None:
        live = st.live_release()
        name = releases.get(ctx.paths, live).manifest.name if live else None
        target = releases.find(ctx.paths, to, prefer_name=name)
    elif prev is not None and str(prev) in st.colors:
        target = releases.get(ctx.paths, st.colors[str(prev)])
    else:
        earlier = [h for h in st.history if h != st.live_release()]
        if not earlier:
            raise UsageError(
                "no earlier release to roll back to",
                hint="`aipbxctl releases` lists what is installed",
            )
        target = releases.get(ctx.paths, earlier[-1])
    current = st.live_color
    # Instant: the previous color is still up (probation, drain) and runs the target.
    instant = (
        prev is not None
        and st.colors.get(str(prev)) == target.dirname
        and ctx.services.is_active(unit(prev))
    )
    ctx.tl.step(Step.PLAN, _rollback_plan(st, target.dirname, instant, opts))
    if instant:
        assert prev is not None
        _ship_or_log(ctx, target)  # the release being left replaced them
        ctx.services.enable(unit(prev))
        # The drain of the color being left starts with the switch, in the same write.
        drain = state.Draining(current, in_seconds(ctx.clock(), opts.drain_s))
        ms = _switch_to(
            ctx,
            prev,
            why="rollback (instant, the previous color was up)",
            draining=drain,
            upgrading="",
        )
        _disable_for_boot(ctx, current)
        ctx.tl.figures.update(
            rollback_ms=round(ms, 1),
            release=target.dirname,
            instant=True,
            color=str(prev),
            drain_color=str(current),
        )
        return ctx.tl.figures
    ctx.tl.step(Step.START, f"{target.dirname} is not running: starting it on the idle color")
    figures = deploy(ctx, target, replace(opts, verb="rollback"))
    figures["rollback_ms"] = figures.pop("switch_ms")
    figures["instant"] = False
    return figures


def _rollback_plan(st: state.State, target: str, instant: bool, opts: Options) -> str:
    """Pure: what a rollback is about to do, in one line."""
    live = st.live_release() or "nothing"
    how = (
        f"instant: {st.previous_color} still runs it, so the switch is all"
        if instant
        else "it is not running: started on the idle color, health-gated, then switched"
    )
    db = (
        "the database goes back to the backup taken before it"
        if opts.restore_db
        else f"the database stays as it is: migrations {live} ran are not undone "
        "(--restore-db puts back the backup taken before it)"
    )
    return f"from {live} (on {st.live_color}) to {target}: {how}; {db}"
