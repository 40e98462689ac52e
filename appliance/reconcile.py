"""Bring the nft table (the blue/green switch) and the backend units in line with state.json
(at boot, from aipbx-netns@'s ExecStartPost, and by `aipbxctl reconcile`): a power cut in
the middle of a switch heals itself, since state.json says what is live.

`aipbxctl reconcile` also puts the colors' links back in line with state.json and resumes
an interrupted rollout where state.json says it stopped: the rest of its probation (a
failure switches back), then the drain of the old color until its deadline, then the stop
(appliance.phases, appliance.resume). `settle` is the part of that an upgrade, rollback or
restart does first, without waiting."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import boottime, drain, nft, resume, state
from appliance.colors import Color
from appliance.config import Config
from appliance.errors import UsageError
from appliance.fsutil import atomic_symlink
from appliance.paths import Paths
from appliance.resume import Act
from appliance.services import Services

if TYPE_CHECKING:  # the rollout's modules are imported where used: the boot-time
    # `aipbx-netns up` and the watchdog, which import this module, need none of them
    from appliance.rollout_ctx import Ctx


def table_line(live: Color | None) -> str:
    """Pure: what the nft table switches to, as reconcile reports it first."""
    return f"nft table: live color {live or 'none'}"


def network(paths: Paths, cfg: Config, *, host: Sequence[str] = ()) -> list[str]:
    """The nft table from state.json: it is the switch of all three protocols."""
    st = state.load(paths.state)
    nft.apply(nft.render(cfg, st.live_color), host=host)
    return [table_line(st.live_color)]


def _link_target(dirname: str) -> str:
    return str(Path("..") / "releases" / dirname)


def links(paths: Paths) -> list[str]:
    """Each color's link (/opt/aipbx/colors/COLOR) and the frontend's point at the release
    state.json names: a failure between the two writes (state.json first) is put right."""
    st = state.load(paths.state)
    want = {paths.colors / c: _link_target(r) for c, r in st.colors.items()}
    if st.frontend:
        want[paths.frontend / "current"] = _link_target(st.frontend)
    changes = []
    for link, target in sorted(want.items()):
        try:
            have: str | None = os.readlink(link)
        except FileNotFoundError:
            have = None
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            have = "(not a link)"
        if have == target:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        atomic_symlink(target, link)
        changes.append(f"{link} -> {target}, as state.json says (was {have or 'missing'})")
    return changes


def settle(ctx: Ctx, verb: str) -> list[str]:
    """Before an upgrade, restart or rollback (under the lock): the links put right, and
    what an interrupted rollout left, settled without waiting: a probation that is over
    passes (its old color then drains), an upgrade that never switched is marked failed.
    A probation still running in this boot is refused (exit 2), except by a rollback,
    which goes back from it."""
    from appliance import phases

    notes = links(ctx.paths)
    st = ctx.load()
    d = resume.pending(st, ctx.clock())
    if d.act is Act.PROBE and st.probation is not None and verb != "rollback":
        p = st.probation
        raise UsageError(
            f"the {p.verb} to {p.release} was interrupted during its probation on {p.color} "
            f"({d.why}): it must end before another {verb}",
            hint=f"`aipbxctl reconcile` resumes it (the probation, then the drain of "
            f"{p.old_color or 'nothing'}); `aipbxctl rollback` goes back instead",
        )
    if d.act is Act.PASS and st.probation is not None:
        notes.append(phases.conclude(ctx, st.probation, d)[1])
    elif d.act is Act.ABANDON:
        ctx.save(st.with_(upgrading="").with_failed(st.upgrading))
        notes.append(f"an interrupted upgrade to {st.upgrading} ended (it never switched)")
    return notes


def resume_probation(ctx: Ctx) -> list[str]:
    """Under the lock, after network(): a probation recorded in state.json runs to its
    deadline (probing the new color; a failure switches back to the old one), then the
    old color's drain is recorded for the caller to wait out without the lock."""
    from appliance import phases
    from appliance.rollout_ctx import Step

    st = ctx.load()
    p = st.probation
    if p is None:
        return []
    d = resume.pending(st, ctx.clock())
    if d.act is Act.PROBE:
        ctx.tl.step(
            Step.PROBATION,
            f"resuming the probation of {p.release} on {p.color} ({d.why}); a failure "
            f"switches back to {p.old_color or 'nothing'}",
        )
        d = phases.watch(ctx, p)
    return [phases.conclude(ctx, p, d)[1]]


def units(
    paths: Paths,
    services: Services,
    cfg: Config,
    *,
    clock: Callable[[], boottime.Now] = boottime.now,
) -> list[str]:
    """The live color's backend runs and is enabled (so boot brings it up); a color that is
    neither live, nor draining, nor what a probation would switch back to is stopped and
    disabled, and the UDP flows that still led to it are forgotten (their next packet goes
    to the live color)."""
    st = state.load(paths.state)
    changes = []
    if st.draining:
        d = resume.drain(st.draining, st.live_color, clock(), idle=None)
        if d.act is not Act.WAIT:
            # An interrupted upgrade left a drain behind that is over by now.
            changes.append(f"the drain of {st.draining.color} is over ({d.why})")
            st = st.with_(draining=None)
            state.save(paths.state, st)
    if st.upgrading and st.probation is None:
        # The caller holds the mutation lock: no upgrade runs, this one was interrupted
        # before its switch (the switch records the probation).
        changes.append(
            f"an interrupted upgrade to {st.upgrading} ended; live is "
            f"{st.live_release() or 'nothing'}"
        )
        st = st.with_(upgrading="").with_failed(st.upgrading)
        state.save(paths.state, st)
    keep = st.colors_kept()
    for color in ("blue", "green"):
        unit = f"aipbx-backend@{color}.service"
        s = services.state(unit)
        if st.live_color is not None and color == str(st.live_color):
            if s.enabled != "enabled":
                services.enable(unit)
                changes.append(f"enabled {unit}")
            if s.active != "active":
                services.start(unit)
                changes.append(f"started {unit}")
        elif color not in keep:
            if s.active in ("active", "activating", "failed"):
                services.stop(unit)
                changes.append(f"stopped {unit}")
                if n := drain.forget_udp_flows(cfg, Color(color)):
                    changes.append(f"{n} UDP flow(s) that led to {color} go to the live color")
            if s.enabled == "enabled":
                services.disable(unit)
                changes.append(f"disabled {unit}")
        elif s.enabled == "enabled":
            # Draining, or what a probation would switch back to: it runs on, but a
            # reboot (which ends both) must not start it.
            services.disable(unit)
            changes.append(f"disabled {unit} (it runs on until its drain ends)")
    return changes
