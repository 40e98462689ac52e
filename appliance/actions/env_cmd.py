"""`aipbxctl env list | set | unset`: the app's environment in /etc/aipbx/backend.env
(appliance.appenv). A change is checked in full before anything is written, written
atomically under the mutation lock (comments and the other lines kept), journaled by key
name only, and applied by a blue/green restart of the live release (`aipbxctl restart`'s
path) unless --no-restart or nothing is live."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appliance import appenv, envfile, releases, state
from appliance.actions import rollout
from appliance.errors import AipbxError, UsageError
from appliance.fsutil import locked
from appliance.log import audit
from appliance.paths import Paths
from appliance.release.manifest import Manifest
from appliance.services import Services


def _live_manifest(paths: Paths) -> tuple[str | None, Manifest | None]:
    live = state.load(paths.state).live_release()
    if not live:
        return None, None
    try:
        return live, releases.get(paths, live).manifest
    except AipbxError:
        return live, None


def list_env(paths: Paths) -> dict[str, Any]:
    """What the app gets from the files, secrets masked, and what the live release lacks."""
    text = appenv.read_text(paths.backend_env)
    files = appenv.files_from(text, appenv.read_text(paths.secrets))
    live, m = _live_manifest(paths)
    generated = m.generated_env if m else ()
    rows = [
        {
            "key": k,
            "value": appenv.shown(k, v, generated),
            "secret": appenv.is_secret(k, generated),
            "source": "secrets.env" if k not in files.operator else "backend.env",
        }
        for k, v in sorted(
            {
                **{k: v for k, v in files.setup.items() if k in appenv.FROM_SETUP},
                **files.operator,
            }.items()
        )
    ]
    ignored = sorted(k for k in envfile.parse(text).values() if appenv.is_owned(k))
    return {
        "file": str(paths.backend_env),
        "exists": paths.backend_env.exists(),
        "variables": rows,
        "ignored": ignored,
        "live_release": live,
        "required": list(m.required_env) if m else [],
        "generated": list(generated),
        "missing": appenv.missing_required(files, m) if m else [],
    }


def format_list(data: Mapping[str, Any]) -> str:
    rows = data["variables"]
    width = max([len(r["key"]) for r in rows] + [3])
    lines = [f"{'KEY':{width}}  {'SOURCE':11}  VALUE"]
    lines += [f"{r['key']:{width}}  {r['source']:11}  {r['value']}" for r in rows]
    if not rows:
        lines = [f"{data['file']}: no variables set" + ("" if data["exists"] else " (no file)")]
    if data["ignored"]:
        lines.append(f"ignored (the appliance sets them): {', '.join(data['ignored'])}")
    if data["live_release"]:
        lines.append(
            f"{data['live_release']}: requires {', '.join(data['required']) or 'nothing'}; "
            f"generates {', '.join(data['generated']) or 'nothing'}"
        )
    if data["missing"]:
        lines.append(f"MISSING for {data['live_release']}: {', '.join(data['missing'])}")
    return "\n".join(lines)


def _new_text(text: str, verb: str, args: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Pure: the file after the change, and the keys it changes. UsageError for bad input."""
    if verb == "set":
        values = appenv.parse_assignments(args["assignments"])
        current = envfile.parse(text).values()
        changed = [k for k, v in values.items() if current.get(k) != v]
        return envfile.set_values(text, {k: values[k] for k in changed}), changed
    keys = appenv.parse_keys(args["keys"])
    present = envfile.parse(text).entries
    changed = [k for k in keys if any(e.key == k for e in present)]
    return envfile.unset(text, changed), changed


def change(paths: Paths, services: Services, a: dict[str, Any]) -> dict[str, Any]:
    """`env set` / `env unset`: check, write, apply. Nothing is written on bad input."""
    verb = a["env_command"]
    text = appenv.read_text(paths.backend_env) or appenv.TEMPLATE
    new, changed = _new_text(text, verb, a)
    result: dict[str, Any] = {"ok": True, "file": str(paths.backend_env), "changed": changed}
    if not changed:
        return {**result, "applied": False, "note": "nothing to change"}
    live, m = _live_manifest(paths)
    apply = live is not None and not a["no_restart"]
    if m is not None and apply:
        secrets_text = appenv.read_text(paths.secrets)
        before = appenv.missing_required(appenv.files_from(text, secrets_text), m)
        after = appenv.missing_required(appenv.files_from(new, secrets_text), m)
        lost = [k for k in after if k not in before]
        if lost:
            raise UsageError(
                f"{live} requires {', '.join(lost)}: it would not start without; "
                "nothing was written",
                hint="set a new value instead, or --no-restart to only write the file",
            )
    if apply:
        rollout.confirm(f"{verb} {', '.join(changed)} and restart {live} (blue/green)", a["yes"])
    with locked(paths.lock, "change"):
        # Again under the lock: the file may have changed since it was read.
        text = appenv.read_text(paths.backend_env) or appenv.TEMPLATE
        new, changed = _new_text(text, verb, a)
        appenv.write(paths.backend_env, new)
    audit(f"env {verb}", "ok", keys=",".join(changed), file=paths.backend_env)
    result["changed"] = changed
    if not a["json"]:
        print(_written(verb, changed, paths), flush=True)
    if not apply:
        note = "written; no release is live: the next upgrade starts with it"
        if live is not None:
            note = "written; `aipbxctl restart` applies it"
        return {**result, "applied": False, "note": note}
    try:
        restarted = rollout.run_rollout(paths, services, {**a, "yes": True}, "restart")
    except AipbxError as e:
        e.message = (
            f"{paths.backend_env} was written ({', '.join(changed)}), but applying it failed: "
            f"{e.message}"
        )
        e.hint = f"{e.hint + '; ' if e.hint else ''}then `aipbxctl restart` applies the file"
        raise
    return {**result, "applied": True, "restart": restarted}


def _written(verb: str, changed: list[str], paths: Paths) -> str:
    return f"{'set' if verb == 'set' else 'removed'} {', '.join(changed)} in {paths.backend_env}"


def format_change(done: Mapping[str, Any], verb: str) -> str:
    """The last lines (what was written is printed as it happens)."""
    if not done["changed"]:
        return f"env {verb}: nothing to change in {done['file']}"
    lines = []
    if done["applied"]:
        r = done["restart"]
        keys = ("release", "color", "switch_ms", "upgrade_s")
        lines.append("applied: " + " ".join(f"{k}={r[k]}" for k in keys if k in r))
    else:
        lines.append(done["note"])
    return "\n".join(lines)
