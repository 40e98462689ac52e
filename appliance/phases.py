"""A rollout's steps from the switch on: the switch itself, probation, the drain of the old
color and its stop; used by a running upgrade (appliance.upgrade) and by `aipbxctl
reconcile` resuming an interrupted one (appliance.reconcile), so both run the same steps.
appliance.resume decides each next step; this module does it.

Every step is recorded in state.json before it is taken: the switch and the start of
probation (with its deadline) are one write, made before the nft table changes, so a
crash after it is completed by reconcile (which applies the table state.json names) and
the probation resumed; then the drain (with its deadline); then its end. A failure to
record a step leaves the step untaken."""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance import drain as drain_mod
from appliance import frontend_assets, health, releases, resume, shared, state, switch
from appliance.boottime import in_seconds
from appliance.colors import Color, color_net
from appliance.errors import AipbxError
from appliance.fsutil import locked
from appliance.release.manifest import Kind
from appliance.resume import Act, Decision
from appliance.rollout_ctx import Ctx, Step, forget_flows, unit

log = logging.getLogger("aipbx.upgrade")


# --- shared files and gc ---------------------------------------------------------------


def ship(ctx: Ctx, rel: releases.Installed) -> None:
    """The files `rel` ships in its shared dirs go there, as the app's, before it starts or
    goes live again (appliance.shared; a shared dir that is a symlink is refused)."""
    report = shared.ship(ctx.paths, rel.path, rel.manifest)
    if rel.manifest.kind is Kind.BACKEND and rel.manifest.shared_dirs:
        dirs = ", ".join(rel.manifest.shared_dirs)
        ctx.tl.step(Step.SHARED, f"{dirs} of {rel.dirname}: {report.summary()}")


def ship_or_log(ctx: Ctx, rel: releases.Installed) -> None:
    """ship where a failure must not stop what goes on (a rollback, a refusal): logged."""
    try:
        ship(ctx, rel)
    except (AipbxError, OSError) as e:
        why = e.message if isinstance(e, AipbxError) else str(e)
        log.error("could not put the files %s ships in its shared dirs: %s", rel.dirname, why)
        ctx.tl.step(Step.SHARED, f"FAILED to put {rel.dirname}'s shipped files: {why}")


def reship_live(ctx: Ctx) -> None:
    """After a release was refused: the live release's shipped files go back where the
    refused one's replaced them."""
    live = ctx.load().live_release()
    try:
        rel = releases.get(ctx.paths, live) if live else None
    except AipbxError:
        rel = None  # not installed any more: nothing to put back
    if rel is not None:
        ship_or_log(ctx, rel)


def earlier_frontends(ctx: Ctx, live: str | None) -> int:
    """Point nginx's `frontend/assets` at the files of every installed frontend release but
    `live`, newest first (appliance.frontend_assets): a tab of an earlier release keeps
    loading its chunks. Returns the number of files linked."""
    earlier = [
        frontend_assets.Source(r.dirname, r.path)
        for r in reversed(releases.installed(ctx.paths))
        if r.manifest.kind is Kind.FRONTEND and r.dirname != live
    ]
    return frontend_assets.rebuild(ctx.paths.frontend, earlier)


def gc(ctx: Ctx) -> None:
    st = ctx.load()
    in_use = set(st.colors.values()) | ({st.frontend} if st.frontend else set())
    # A release whose rollout failed goes first (state.failed).
    removed = releases.gc(ctx.paths, ctx.cfg.releases.keep, in_use, st.failed)
    if removed:
        ctx.save(ctx.load().without_failed(*removed))
        if st.frontend:  # a collected frontend's files leave nginx's fallback
            earlier_frontends(ctx, st.frontend)
    ctx.tl.step(Step.GC, f"removed {', '.join(removed)}" if removed else "nothing to remove")


def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
    """A clean-up step after a failure: its own failure is logged, never raised over the
    first one."""
    try:
        fn(*args)
    except Exception as e:  # the original error is the one to report
        log.error("after the failure, could not %s: %s", what, e)


def abandon(ctx: Ctx, color: Color, release: str) -> None:
    """A failure before the switch (anything: a full disk, a command): `color` stops and
    `release` is marked failed, each step on its own, so state.json and the color's link
    still agree whatever fails; `aipbxctl reconcile` finishes what could not be done. A
    color state.json names live is left running: its switch was recorded, and reconcile
    completes it."""
    try:
        live = ctx.load().live_color
    except AipbxError:
        live = None
    if live == color:
        log.error("the switch to %s is recorded: `aipbxctl reconcile` completes it", color)
        return
    _quietly(f"stop {unit(color)}", ctx.services.stop, unit(color))
    _quietly(f"reset {unit(color)}", ctx.services.reset_failed, unit(color))
    _quietly(f"disable {unit(color)}", ctx.services.disable, unit(color))

    def record() -> None:
        st = ctx.load()
        if st.live_color != color:
            ctx.save(st.with_(upgrading="").with_failed(release))

    _quietly("record the failed upgrade in state.json", record)
    _quietly("forget the UDP flows", forget_flows, ctx.cfg, color)
    _quietly("put the live release's shipped files back", reship_live, ctx)


# --- the switch --------------------------------------------------------------------------


def switch_to(ctx: Ctx, color: Color | None, *, why: str, **changes: object) -> float:
    """Make `color` live. state.json records it first (with `changes`, e.g. the probation
    or the drain that begins with it, in the same write), then the nft table changes; if
    nft refuses, the record is put back. A crash between the two is completed by
    reconcile, which applies the table state.json names. A switch ends any probation
    unless `changes` starts one."""
    prepared = switch.prepare(ctx.cfg, color)  # rendered and `nft -c` checked: nothing changed
    before = ctx.load()
    after = before.with_(live_color=color, previous_color=before.live_color, probation=None)
    after = after.with_(**changes)
    ctx.save(after.without_failed(after.live_release() or ""))  # live now: it has not failed
    try:
        ms = switch.execute(prepared)
    except BaseException:
        _quietly("put state.json back after the failed switch", ctx.save, before)
        raise
    ctx.tl.step(Step.SWITCH, f"{why}: live color is now {color} ({ms:.1f} ms)")
    return ms


# --- probation ---------------------------------------------------------------------------


def watch(ctx: Ctx, p: state.Probation) -> Decision:
    """Probe the new color until its probation ends: PASS, ROLL_BACK or KEEP (the last
    probe's answer in `why`). An operator's ^C fails it."""
    net = color_net(ctx.cfg.network.subnet, p.color)
    failures, detail = 0, ""
    try:
        while True:
            active = ctx.services.is_active(unit(p.color))
            d = resume.probation(p, ctx.clock(), failures=failures, unit_active=active, old_up=True)
            if d.act is Act.ROLL_BACK and p.old_color is not None:
                old_up = ctx.services.is_active(unit(p.old_color))
                d = resume.probation(
                    p, ctx.clock(), failures=failures, unit_active=active, old_up=old_up
                )
            if d.act is not Act.PROBE:
                return Decision(d.act, f"{d.why} ({detail})" if detail and failures else d.why)
            probe = health.http_probe(net.ns_addr, ctx.cfg.backend.http_port, "/api")
            failures = 0 if probe.ok else failures + 1
            detail = probe.detail
            ctx.sleep(d.wait_s)
    except KeyboardInterrupt:
        old_up = p.old_color is not None and ctx.services.is_active(unit(p.old_color))
        return Decision(Act.ROLL_BACK if old_up else Act.KEEP, "interrupted by the operator")


def conclude(ctx: Ctx, p: state.Probation, d: Decision) -> tuple[bool, str]:
    """Act on the end of a probation: (passed, what happened). A pass records the drain of
    the old color (its deadline from now); a failure switches back to it (ROLL_BACK), or,
    when it is not running, keeps the new color live (KEEP)."""
    if d.act is Act.PASS:
        st = ctx.load()
        if p.old_color is None or st.live_color != p.color:
            ctx.save(st.with_(probation=None, upgrading=""))
            ctx.tl.step(Step.PROBATION, f"{p.color} passed probation ({d.why})")
            return True, f"{p.release} on {p.color} passed probation"
        until = in_seconds(ctx.clock(), p.drain_s)
        ctx.save(
            st.with_(probation=None, upgrading="", draining=state.Draining(p.old_color, until))
        )
        ctx.tl.step(Step.PROBATION, f"{p.color} passed probation ({d.why})")
        return True, f"{p.release} on {p.color} passed probation; {p.old_color} drains"
    if d.act is Act.KEEP:
        st = ctx.load()
        ctx.save(st.with_(probation=None, upgrading=""))
        msg = (
            f"{p.release} failed probation on {p.color} ({d.why}), but "
            f"{p.old_color or 'no other color'} is not running: nothing to switch back to, "
            f"{p.release} stays live"
        )
        ctx.tl.step(Step.PROBATION, f"FAILED: {msg}")
        log.critical("%s", msg, extra={"fields": {"action": "probation-failed"}})
        return False, msg
    assert p.old_color is not None
    return False, _switch_back(ctx, p, d.why)


def _switch_back(ctx: Ctx, p: state.Probation, problem: str) -> str:
    old, new = p.old_color, p.color
    assert old is not None
    failed = ctx.load().failed | {p.release}  # unless live again (a restart's release)
    back_ms = switch_to(
        ctx,
        old,
        why=f"probation failed ({problem}), switched back",
        upgrading="",
        previous_color=None,
        failed=failed,
    )
    _quietly(f"enable {unit(old)}", ctx.services.enable, unit(old))  # disabled at the switch
    ctx.services.stop(unit(new))
    ctx.services.reset_failed(unit(new))
    ctx.services.disable(unit(new))
    ctx.tl.step(Step.STOP_OLD, f"{new} stopped{forget_flows(ctx.cfg, new)}")
    reship_live(ctx)
    log.critical(
        "%s to %s failed in probation: %s; switched back to %s",
        p.verb,
        p.release,
        problem,
        old,
        extra={"fields": {"action": "auto-rollback"}},
    )
    ctx.tl.figures.update(rollback_ms=back_ms)
    return f"{p.release} failed probation on {new}: {problem}; switched back to {old}"


# --- the drain ---------------------------------------------------------------------------


def drain_and_stop(ctx: Ctx, color: Color, drain_s: float) -> str:
    """Wait until nothing uses `color` or its drain deadline passes (the one state.json
    records; one `drain_s` from now when none is), then stop it. Runs without the
    mutation lock (a rollback may switch back to `color` meanwhile: then it is live again
    and this returns without stopping it); takes the lock for the stop itself."""
    st = ctx.load()
    if st.live_color == color:
        ctx.tl.step(Step.DRAIN, f"{color} is live again (rolled back): not stopped")
        return "rolled-back"
    if st.draining is None or st.draining.color != color:
        st = ctx.save(st.with_(draining=state.Draining(color, in_seconds(ctx.clock(), drain_s))))
    reported = ctx.clock().boottime
    unknown_said = False
    while True:
        st = ctx.load()
        if st.draining is None or st.draining.color != color:
            if st.live_color == color:
                ctx.tl.step(Step.DRAIN, f"{color} is live again (rolled back): not stopped")
                return "rolled-back"
            ctx.tl.step(Step.DRAIN, f"the drain of {color} was ended by another aipbxctl")
            return "stopped"
        try:
            use: drain_mod.Usage | None = drain_mod.usage(ctx.cfg, color)
        except drain_mod.UsageUnknown as e:  # never read as idle: wait to the deadline
            if not unknown_said:
                log.warning("%s; the drain of %s waits for its deadline", e.message, color)
                unknown_said = True
            use = None
        now = ctx.clock()
        d = resume.drain(st.draining, st.live_color, now, idle=use.idle if use else False)
        if d.act is Act.LIVE_AGAIN:
            ctx.tl.step(Step.DRAIN, f"{color} is live again (rolled back): not stopped")
            return "rolled-back"
        what = (
            f"{use.ws} WebSocket(s) and {use.udp_flows} call flow(s)"
            if use
            else "connections conntrack cannot count"
        )
        if d.act is Act.STOP_OLD:
            if use is not None and use.idle:
                ctx.tl.step(Step.DRAIN, f"{color} drained")
            else:
                ctx.tl.step(Step.DRAIN, f"{d.why}: {what} still on {color} are cut")
            break
        if now.boottime - reported >= 10:
            ctx.tl.step(
                Step.DRAIN,
                f"{color} still has {what}; waiting up to {st.draining.until.left(now):.0f}s",
            )
            reported = now.boottime
        ctx.sleep(d.wait_s)
    return stop_drained(ctx, color)


def stop_drained(ctx: Ctx, color: Color) -> str:
    """Under the lock: stop the drained `color`, unless it is live again."""
    with locked(ctx.paths.lock, "change", wait=600):
        st = ctx.load()
        if st.live_color == color:
            ctx.tl.step(Step.DRAIN, f"{color} is live again (rolled back): not stopped")
            return "rolled-back"
        ctx.services.stop(unit(color))
        ctx.services.disable(unit(color))
        forgot = forget_flows(ctx.cfg, color)
        if st.draining is not None and st.draining.color == color:
            ctx.save(st.with_(draining=None))
        ctx.tl.step(Step.STOP_OLD, f"{color} stopped{forgot}")
        gc(ctx)
    return "stopped"


def drain_over(ctx: Ctx) -> Color | None:
    """The color whose drain, recorded in state.json, is over by now (its deadline, a
    reboot, or live again): its record is cleared; it is returned unless it is live."""
    st = ctx.load()
    if st.draining is None:
        return None
    d = resume.drain(st.draining, st.live_color, ctx.clock(), idle=None)
    if d.act is Act.WAIT:
        return None
    ctx.save(st.with_(draining=None))
    return None if d.act is Act.LIVE_AGAIN else st.draining.color
