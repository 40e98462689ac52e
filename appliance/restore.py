"""`aipbxctl restore FILE` and the database side of `--restore-db` (DESIGN decision 8):
put a backup back into the appliance's database, in one transaction.

The file is checked before anything is touched (its sidecar's size and sha256, pg_restore
--list and a full read of every block). Then: nginx answers /api/ and the WebSocket routes
with a maintenance 503 (Retry-After; the site is tested with nginx -t first), the watchdog
is stopped (it would restart what the restore stops), the live backend color and PgBouncer
are stopped (so no pooled server connection holds a lock), the database as it is now is
backed up (pre-restore), and the backup is restored as postgres through the local socket:

    BEGIN; DROP OWNED BY <app role>; <pg_restore --clean --if-exists script>; COMMIT;

so objects created after the backup go too (a table a failed migration left), and a failure
anywhere rolls everything back. COMMIT is sent only when pg_restore itself succeeded.
Then PgBouncer and the live color come back (health-gated), maintenance ends, the watchdog
starts, and the row count of every table is reported."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import backup, health, nginx, pgtools, releases, safefs, state
from appliance.colors import Color, color_net
from appliance.config import Config
from appliance.errors import AipbxError, UsageError
from appliance.paths import Paths
from appliance.run import PipelineError, run_pipe
from appliance.services import Services, systemd_is_running

log = logging.getLogger("aipbx.restore")

WATCHDOG_UNIT = "aipbx-watchdog.service"
PGBOUNCER_UNIT = "aipbx-pgbouncer.service"


class RestoreFailed(AipbxError):
    """The restore did not commit: the database is as it was before."""


def backend_unit(color: Color) -> str:
    return f"aipbx-backend@{color}.service"


@dataclass
class Steps:
    """What happened, step by step (same shape as the upgrade's steps)."""

    out: Callable[[str], None] = print
    t0: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def step(self, step: str, detail: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.steps.append(
            {"step": step, "elapsed_s": round(elapsed, 3), "detail": detail, "at": time.time()}
        )
        self.out(f"[{elapsed:7.2f}s] {step}: {detail}")
        log.info("%s: %s", step, detail, extra={"fields": {"step": step, "action": "restore"}})


# --- the file ---------------------------------------------------------------------------


def resolve(paths: Paths, cfg: Config, name: str) -> Path:
    """A path as given, or the name of a file in the backup directory."""
    p = Path(name)
    if os.path.lexists(p) or "/" in name:
        return p.absolute()
    candidate = backup.backup_dir(cfg, paths) / name
    return candidate if os.path.lexists(candidate) else p.absolute()


def check(path: Path) -> backup.Verified:
    """Refuse (UsageError, nothing touched) anything but a complete pg_dump -Fc archive: a
    regular file reached through no link another user owns (a fifo, a device, postgres's
    link in the backup directory are refused before anything is read)."""
    if not os.path.lexists(path):
        raise UsageError(
            f"{safefs.shown(path)}: no such file", hint="`aipbxctl backups` lists the backups"
        )
    meta = backup.read_meta(path)
    return backup.verify_file(path, meta=meta)


# --- the database --------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no error output"


def restore_database(cfg: Config, path: Path, *, lock_timeout: str | None = None) -> float:
    """The restore itself, all or nothing; returns its seconds. Raises RestoreFailed."""
    db = cfg.database
    port = str(db.postgres_port)
    t0 = time.monotonic()
    preamble = "SET client_min_messages = warning;\n"
    if lock_timeout:
        preamble += f"SET lock_timeout = '{lock_timeout}';\n"
    preamble += f"BEGIN;\nDROP OWNED BY {db.user};\n"
    dump_argv = pgtools.as_postgres(["pg_restore", "--clean", "--if-exists", "-f", "-"])
    psql_argv = pgtools.as_postgres(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", port, "-d", db.name]
    )
    try:
        # pg_restore reads the file (opened here, as root) and its script goes to psql
        # after the preamble; COMMIT follows only when pg_restore exited 0. Otherwise psql
        # ends at EOF inside the transaction (or stops at an error: ON_ERROR_STOP), and
        # PostgreSQL rolls it back.
        run_pipe(
            dump_argv,
            psql_argv,
            stdin=path,
            head=preamble.encode(),
            tail=b"COMMIT;\n",
            timeout=None,
        )
    except PipelineError as e:
        if e.stage == 0:
            raise RestoreFailed(
                f"pg_restore could not read {path.name}: {_last_line(e.stderr)}; "
                "nothing was committed",
                hint="the database is as it was before; choose another backup",
            ) from e
        raise RestoreFailed(
            f"the restore of {path.name} failed and was rolled back: {_last_line(e.stderr)}",
            hint="the database is as it was before; `aipbxctl logs postgresql`",
        ) from e
    pgtools.psql(cfg, "ANALYZE")
    return time.monotonic() - t0


def terminate_sessions(cfg: Config) -> int:
    """End every other session on the database (an operator's psql, a stray client): the
    restore needs its tables to itself."""
    out = pgtools.psql(
        cfg,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE datname = '{cfg.database.name}' AND pid <> pg_backend_pid()",
        db="postgres",
    )
    return int(out or 0)


# --- maintenance ----------------------------------------------------------------------------


def set_maintenance(paths: Paths, cfg: Config, services: Services, on: bool) -> None:
    """Render the site with (or without) the maintenance answers; nginx -t runs first, so a
    refused site changes nothing."""
    nginx.apply(
        paths,
        services,
        site=nginx.render_site(cfg, paths, ipv6=nginx.ipv6_available(paths), maintenance=on),
        main=nginx.render_main(cfg),
        upstream=nginx.render_upstream(cfg),
        reload=systemd_is_running(),
    )


def start_and_gate(paths: Paths, cfg: Config, services: Services, color: Color) -> str:
    """Start the live color again and wait until it answers (HTTP and WebSocket)."""
    st = state.load(paths.state)
    unit = backend_unit(color)
    services.start(unit)
    rel = releases.get(paths, st.colors[str(color)])
    hc = rel.manifest.health
    net = color_net(cfg.network.subnet, color)
    ok, detail = health.wait_healthy(
        net.ns_addr,
        cfg.backend.http_port,
        cfg.backend.ws_port,
        hc.http_path,
        hc.ws_path,
        float(hc.timeout_s),
        alive=lambda: services.state(unit).active in ("active", "activating"),
    )
    if not ok:
        raise AipbxError(
            f"{color} did not become healthy after the restore: {detail}",
            hint="`aipbxctl logs backend`; the database was restored",
        )
    return detail


# --- the whole procedure ----------------------------------------------------------------------


def run(
    paths: Paths,
    cfg: Config,
    services: Services,
    path: Path,
    *,
    steps: Steps,
    verified: backup.Verified | None = None,
    bring_back: Callable[[], dict[str, Any]] | None = None,
    safety_backup: bool = True,
) -> dict[str, Any]:
    """Restore `path` (the caller holds the mutation lock). `bring_back` replaces "start
    the live color again" (rollback --restore-db switches to the previous release there)."""
    if verified is None:
        verified = check(path)
        steps.step(
            "verify",
            f"{path.name}: {backup.human_bytes(verified.bytes)}, "
            f"{verified.tables} tables, every block readable",
        )
    st = state.load(paths.state)
    live = st.live_color
    directory = backup.backup_dir(cfg, paths)
    backup.ensure_dir(directory)
    result: dict[str, Any] = {"file": str(path), "database": cfg.database.name}
    errors: list[str] = []
    watchdog_was = services.is_active(WATCHDOG_UNIT)
    pgbouncer_was = services.is_active(PGBOUNCER_UNIT)
    live_was = live is not None and services.is_active(backend_unit(live))
    with backup.dir_lock(directory, wait=600):
        set_maintenance(paths, cfg, services, True)
        t_maint = time.monotonic()
        steps.step("maintenance", "nginx answers /api/ with 503 and Retry-After")
        try:
            if watchdog_was:
                services.stop(WATCHDOG_UNIT)
            if live and live_was:
                services.stop(backend_unit(live))
            if pgbouncer_was:
                services.stop(PGBOUNCER_UNIT)
            ended = terminate_sessions(cfg)
            steps.step(
                "stop",
                f"stopped the watchdog, {live or 'no live color'} and PgBouncer"
                + (f"; ended {ended} other session(s)" if ended else ""),
            )
            if safety_backup:
                try:
                    safety = backup.take_locked(
                        paths, cfg, kind=backup.PRE_RESTORE, prune_old=False
                    )
                    result["pre_restore_backup"] = safety["file"]
                    steps.step("pre-restore-backup", f"the database as it was: {safety['file']}")
                except AipbxError as e:
                    result["pre_restore_backup"] = None
                    steps.step("pre-restore-backup", f"FAILED ({e.message}); restoring anyway")
            seconds = restore_database(cfg, path)
            result["restore_s"] = round(seconds, 3)
            steps.step("restore", f"{path.name} restored in {seconds:.1f}s (one transaction)")
            rows = pgtools.table_rows(cfg)
            result["tables"] = rows
            result["rows"] = sum(rows.values())
            steps.step("rows", ", ".join(f"{t}={n}" for t, n in rows.items()) or "no tables")
        finally:
            # Bring back what was stopped, whether the restore committed or not.
            if pgbouncer_was:
                try:
                    services.start(PGBOUNCER_UNIT)
                except AipbxError as e:
                    errors.append(e.message)
            try:
                if bring_back is not None:
                    result.update(bring_back())
                    steps.step("start", "rolled back to the previous release")
                elif live and live_was:
                    detail = start_and_gate(paths, cfg, services, live)
                    steps.step("start", f"{live} is serving again ({detail})")
            except AipbxError as e:
                errors.append(e.message)
            try:
                set_maintenance(paths, cfg, services, False)
                result["maintenance_s"] = round(time.monotonic() - t_maint, 3)
                steps.step("maintenance", f"ended after {result['maintenance_s']:.1f}s")
            except AipbxError as e:
                errors.append(f"{e.message} (maintenance is still on: run `aipbxctl setup`)")
            if watchdog_was:
                try:
                    services.start(WATCHDOG_UNIT)
                except AipbxError as e:
                    errors.append(e.message)
    if errors:
        raise AipbxError(
            "the database was restored, but: " + "; ".join(errors),
            hint="`aipbxctl status` and `aipbxctl doctor` show what is still down",
        )
    return result
