"""The blue/green upgrade (DESIGN decision 7) and rollback (decision 8): a health-gated state
machine, one at a time (the mutation lock), every step logged with its elapsed time.

verify -> unpack -> backup (when it migrates) -> migrate -> start the idle color -> wait
healthy -> switch -> probation (a failure switches back) -> drain -> stop the old color -> gc.
A release whose required variables are missing from backend.env is refused before it is
unpacked; the variables it has the appliance generate are written before it migrates
(appliance.appenv). `restart` runs the same path for the live release.
A failure before the switch leaves the live color untouched; state.json is written at each
step that changes what is live, so a power cut mid-way is healed at boot."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance import appenv, health, releases, shared, state, switch
from appliance import drain as drain_mod
from appliance.colors import Color, color_net
from appliance.config import Config
from appliance.errors import AipbxError, UsageError
from appliance.fsutil import atomic_symlink, locked
from appliance.paths import Paths
from appliance.release.manifest import Kind
from appliance.services import Services

log = logging.getLogger("aipbx.upgrade")


class Step(StrEnum):
    VERIFY = "verify"
    UNPACK = "unpack"
    BACKUP = "backup"
    MIGRATE = "migrate"
    SHARED = "shared"
    ENV = "env"
    START = "start"
    HEALTH = "health"
    SWITCH = "switch"
    PROBATION = "probation"
    DRAIN = "drain"
    STOP_OLD = "stop-old"
    GC = "gc"
    DONE = "done"


class UpgradeFailed(AipbxError):
    """The new release was refused; what runs was left (or put back) as it was."""


@dataclass
class Timeline:
    """What happened, step by step, for the operator and --json."""

    out: Callable[[str], None] = print
    t0: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def step(self, step: Step, detail: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.steps.append(
            {
                "step": str(step),
                "elapsed_s": round(elapsed, 3),
                "detail": detail,
                "at": round(time.time(), 3),
            }
        )
        self.out(f"[{elapsed:7.2f}s] {step}: {detail}")
        log.info("%s: %s", step, detail, extra={"fields": {"step": step, "action": "upgrade"}})


@dataclass(frozen=True)
class Options:
    probation_s: float
    drain_s: float
    health_timeout_s: float | None = None  # None: the manifest's


def unit(color: Color) -> str:
    return f"aipbx-backend@{color}.service"


def forget_flows(cfg: Config, color: Color) -> str:
    """After `color` has stopped: the UDP flows conntrack still sends to it go to the live
    color from their next packet. A note for the timeline ("" when there were none)."""
    n = drain_mod.forget_udp_flows(cfg, color)
    return f"; {n} UDP flow(s) that led to it now go to the live color" if n else ""


@dataclass
class Ctx:
    paths: Paths
    cfg: Config
    services: Services
    tl: Timeline

    def save(self, st: state.State) -> state.State:
        state.save(self.paths.state, st)
        return st

    def load(self) -> state.State:
        return state.load(self.paths.state)


# --- pieces --------------------------------------------------------------------------


def _free_idle_color(ctx: Ctx, st: state.State) -> Color:
    """The color to deploy on: the one not live. If it still drains a previous release it
    may be stopped only when nothing uses it any more."""
    idle = st.live_color.other if st.live_color else Color.BLUE
    if ctx.services.is_active(unit(idle)):
        use = drain_mod.usage(ctx.cfg, idle)
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


def _ship(ctx: Ctx, rel: releases.Installed) -> None:
    """The files `rel` ships in its shared dirs go there, as the app's, before it starts or
    goes live again (appliance.shared; a shared dir that is a symlink is refused)."""
    report = shared.ship(ctx.paths, rel.path, rel.manifest)
    if rel.manifest.kind is Kind.BACKEND and rel.manifest.shared_dirs:
        dirs = ", ".join(rel.manifest.shared_dirs)
        ctx.tl.step(Step.SHARED, f"{dirs} of {rel.dirname}: {report.summary()}")


def _ship_or_log(ctx: Ctx, rel: releases.Installed) -> None:
    """_ship where a failure must not stop what goes on (a rollback, a refusal): logged."""
    try:
        _ship(ctx, rel)
    except AipbxError as e:
        log.error("could not put the files %s ships in its shared dirs: %s", rel.dirname, e)
        ctx.tl.step(Step.SHARED, f"FAILED to put {rel.dirname}'s shipped files: {e.message}")


def _reship_live(ctx: Ctx) -> None:
    """After a release was refused: the live release's shipped files go back where the
    refused one's replaced them."""
    live = ctx.load().live_release()
    try:
        rel = releases.get(ctx.paths, live) if live else None
    except AipbxError:
        rel = None  # not installed any more: nothing to put back
    if rel is not None:
        _ship_or_log(ctx, rel)


def _start_and_gate(ctx: Ctx, color: Color, rel: releases.Installed, opts: Options) -> None:
    _ship(ctx, rel)
    atomic_symlink(Path("..") / "releases" / rel.dirname, ctx.paths.colors / str(color))
    st = ctx.load()
    ctx.save(st.with_(colors={**st.colors, str(color): rel.dirname}, upgrading=rel.dirname))
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


def _switch_to(ctx: Ctx, color: Color | None, *, why: str) -> float:
    prepared = switch.prepare(ctx.cfg, color)
    st = ctx.load()
    ms = switch.execute(prepared)
    st = st.with_(live_color=color, previous_color=st.live_color)
    ctx.save(st.without_failed(st.live_release() or ""))  # live now: it has not failed
    ctx.tl.step(Step.SWITCH, f"{why}: live color is now {color} ({ms:.1f} ms)")
    return ms


def _probation(ctx: Ctx, color: Color, seconds: float, *, failures_to_fail: int = 3) -> str | None:
    """None if the color stayed healthy for `seconds`, else what went wrong."""
    net = color_net(ctx.cfg.network.subnet, color)
    deadline = time.monotonic() + seconds
    failures = 0
    while time.monotonic() < deadline:
        p = health.http_probe(net.ns_addr, ctx.cfg.backend.http_port, "/api")
        failures = 0 if p.ok else failures + 1
        if failures >= failures_to_fail:
            return f"{failures} health checks failed in a row ({p.detail})"
        if not ctx.services.is_active(unit(color)):
            return "the backend unit stopped"
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return None


def drain_and_stop(ctx: Ctx, color: Color, drain_s: float) -> str:
    """Wait until nothing uses `color` or the deadline passes, then stop it. Runs without
    the mutation lock (a rollback may switch back to `color` meanwhile: then it is live
    again and this returns without stopping it); takes the lock for the stop itself."""
    deadline = time.time() + drain_s
    st = ctx.load()
    ctx.save(st.with_(draining=state.Draining(color, deadline)))
    last_report = time.monotonic()
    while True:
        st = ctx.load()
        if st.live_color == color or st.draining is None or st.draining.color != color:
            ctx.tl.step(Step.DRAIN, f"{color} is live again (rolled back): not stopped")
            return "rolled-back"
        use = drain_mod.usage(ctx.cfg, color)
        if use.idle:
            ctx.tl.step(Step.DRAIN, f"{color} drained")
            break
        if time.time() >= deadline:
            ctx.tl.step(
                Step.DRAIN,
                f"deadline: {use.ws} WebSocket(s) and {use.udp_flows} "
                f"call flow(s) still on {color} are cut",
            )
            break
        if time.monotonic() - last_report >= 10:
            ctx.tl.step(
                Step.DRAIN,
                f"{color} still has {use.ws} WebSocket(s) and "
                f"{use.udp_flows} call flow(s); waiting up to "
                f"{deadline - time.time():.0f}s",
            )
            last_report = time.monotonic()
        time.sleep(1)
    with locked(ctx.paths.lock, "change", wait=600):
        st = ctx.load()
        if st.live_color == color:
            ctx.tl.step(Step.DRAIN, f"{color} is live again (rolled back): not stopped")
            return "rolled-back"
        ctx.services.stop(unit(color))
        ctx.services.disable(unit(color))
        forgot = forget_flows(ctx.cfg, color)
        ctx.save(st.with_(draining=None, upgrading=""))
        ctx.tl.step(Step.STOP_OLD, f"{color} stopped{forgot}")
        _gc(ctx)
    return "stopped"


def _gc(ctx: Ctx) -> None:
    st = ctx.load()
    in_use = set(st.colors.values()) | ({st.frontend} if st.frontend else set())
    # A release whose rollout failed goes first (state.failed).
    removed = releases.gc(ctx.paths, ctx.cfg.releases.keep, in_use, st.failed)
    if removed:
        ctx.save(ctx.load().without_failed(*removed))
    ctx.tl.step(Step.GC, f"removed {', '.join(removed)}" if removed else "nothing to remove")


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
    """Roll an installed backend release out to the idle color and switch to it."""
    _prepare_env(ctx, rel)
    st = ctx.load()
    old = st.live_color
    idle = _free_idle_color(ctx, st)
    _start_and_gate(ctx, idle, rel, opts)
    ctx.services.enable(unit(idle))
    switch_ms = _switch_to(ctx, idle, why="switch")
    st = ctx.load()
    ctx.save(st.with_(history=(*st.history, rel.dirname)))
    try:
        problem = _probation(ctx, idle, opts.probation_s)
    except KeyboardInterrupt:
        problem = "interrupted by the operator"
    if problem:
        back_ms = _switch_to(ctx, old, why=f"probation failed ({problem}), switched back")
        ctx.services.stop(unit(idle))
        ctx.services.reset_failed(unit(idle))
        ctx.services.disable(unit(idle))
        if forgot := forget_flows(ctx.cfg, idle):
            ctx.tl.step(Step.STOP_OLD, f"{idle} stopped{forgot}")
        st = ctx.load()
        ctx.save(st.with_(upgrading="", previous_color=None).with_failed(rel.dirname))
        _reship_live(ctx)
        log.critical(
            "upgrade to %s failed in probation: %s; switched back to %s",
            rel.dirname,
            problem,
            old,
            extra={"fields": {"action": "auto-rollback"}},
        )
        ctx.tl.figures.update(switch_ms=switch_ms, rollback_ms=back_ms)
        raise UpgradeFailed(
            f"{rel.dirname} failed probation on {idle}: {problem}; " f"switched back to {old}",
            hint="`aipbxctl logs backend`",
        )
    ctx.tl.step(Step.PROBATION, f"{idle} healthy for {opts.probation_s:.0f}s")
    st = ctx.load()
    if old is None:
        ctx.save(st.with_(upgrading=""))
        _gc(ctx)
    else:  # drained by the caller, outside the lock
        ctx.save(st.with_(draining=state.Draining(old, time.time() + opts.drain_s)))
    ctx.tl.figures.update(
        switch_ms=round(switch_ms, 1),
        color=str(idle),
        release=rel.dirname,
        drain_color=str(old) if old else None,
    )
    return ctx.tl.figures


def deploy_frontend(ctx: Ctx, rel: releases.Installed) -> dict[str, Any]:
    t0 = time.monotonic()
    atomic_symlink(Path("..") / "releases" / rel.dirname, ctx.paths.frontend / "current")
    ms = (time.monotonic() - t0) * 1000
    st = ctx.load()
    ctx.save(st.with_(frontend=rel.dirname))
    ctx.tl.step(Step.SWITCH, f"frontend is now {rel.dirname} ({ms:.1f} ms)")
    _gc(ctx)
    ctx.tl.figures.update(switch_ms=round(ms, 1), release=rel.dirname, kind="frontend")
    return ctx.tl.figures


def _migrate(ctx: Ctx, rel: releases.Installed) -> None:
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

    digest = verify(artifact)
    ctx.tl.step(Step.VERIFY, f"sha256 {digest[:16]}… ok")
    m = releases.peek_manifest(artifact)
    if m.kind is Kind.BACKEND and m.required_env:  # refused before it is even unpacked
        try:
            appenv.check_required(ctx.paths, m, m.release_dirname)
        except UsageError:
            ctx.tl.step(Step.ENV, f"refused {m.release_dirname}: required variables are missing")
            raise
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


def restart(ctx: Ctx, opts: Options) -> dict[str, Any]:
    """A blue/green restart of the live release, e.g. with a new environment: the same
    path as an upgrade (idle color, health gate, switch, probation, drain), no migration."""
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
    return deploy(ctx, rel, opts)


def rollback(ctx: Ctx, to: str | None, opts: Options) -> dict[str, Any]:
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
    if (
        prev is not None
        and st.colors.get(str(prev)) == target.dirname
        and ctx.services.is_active(unit(prev))
    ):
        _ship_or_log(ctx, target)  # the release being left replaced them
        ctx.services.enable(unit(prev))
        ms = _switch_to(ctx, prev, why="rollback (instant, the previous color was up)")
        st = ctx.load()
        ctx.save(st.with_(draining=state.Draining(current, time.time() + opts.drain_s)))
        ctx.tl.figures.update(
            rollback_ms=round(ms, 1),
            release=target.dirname,
            instant=True,
            color=str(prev),
            drain_color=str(current),
        )
        return ctx.tl.figures
    ctx.tl.step(Step.START, f"{target.dirname} is not running: starting it on the idle color")
    figures = deploy(ctx, target, opts)
    figures["rollback_ms"] = figures.pop("switch_ms")
    figures["instant"] = False
    return figures
