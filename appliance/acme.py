"""ACME certificates with Debian's certbot: the argv of an issue, reading certbot's errors,
and the renewal outcome the appliance records and judges.

How a renewal's outcome is known (DESIGN decision 10). certbot.timer runs certbot.service
(`certbot -q renew`) twice a day. Two records, each from the process that knows:
- the deploy hook (/etc/letsencrypt/renewal-hooks/deploy/50-aipbx) runs after certbot saved
  a renewed certificate: it tests nginx, reloads it and records the success, or records
  that nginx refused the new files (then the old certificate keeps serving);
- certbot.service's ExecStopPost= (a drop-in the package ships) runs after every run of
  the unit, whatever happened, with systemd's SERVICE_RESULT and EXIT_STATUS: a failure
  is recorded with the reason certbot logged for that run. certbot runs no hook at all
  when it cannot reach the ACME server, so a hook alone would miss exactly that failure.
Both write /var/lib/aipbx/cert-renewal.json (certbot.service has PrivateTmp=: nothing goes
through /tmp). When reading, certbot.service's own last result (`systemctl show`) counts
too, so a run whose ExecStopPost did not record anything is not missed. The newest of
these says whether renewal is failing; a success never hides a failure of the same run.

A manual `certbot renew` records its successes through the deploy hook; its failures are
printed to the operator who ran it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import cert, safefs
from appliance.errors import AipbxError
from appliance.fsutil import atomic_write, locked
from appliance.paths import Paths
from appliance.run import run

CERTBOT_UNIT = "certbot.service"
CERTBOT_TIMER = "certbot.timer"
CHALLENGE_DIR = ".well-known/acme-challenge"


def letsencrypt(paths: Paths) -> Path:
    return paths.root / "etc/letsencrypt"


def lineage(paths: Paths, name: str) -> Path:
    """certbot's live directory of a certificate (`--cert-name name`)."""
    return letsencrypt(paths) / "live" / name


def status_path(paths: Paths) -> Path:
    return paths.var / "cert-renewal.json"


def certbot_log(paths: Paths) -> Path:
    return paths.root / "var/log/letsencrypt/letsencrypt.log"


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


# --- issuing ---------------------------------------------------------------------------


def acme_url(u: str) -> str:
    """An ACME directory URL: RFC 8555 is spoken over HTTPS only."""
    if not u.startswith("https://") or len(u) == len("https://") or any(c.isspace() for c in u):
        raise ValueError(f"{u!r} is not an https:// ACME directory URL")
    return u


def certbot_argv(domain: str, email: str, webroot: Path, server: str) -> list[str]:
    """certonly through the webroot nginx serves on port 80. The lineage is named after the
    domain, so nginx finds it at live/<domain> (certbot would otherwise pick <domain>-0001
    next to a stale lineage). certbot keeps an existing lineage that is not due yet."""
    return [
        "certbot",
        "certonly",
        "--webroot",
        "-w",
        str(webroot),
        "-d",
        domain,
        "--cert-name",
        domain,
        "-m",
        email,
        "--agree-tos",
        "--no-eff-email",
        "--non-interactive",
        "--server",
        server,
        # Renewals keep the key (reuse_key in the renewal configuration): nginx then serves
        # a renewed certificate from the next handshake, without a reload (tls_store).
        "--reuse-key",
    ]


# certbot's boilerplate around the reason.
_NOISE = (
    "Saving debug log to",
    "Ask for help or search for solutions",
    "An unexpected error occurred:",
    "Some challenges have failed.",
)


def certbot_error(output: str, limit: int = 400) -> str:
    """The reason in certbot's error output, on one line."""
    lines = [ln.strip() for ln in output.splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(_NOISE) and not set(ln) <= {"-", " "}]
    text = "; ".join(kept) or "certbot gave no reason (see /var/log/letsencrypt/letsencrypt.log)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def probe_webroot(webroot: Path, http_port: int, domain: str, timeout: float = 5) -> None:
    """Fetch a file placed in the webroot from nginx on loopback, as the CA will (with the
    domain as Host), before asking the CA: a broken port 80 is reported here and does not
    count against the CA's failed-validation limit. The webroot is root's (nginx's workers
    only read it); even so the probe is written and removed through the fd of the challenge
    directory, reached through no link another user owns (appliance.safefs)."""
    challenges = webroot / CHALLENGE_DIR
    try:
        dfd = safefs.make_dirs(challenges, mode=0o755)
    except safefs.Unsafe as e:
        raise AipbxError(f"the ACME webroot: {e.message}", hint=e.hint) from None
    token = secrets.token_urlsafe(16)
    name = f"aipbx-probe-{token}"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(name, flags, 0o644, dir_fd=dfd), "w") as f:
            f.write(token)
            os.fchmod(f.fileno(), 0o644)
        body, seen = _fetch(f"/{CHALLENGE_DIR}/{name}", http_port, domain, timeout)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        os.close(dfd)
    if body != token:
        raise AipbxError(
            f"nginx does not serve the ACME webroot {webroot} on port {http_port} "
            f"({seen}); the CA could not validate {domain}",
            hint="`aipbxctl setup` renders and reloads the nginx site; "
            "`systemctl status nginx` shows whether it runs",
        )


def _fetch(path: str, http_port: int, domain: str, timeout: float) -> tuple[str, str]:
    """(body, what was seen) of GET path from nginx on loopback with the domain as Host."""
    import http.client  # here: the watchdog imports this module, and never probes

    try:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": domain})
            resp = conn.getresponse()
            return resp.read(1024).decode(errors="replace"), f"HTTP {resp.status}"
        finally:
            conn.close()
    except OSError as e:
        return "", f"{type(e).__name__}: {e.strerror or e}"


# --- certbot.service as systemd saw it ---------------------------------------------------


@dataclass(frozen=True)
class UnitRun:
    """The last run of certbot.service (`systemctl show`)."""

    result: str  # success, exit-code, signal, timeout, ...
    active: str  # inactive, activating, failed
    exit_status: int
    exited_at: float | None  # None: it has not run since boot
    invocation: str

    @property
    def failed(self) -> bool:
        return self.result != "success"


UNIT_PROPS = ("Result", "ActiveState", "ExecMainStatus", "ExecMainExitTimestamp", "InvocationID")


def parse_unit_show(text: str) -> UnitRun:
    """`systemctl show --timestamp=unix` output (timestamps as @epoch)."""
    p = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    stamp = p.get("ExecMainExitTimestamp", "").lstrip("@")
    try:
        exited_at: float | None = float(stamp) if stamp else None
    except ValueError:
        exited_at = None
    status = p.get("ExecMainStatus", "0")
    return UnitRun(
        result=p.get("Result", "success") or "success",
        active=p.get("ActiveState", "unknown"),
        exit_status=int(status) if status.lstrip("-").isdigit() else 0,
        exited_at=exited_at or None,
        invocation=p.get("InvocationID", ""),
    )


def certbot_unit_run() -> UnitRun | None:
    """None when systemd cannot be asked (no systemd, no certbot unit)."""
    argv = ["systemctl", "show", CERTBOT_UNIT, "--timestamp=unix"]
    proc = run([*argv, "--property=" + ",".join((*UNIT_PROPS, "LoadState"))], check=False)
    if proc.returncode != 0 or "LoadState=loaded" not in proc.stdout:
        return None
    return parse_unit_show(proc.stdout)


@dataclass(frozen=True)
class TimerState:
    active: str
    enabled: str
    next_run: float | None
    last_run: float | None


def parse_list_timers(text: str) -> tuple[float | None, float | None]:
    """(next, last) in epoch seconds from `systemctl list-timers -o json` (microseconds)."""
    try:
        rows = json.loads(text or "[]")
    except ValueError:
        return None, None
    if not rows or not isinstance(rows, list):
        return None, None

    def epoch(v: object) -> float | None:
        return v / 1e6 if isinstance(v, int | float) and v > 0 else None

    return epoch(rows[0].get("next")), epoch(rows[0].get("last"))


def certbot_timer() -> TimerState | None:
    show = run(
        ["systemctl", "show", CERTBOT_TIMER, "--property=ActiveState,UnitFileState,LoadState"],
        check=False,
    )
    if show.returncode != 0 or "LoadState=loaded" not in show.stdout:
        return None
    p = dict(line.split("=", 1) for line in show.stdout.splitlines() if "=" in line)
    timers = run(["systemctl", "list-timers", CERTBOT_TIMER, "--all", "-o", "json"], check=False)
    next_run, last_run = parse_list_timers(timers.stdout if timers.returncode == 0 else "")
    return TimerState(p.get("ActiveState", ""), p.get("UnitFileState", ""), next_run, last_run)


# --- the renewal record ------------------------------------------------------------------


def load_status(path: Path) -> dict[str, Any]:
    """The record, or {} when there is none or it cannot be read (a torn or foreign file
    must not stop a check)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def update_status(paths: Paths, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read, change and atomically replace the record, one writer at a time."""
    path = status_path(paths)
    with locked(paths.run / "cert-renewal.lock", "certificate record update", wait=30):
        doc = load_status(path)
        change(doc)
        atomic_write(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", mode=0o644)
    return doc


def record_ok(
    paths: Paths, *, at: float, what: str, invocation: str = "", renewal: Mapping[str, Any] | None
) -> dict[str, Any]:
    def change(doc: dict[str, Any]) -> None:
        doc["last_attempt"] = {"at": at, "ok": True, "what": what}
        doc["last_ok"] = {"at": at, "what": what, "invocation": invocation}
        if renewal is not None:
            doc["last_renewal"] = {"at": at, **renewal}

    return update_status(paths, change)


def record_failure(
    paths: Paths, *, at: float, message: str, invocation: str = ""
) -> dict[str, Any]:
    def change(doc: dict[str, Any]) -> None:
        doc["last_attempt"] = {"at": at, "ok": False, "what": message}
        doc["last_error"] = {"at": at, "message": message, "invocation": invocation}

    return update_status(paths, change)


def cert_facts(path: Path) -> dict[str, Any]:
    info = cert.info(path)
    return {"serial": info.serial, "not_after": info.not_after, "issuer": info.issuer}


# certbot's log line: "2026-11-23 01:30:24,722:ERROR:certbot._internal.renewal:message"
_LOG_ERROR = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+:ERROR:[\w.]+:(?P<msg>.*)$")
_RENEW_FAILED = re.compile(r"^Failed to renew certificate (?P<name>\S+) with error: (?P<why>.*)$")
_RUN_START = "certbot version: "
_SUMMARY = ("All renewals failed", "The following renewals failed", "renew failure(s)")


def last_run_errors(log_text: str) -> list[str]:
    """What certbot's log says went wrong in its last run (Debian's cli.ini sets
    max-log-backups = 0: one log, every run appended, each starting with its version)."""
    lines = log_text.splitlines()
    start = max((i for i, ln in enumerate(lines) if _RUN_START in ln), default=0)
    errors = [m.group("msg").strip() for ln in lines[start:] if (m := _LOG_ERROR.match(ln))]
    renewals = [
        f"certbot could not renew {m.group('name')}: {m.group('why')}"
        for e in errors
        if (m := _RENEW_FAILED.match(e))
    ]
    if renewals:
        return renewals
    return [e for e in errors if e and not e.startswith("/") and not any(s in e for s in _SUMMARY)]


def read_log_tail(path: Path, limit: int = 1 << 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def unit_failure_message(
    result: str, exit_status: str | int, log_errors: list[str], at: float | None = None
) -> str:
    when = f" at {iso(at)}" if at else ""
    what = f"certbot.service failed{when} ({result}, exit status {exit_status})"
    if log_errors:
        return f"{what}: {'; '.join(log_errors[:3])}"
    return f"{what}; see journalctl -u {CERTBOT_UNIT}"


def renewal_problem(status: Mapping[str, Any], unit: UnitRun | None) -> str | None:
    """Why certificate renewal is failing, or None. The newest record wins; a success does
    not hide a failure recorded by the same run of certbot.service (a renewed certificate
    that nginx refused, then certbot exiting 0)."""
    events: list[tuple[float, str | None, str]] = []
    ok, err = status.get("last_ok"), status.get("last_error")
    if isinstance(ok, Mapping) and isinstance(ok.get("at"), int | float):
        events.append((float(ok["at"]), None, str(ok.get("invocation") or "")))
    if isinstance(err, Mapping) and isinstance(err.get("at"), int | float):
        message = str(err.get("message") or "certificate renewal failed")
        events.append((float(err["at"]), message, str(err.get("invocation") or "")))
    if unit is not None and unit.exited_at is not None:
        failed = unit_failure_message(unit.result, unit.exit_status, [], unit.exited_at)
        events.append((unit.exited_at, failed if unit.failed else None, unit.invocation))
    problem: str | None = None
    problem_run = ""
    # At the same instant a failure sorts after a success: it is not hidden.
    for _, seen, run_id in sorted(events, key=lambda e: (e[0], e[1] is not None)):
        if seen is not None:
            problem, problem_run = seen, run_id
        elif not (problem and problem_run and run_id == problem_run):
            problem, problem_run = None, ""
    return problem


def judge_renewal(status: Mapping[str, Any], unit: UnitRun | None) -> tuple[str, str, str]:
    """(level, error, detail) for the watchdog: a failing renewal is a WARNING, since the
    old certificate still serves (its expiry is the `cert` check's to escalate)."""
    problem = renewal_problem(status, unit)
    if problem:
        return "warning", f"certificate renewal failed: {problem}", problem
    renewal = status.get("last_renewal")
    if isinstance(renewal, Mapping) and isinstance(renewal.get("at"), int | float):
        serial = renewal.get("serial", "?")
        return "ok", "", f"last renewed {iso(float(renewal['at']))} (serial {serial})"
    ok = status.get("last_ok")
    if isinstance(ok, Mapping) and isinstance(ok.get("at"), int | float):
        return "ok", "", f"last certbot run ok {iso(float(ok['at']))}"
    if unit is not None and unit.exited_at is not None:
        return "ok", "", f"{CERTBOT_UNIT} last ran ok {iso(unit.exited_at)}"
    return "idle", "", "no renewal has run yet"


def served_certificate(site_conf: str) -> Path | None:
    """The certificate chain the rendered nginx site names: the store directory its
    $aipbx_tls_dir map sets (appliance.tls_store), or a literal ssl_certificate path."""
    m = re.search(r"map \$ssl_server_name \$aipbx_tls_dir \{\s*default\s+(\S+?);", site_conf)
    if m:
        return Path(m.group(1)) / "fullchain.pem"
    m = re.search(r"^\s*ssl_certificate\s+([^$\s]\S*?);", site_conf, re.MULTILINE)
    return Path(m.group(1)) if m else None


def kind_of(path: Path, paths: Paths) -> str:
    if path == paths.selfsigned_cert:
        return "self-signed"
    with contextlib.suppress(ValueError):
        path.relative_to(letsencrypt(paths) / "live")
        return "acme"
    return "other"
