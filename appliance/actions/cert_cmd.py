"""`aipbxctl cert issue|status`, and what certbot runs: the deploy hook after a renewal and
certbot.service's ExecStopPost after every run (see appliance.acme for the record)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from appliance import acme, cert, conffile, nginx, tls_store, validate
from appliance import config as config_mod
from appliance.actions.setup import ensure_nginx
from appliance.errors import AipbxError, CommandError, NginxConfigError, UsageError
from appliance.fsutil import locked, write_if_changed
from appliance.log import audit
from appliance.paths import Paths
from appliance.run import run
from appliance.services import Services

log = logging.getLogger("aipbx.cert")
NGINX_UNIT = "nginx.service"


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(
            f"`aipbxctl cert {what}` must run as root", hint=f"sudo aipbxctl cert {what}"
        )


def _arg(flag: str, given: str | None, configured: str, check: Callable[[str], str]) -> str:
    value = given if given is not None else configured
    if value.strip() != value:
        raise UsageError(f"{flag} {value!r} has surrounding spaces")
    if not value:
        raise UsageError(f"{flag} is required (or set it in [site] of aipbx.toml)")
    try:
        return check(value)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _facts(path: Path) -> dict[str, Any]:
    info = cert.info(path)
    return {
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "not_after": info.not_after,
        "days_left": info.days_left(),
    }


def issue(
    paths: Paths, services: Services, *, domain: str | None, email: str | None, server: str | None
) -> dict[str, Any]:
    """Everything is validated before certbot runs; nginx switches only after nginx -t."""
    cfg = config_mod.load(paths.config)
    name = _arg("--domain", domain, cfg.site.domain, validate.domain)
    mail = _arg("--email", email, cfg.site.email, validate.email)
    url = _arg("--server", server, cfg.site.acme_server, acme.acme_url)
    _need_root("issue")
    keys = {"domain": name, "email": mail} | ({"acme_server": url} if server is not None else {})
    old_text = config_mod.read_text(paths.config)
    new_text = conffile.set_keys(old_text, "site", keys)
    new_cfg = config_mod.parse(new_text, f"{paths.config} (with the command-line options)")
    live = acme.lineage(paths, name)
    started = time.monotonic()
    with locked(paths.lock, "change"):
        before = cert.info(live / "cert.pem").serial if (live / "cert.pem").exists() else None
        acme.probe_webroot(paths.acme_webroot, new_cfg.nginx.http_port, name)
        try:
            run(acme.certbot_argv(name, mail, paths.acme_webroot, url), timeout=900)
        except CommandError as e:
            audit("cert issue", "failed", domain=name, server=url)
            raise AipbxError(
                f"certbot could not get a certificate for {name} from {url}: "
                f"{acme.certbot_error(e.stderr)}",
                hint="nothing was changed; nginx serves the certificate it served before "
                "(details: /var/log/letsencrypt/letsencrypt.log)",
            ) from None
        tls = nginx.tls_files(new_cfg, paths)
        if tls.cert.parent != live:
            raise AipbxError(
                f"certbot succeeded but {live}/fullchain.pem or privkey.pem is missing"
            )
        try:
            changes = ensure_nginx(new_cfg, paths, services)
        except NginxConfigError as e:
            audit("cert issue", "failed", domain=name, error=e.message)
            raise AipbxError(
                f"got a certificate for {name}, but nginx refused it: {e.message}",
                hint="nginx still serves the previous certificate; aipbx.toml is unchanged",
            ) from None
        st = paths.config.stat()
        mode, uid, gid = st.st_mode & 0o777, st.st_uid, st.st_gid
        if write_if_changed(paths.config, new_text, mode=mode, uid=uid, gid=gid):
            changes.append(f"set site.{', site.'.join(keys)} in {paths.config}")
        facts = _facts(tls.cert)
        issued = facts["serial"] != before
        if issued:  # a kept certificate says nothing about renewal working
            renewal = {"lineage": name, **{k: facts[k] for k in ("serial", "not_after", "issuer")}}
            what = f"issued {name} (serial {facts['serial']})"
            acme.record_ok(paths, at=time.time(), what=what, renewal=renewal)
    seconds = round(time.monotonic() - started, 1)
    audit("cert issue", "ok", domain=name, serial=facts["serial"], server=url, seconds=seconds)
    return {
        "domain": name,
        "email": mail,
        "server": url,
        "issued": issued,
        "lineage": str(live),
        "serving": str(tls_store.served_chain(paths)),
        "certificate": facts,
        "changes": changes,
        "seconds": seconds,
    }


def format_issue(d: Mapping[str, Any]) -> str:
    c = d["certificate"]
    verb = "issued a new" if d["issued"] else "kept the existing (not due for renewal)"
    return (
        f"{verb} certificate for {d['domain']} from {d['server']} in {d['seconds']} s\n"
        f"issuer {c['issuer']}, serial {c['serial']}, expires {c['not_after']} "
        f"({c['days_left']} days)\nnginx serves {d['serving']}"
    )


def status(paths: Paths) -> dict[str, Any]:
    _need_root("status")
    cfg = config_mod.load(paths.config)
    expected = nginx.tls_files(cfg, paths).cert
    rendered = paths.nginx_site.read_text() if paths.nginx_site.exists() else ""
    serving = acme.served_certificate(rendered) or tls_store.served_chain(paths)
    source = tls_store.origin(serving.parent)
    doc = acme.load_status(acme.status_path(paths))
    unit = acme.certbot_unit_run()
    timer = acme.certbot_timer()

    def stamped(key: str) -> dict[str, Any] | None:
        v = doc.get(key)
        if not isinstance(v, dict):
            return None
        return {**{k: x for k, x in v.items() if k != "invocation"}, "at": acme.iso(v.get("at"))}

    return {
        "serving": str(serving),
        "source": source.get("cert", str(serving)),
        "kind": source.get("kind") or acme.kind_of(serving, paths),
        "domain": cfg.site.domain,
        "acme_server": cfg.site.acme_server,
        # False when aipbx.toml or certbot changed since the site was rendered: setup fixes it.
        "rendered_as_configured": _same_file(serving, expected),
        "certificate": _facts(serving) if serving.exists() else None,
        "renewal": {
            "problem": acme.renewal_problem(doc, unit),
            "last_renewal": stamped("last_renewal"),
            "last_attempt": stamped("last_attempt"),
            "last_error": stamped("last_error"),
            "timer": None
            if timer is None
            else {
                "active": timer.active,
                "enabled": timer.enabled,
                "next_run": acme.iso(timer.next_run),
                "last_run": acme.iso(timer.last_run),
            },
            "certbot_service": None
            if unit is None
            else {
                "result": unit.result,
                "state": unit.active,
                "exit_status": unit.exit_status,
                "exited_at": acme.iso(unit.exited_at),
            },
        },
    }


def _same_file(served: Path, source: Path) -> bool:
    try:
        return served.read_bytes() == source.read_bytes()
    except OSError:
        return False


def format_status(d: Mapping[str, Any]) -> str:
    c = d["certificate"] or {}
    r = d["renewal"]
    rows = [
        ("serving", f"{d['serving']} ({d['kind']}, from {d['source']})"),
        ("subject", c.get("subject", "(missing)")),
        ("issuer", c.get("issuer", "")),
        ("serial", c.get("serial", "")),
        ("not after", f"{c.get('not_after', '')} ({c.get('days_left', '?')} days left)"),
    ]
    if not d["rendered_as_configured"]:
        rows.append(("note", "the nginx site is not rendered as configured: aipbxctl setup"))
    t = r["timer"]
    rows.append(
        ("timer", f"certbot.timer {t['active']}, next run {t['next_run'] or '-'}" if t else "-")
    )
    last = r["last_renewal"]
    rows.append(("renewed", f"{last['at']} (serial {last.get('serial')})" if last else "-"))
    attempt = r["last_attempt"]
    if attempt:
        rows.append(("last run", f"{attempt['at']}: {'ok' if attempt['ok'] else 'failed'}"))
    rows.append(("renewal", f"FAILING: {r['problem']}" if r["problem"] else "ok"))
    return "\n".join(f"{k:<10} {v}" for k, v in rows)


def _serve_renewed(cfg: config_mod.Config, paths: Paths, services: Services, live: Path) -> str:
    """Serve a renewed lineage; returns how. The same key: fullchain.pem is renamed over in
    the key's directory and served from the next handshake, which is checked on loopback
    (if nginx does not present it, the previous chain is put back). A new key: the site is
    rendered with a new directory and nginx reloaded, after `nginx -t`."""
    if live.name != cfg.site.domain:
        return f"not served: the site's domain is {cfg.site.domain or '(none)'}"
    before = tls_store.current(paths)
    old_chain = (before / tls_store.CHAIN).read_bytes() if before else b""
    placed = tls_store.place(paths, live / "fullchain.pem", live / "privkey.pem", kind="acme")
    if placed.dir != before:
        with locked(paths.lock, "change", wait=600):
            ensure_nginx(cfg, paths, services)
        return "new key: nginx reloaded"
    if not placed.chain_changed:
        return "already served"
    if not services.is_active(NGINX_UNIT):
        return "nginx is not running: served when it starts"
    new_chain = (placed.dir / tls_store.CHAIN).read_bytes()
    if not tls_store.wait_served(cfg.nginx.https_port, cfg.site.domain, new_chain):
        tls_store.restore_chain(placed.dir, old_chain)
        raise AipbxError(
            f"nginx did not present the renewed certificate on port {cfg.nginx.https_port} "
            "within 10 s; the previous one was put back",
            hint="see `journalctl -u nginx`; `aipbxctl setup` serves it again",
        )
    return "served from the next handshake, no reload"


def deploy_hook(paths: Paths, services: Services, env: Mapping[str, str]) -> dict[str, Any]:
    """certbot saved a renewed certificate (RENEWED_LINEAGE): serve it (see _serve_renewed)
    and record the outcome. If it cannot be served, nginx keeps serving the previous
    certificate and the failure is recorded for `cert status`, doctor and the watchdog."""
    _need_root("deploy-hook")
    live = env.get("RENEWED_LINEAGE", "")
    if not live:
        raise UsageError("the deploy hook is run by certbot (RENEWED_LINEAGE is not set)")
    name, run_id, now = Path(live).name, env.get("INVOCATION_ID", ""), time.time()
    try:
        cfg = config_mod.load(paths.config)
        how = _serve_renewed(cfg, paths, services, Path(live))
    except AipbxError as e:
        message = (
            f"{name} was renewed but nginx did not take it ({e.message}); "
            "nginx keeps serving the previous certificate"
        )
        acme.record_failure(paths, at=now, message=message, invocation=run_id)
        log.error("%s", message, extra={"fields": {"action": "cert_renew", "outcome": "failed"}})
        raise AipbxError(message, hint=e.hint) from None
    facts = acme.cert_facts(Path(live) / "cert.pem")
    what = f"renewed {name} (serial {facts['serial']})"
    reloaded = how.startswith("new key")
    renewal = {"lineage": name, **facts, "served": how, "nginx_reloaded": reloaded}
    acme.record_ok(paths, at=now, what=what, invocation=run_id, renewal=renewal)
    fields = {"action": "cert_renew", "outcome": "ok", "serial": facts["serial"]}
    log.info("%s: %s", what, how, extra={"fields": fields})
    return {"lineage": name, "served": how, "nginx_reloaded": reloaded, **facts}


def record_unit_result(paths: Paths, env: Mapping[str, str]) -> dict[str, Any]:
    """certbot.service's ExecStopPost: record how the run ended (systemd says), with the
    reason certbot logged when it failed."""
    _need_root("record-unit-result")
    result, exit_status = env.get("SERVICE_RESULT", ""), env.get("EXIT_STATUS", "")
    if not result:
        raise UsageError("run by certbot.service's ExecStopPost (SERVICE_RESULT is not set)")
    run_id, now = env.get("INVOCATION_ID", ""), time.time()
    if result == "success":
        err = acme.load_status(acme.status_path(paths)).get("last_error") or {}
        if run_id and err.get("invocation") == run_id:
            return {"ok": False, "message": err.get("message")}  # its deploy hook failed
        acme.record_ok(
            paths, at=now, what="certbot.service run ok", invocation=run_id, renewal=None
        )
        return {"ok": True}
    errors = acme.last_run_errors(acme.read_log_tail(acme.certbot_log(paths)))
    message = acme.unit_failure_message(result, exit_status, errors)
    acme.record_failure(paths, at=now, message=message, invocation=run_id)
    fields = {"action": "cert_renew", "outcome": "failed", "unit": acme.CERTBOT_UNIT}
    log.error("certificate renewal failed: %s", message, extra={"fields": fields})
    return {"ok": False, "message": message}
