"""`aipbxctl doctor`: what is wrong on this host, each with a hint. Checks are small
functions returning findings; nothing here changes the host."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance import acme, appenv, boottime, cert, envfile, nginx, releases, state, tls_store
from appliance import config as config_mod
from appliance.actions.status import CORE_UNITS
from appliance.errors import AipbxError
from appliance.fsutil import lock_held
from appliance.paths import Paths
from appliance.services import Services


@dataclass(frozen=True)
class Finding:
    check: str
    severity: str  # error | warning
    message: str
    hint: str


Check = Callable[[Paths, Services], list[Finding]]


def check_config(paths: Paths, services: Services) -> list[Finding]:
    try:
        config_mod.load(paths.config)
    except AipbxError as e:
        return [
            Finding(
                "config",
                "error",
                e.message.splitlines()[0],
                "run `aipbxctl config check` for every problem",
            )
        ]
    return []


def check_setup(paths: Paths, services: Services) -> list[Finding]:
    if not paths.secrets.exists():
        return [
            Finding(
                "setup",
                "error",
                "the appliance is not set up",
                "run `aipbxctl setup [--domain D --email E]`",
            )
        ]
    return []


def check_units(paths: Paths, services: Services) -> list[Finding]:
    out = []
    for unit in CORE_UNITS:
        s = services.state(unit)
        if unit == "aipbx-pgbouncer.service" and not paths.secrets.exists():
            continue
        if s.active != "active":
            out.append(
                Finding(
                    unit,
                    "error",
                    f"{unit} is {s.active}/{s.sub}",
                    f"`journalctl -u {unit}` says why; `systemctl start {unit}`",
                )
            )
    try:
        st = state.load(paths.state)
    except AipbxError:
        st = state.State()  # check_state reports it
    if st.live_color:
        unit = f"aipbx-backend@{st.live_color}.service"
        if not services.is_active(unit):
            out.append(
                Finding(
                    unit,
                    "error",
                    f"the live color's backend {unit} is not running",
                    f"`aipbxctl logs backend`; `systemctl start {unit}`",
                )
            )
    debian = services.state("pgbouncer.service")
    if debian.active == "active" and paths.secrets.exists():
        out.append(
            Finding(
                "pgbouncer.service",
                "warning",
                "Debian's pgbouncer.service runs beside the appliance's own",
                "`systemctl disable --now pgbouncer.service`",
            )
        )
    return out


def check_state(paths: Paths, services: Services) -> list[Finding]:
    """state.json readable; the colors' links as it says; no rollout left half done."""
    try:
        st = state.load(paths.state)
    except AipbxError as e:
        return [Finding("state", "error", e.message, e.hint or "")]
    out = []
    for color, release in sorted(st.colors.items()):
        link = paths.colors / color
        with contextlib.suppress(OSError):
            have = os.readlink(link)
            if Path(have).name != release:
                out.append(
                    Finding(
                        "state",
                        "error",
                        f"{link} points at {have}, but state.json says {color} runs {release}",
                        "`aipbxctl reconcile` puts the link right",
                    )
                )
    if lock_held(paths.lock):
        return out  # an upgrade, rollback or reconcile runs: what it records is in flux
    phase = st.phase()
    now = boottime.now()
    if phase == "probation" and st.probation and not st.probation.until.same_boot(now):
        p = st.probation
        out.append(
            Finding(
                "rollout",
                "warning",
                f"the probation of {p.release} on {p.color} is over (the machine restarted "
                f"during it; {p.old_color or 'no color'} was not started again)",
                "`aipbxctl reconcile` records its end",
            )
        )
    elif phase == "probation" and st.probation:
        p = st.probation
        old = p.old_color
        if old is None:
            back = "there is no color to switch back to"
        elif services.is_active(f"aipbx-backend@{old}.service"):
            back = f"{old} still runs"
        else:
            back = f"{old} is not running: a failure cannot switch back to it"
        out.append(
            Finding(
                "rollout",
                "error",
                f"the {p.verb} to {p.release} was interrupted during its probation on {p.color} "
                f"({p.until.left(now):.0f}s left); {back}",
                "`aipbxctl reconcile` resumes it: the probation, then the drain",
            )
        )
    elif phase == "starting":
        out.append(
            Finding(
                "rollout",
                "warning",
                f"an upgrade to {st.upgrading} was interrupted before its switch",
                "`aipbxctl reconcile` stops the color it started",
            )
        )
    elif phase == "draining" and st.draining and not st.draining.until.same_boot(now):
        out.append(
            Finding(
                "rollout",
                "warning",
                f"the drain of {st.draining.color} is over (the machine restarted)",
                "`aipbxctl reconcile` records its end",
            )
        )
    return out


def check_nginx(paths: Paths, services: Services) -> list[Finding]:
    try:
        nginx.nginx_test()
    except AipbxError as e:
        return [
            Finding(
                "nginx", "error", e.message, "fix the file nginx names, then " "`aipbxctl setup`"
            )
        ]
    if paths.nginx_default_site.is_symlink():
        return [
            Finding(
                "nginx",
                "warning",
                "nginx's default site is enabled and may answer " "instead of the appliance",
                "run `aipbxctl setup`",
            )
        ]
    return []


def check_disk(paths: Paths, services: Services) -> list[Finding]:
    out = []
    for where in (paths.var, paths.opt, paths.backups):
        if not where.exists():
            continue
        du = shutil.disk_usage(where)
        free = du.free / du.total
        if free < 0.10:
            out.append(
                Finding(
                    "disk",
                    "error" if free < 0.05 else "warning",
                    f"{where}: {free:.0%} free ({du.free >> 20} MiB)",
                    "remove old releases/backups or grow the disk",
                )
            )
    return out


def check_certificate(paths: Paths, services: Services) -> list[Finding]:
    try:
        cfg = config_mod.load(paths.config)
    except AipbxError:
        return []
    served = tls_store.served_chain(paths)
    if not served.exists():
        return [
            Finding(
                "certificate",
                "error",
                f"{served} is missing: nginx has no certificate to serve",
                "`aipbxctl setup` puts the configured (or a self-signed) certificate there",
            )
        ]
    out = []
    days = cert.info(served).days_left()
    if days <= 14:
        out.append(
            Finding(
                "certificate",
                "error" if days <= 3 else "warning",
                f"{served} expires in {days} days",
                "`aipbxctl cert issue` or check certbot.timer",
            )
        )
    source = nginx.tls_files(cfg, paths).cert
    with contextlib.suppress(OSError):
        if source.read_bytes() != served.read_bytes():
            out.append(
                Finding(
                    "certificate",
                    "warning",
                    f"nginx serves {served}, not the configured {source}",
                    "`aipbxctl setup` serves it",
                )
            )
    return out


def check_renewal(paths: Paths, services: Services) -> list[Finding]:
    problem = acme.renewal_problem(
        acme.load_status(acme.status_path(paths)), acme.certbot_unit_run()
    )
    if problem:
        return [
            Finding(
                "certificate renewal",
                "warning",
                problem,
                "the old certificate still serves; `aipbxctl cert status`, then fix "
                "and `systemctl start certbot.service`",
            )
        ]
    return []


def _env_file_findings(path: Path, text: str) -> list[Finding]:
    out = []
    parsed = envfile.parse(text)
    for e in parsed.invalid():
        out.append(
            Finding(
                "backend.env",
                "warning",
                f"{path}:{e.line}: {e.key!r} is not a variable name: the backend ignores it",
                "KEY=VALUE with a name of letters, digits and '_'",
            )
        )
    owned = sorted({e.key for e in parsed.entries if appenv.is_owned(e.key)})
    if owned:
        out.append(
            Finding(
                "backend.env",
                "warning",
                f"{path} sets {', '.join(owned)}, which the appliance sets: ignored",
                f"`aipbxctl env unset {' '.join(owned)}`; {appenv.OWNED[owned[0]]}",
            )
        )
    for c in parsed.comments:
        if c.text.endswith("\\"):
            out.append(
                Finding(
                    "backend.env",
                    "warning",
                    f"{path}:{c.line}: a comment ending in '\\' makes systemd 252 read the "
                    "next line as a comment too",
                    "remove the trailing backslash",
                )
            )
    return out


def check_app_env(paths: Paths, services: Services) -> list[Finding]:
    """backend.env: there, 0640 root:_aipbx, readable; and every variable the live release
    (and a release a color is starting) requires is set."""
    path = paths.backend_env
    problem = appenv.ownership_problem(path)
    out = []
    if problem:
        exposed = path.exists() and path.lstat().st_mode & 0o007
        out.append(
            Finding(
                "backend.env",
                "error" if exposed else "warning",
                f"{problem}: the app's environment (`aipbxctl env`)",
                "`aipbxctl setup` creates it or puts its mode and owner right",
            )
        )
    try:
        text = appenv.read_text(path)
        files = appenv.files_from(text, appenv.read_text(paths.secrets))
    except AipbxError as e:
        return [*out, Finding("backend.env", "error", e.message, e.hint or "")]
    out += _env_file_findings(path, text)
    try:
        st = state.load(paths.state)
    except AipbxError:
        return out
    wanted = {r: "live" for r in [st.live_release()] if r}
    if st.upgrading and st.upgrading not in wanted:
        wanted[st.upgrading] = "starting"
    for dirname, role in wanted.items():
        try:
            m = releases.get(paths, dirname).manifest
        except AipbxError:
            continue
        missing = appenv.missing_required(files, m)
        if missing:
            example = " ".join(f"{k}=..." for k in missing)
            out.append(
                Finding(
                    "backend.env",
                    "error",
                    f"the {role} release {dirname} requires {', '.join(missing)}, missing or "
                    f"empty in {path}",
                    f"`aipbxctl env set {example}`",
                )
            )
    return out


CHECKS: tuple[Check, ...] = (
    check_config,
    check_setup,
    check_state,
    check_units,
    check_nginx,
    check_disk,
    check_certificate,
    check_renewal,
    check_app_env,
)


def diagnose(paths: Paths, services: Services) -> list[Finding]:
    """Every check's findings. A check that cannot run (a file it needs is unreadable) is a
    finding itself: doctor reports, it does not stop at the first problem."""
    findings: list[Finding] = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            findings.extend(check(paths, services))
        except AipbxError as e:
            findings.append(Finding(name, "error", e.message, e.hint or ""))
        except OSError as e:
            findings.append(Finding(name, "error", f"{e.filename or name}: {e.strerror or e}", ""))
    return findings
