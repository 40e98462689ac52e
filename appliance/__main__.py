"""aipbxctl's entry point: parse, dispatch to an action, turn errors into exit codes with
one line and a hint, never a traceback for an expected failure."""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance import __version__, appenv, netcheck
from appliance import config as config_mod
from appliance import log as logmod
from appliance.actions import (
    cert_cmd,
    db_cmd,
    doctor,
    env_cmd,
    logs,
    migrations_cmd,
    rollout,
    setup,
    status,
)
from appliance.cli import parser
from appliance.errors import AipbxError, ExitCode, NotSetUpError, UsageError
from appliance.oserror import as_error
from appliance.paths import Paths
from appliance.services import SystemdServices

log = logging.getLogger("aipbx.cli")


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _dispatch(args: object, paths: Paths) -> int:
    a = args.__dict__
    cmd = a["command"]
    services = SystemdServices()
    if cmd == "setup":
        report = setup.setup(
            paths,
            services,
            domain=a["domain"],
            email=a["email"],
            public_ip=a["public_ip"],
            version=__version__,
        )
        if a["json"]:
            _print_json({"changed": bool(report.changes), "changes": report.changes})
        elif report.changes:
            print("\n".join(f"changed: {c}" for c in report.changes))
        else:
            print("setup: nothing to change, the appliance is already set up")
        return ExitCode.OK
    if cmd == "install-defaults":
        report = setup.install_defaults(paths, services)
        print("\n".join(report.changes) or "install-defaults: nothing to change")
        return ExitCode.OK
    if cmd == "config":
        target = Path(a["file"]) if a["file"] else paths.config
        config_mod.check_host(config_mod.load(target), target, netcheck.host_routes())
        print(f"{target}: ok")
        return ExitCode.OK
    if cmd == "status":
        data = status.collect(paths, services)
        _print_json(data) if a["json"] else print(status.format_text(data))
        return ExitCode.OK
    if cmd == "logs":
        argv = logs.journalctl_argv(a["service"], a["follow"], a["lines"])
        os.execvp(argv[0], argv)
    if cmd == "env":
        if a["env_command"] == "list":
            data = env_cmd.list_env(paths)
            _print_json(data) if a["json"] else print(env_cmd.format_list(data))
        else:
            if a["env_command"] == "set":
                given = json.loads(os.environ.pop(appenv.VALUES_VAR, "{}"))
                a["assignments"] = appenv.fill_values(a["assignments"], given, _read_value)
            done = env_cmd.change(paths, services, a)
            verb = a["env_command"]
            _print_json(done) if a["json"] else print(env_cmd.format_change(done, verb))
        return ExitCode.OK
    if cmd in ("upgrade", "rollback", "restart"):
        result = rollout.run_rollout(paths, services, a, cmd)
        if a["json"]:
            _print_json(result)
        else:
            keys = ("release", "color", "switch_ms", "rollback_ms", "upgrade_s")
            print(" ".join(f"{k}={result[k]}" for k in keys if k in result))
        return ExitCode.OK
    if cmd == "release":
        print(rollout.release_pack(a))
        return ExitCode.OK
    if cmd == "releases":
        data = rollout.list_releases(paths)
        _print_json(data) if a["json"] else print(rollout.format_releases(data))
        return ExitCode.OK
    if cmd == "reconcile":
        print("\n".join(rollout.run_reconcile(paths, services)) or "reconcile: all in line")
        return ExitCode.OK
    if cmd == "backup":
        done = db_cmd.run_backup(paths, a)
        _print_json(done) if a["json"] else print(db_cmd.format_backup(done))
        return ExitCode.OK
    if cmd == "backups":
        data = db_cmd.list_backups(paths)
        _print_json(data) if a["json"] else print(db_cmd.format_backups(data))
        return ExitCode.OK
    if cmd == "restore":
        result = db_cmd.run_restore(paths, services, a)
        _print_json(result) if a["json"] else print(db_cmd.format_restore(result))
        return ExitCode.OK
    if cmd == "cert":
        return _cert(a, paths, services)
    if cmd == "migrations":
        if a["migrations_command"] == "mark":
            done = migrations_cmd.run_mark(paths, a)
            _print_json(done) if a["json"] else print(migrations_cmd.format_mark(done))
        else:
            data = migrations_cmd.run_list(paths, a)
            _print_json(data) if a["json"] else print(migrations_cmd.format_list(data))
        return ExitCode.OK
    if cmd == "doctor":
        findings = doctor.diagnose(paths, services)
        if a["json"]:
            _print_json({"ok": not findings, "findings": [asdict(f) for f in findings]})
        elif not findings:
            print("doctor: no problems found")
        else:
            for f in findings:
                print(f"{f.severity}: {f.check}: {f.message}\n  hint: {f.hint}")
        return ExitCode.UNHEALTHY if findings else ExitCode.OK
    raise AipbxError(f"unknown command {cmd}")


def _cert(a: dict[str, Any], paths: Paths, services: SystemdServices) -> int:
    action = a["cert_command"]
    if action == "issue":
        done = cert_cmd.issue(
            paths, services, domain=a["domain"], email=a["email"], server=a["server"]
        )
        _print_json(done) if a["json"] else print(cert_cmd.format_issue(done))
    elif action == "status":
        data = cert_cmd.status(paths)
        _print_json(data) if a["json"] else print(cert_cmd.format_status(data))
    elif action == "deploy-hook":  # what it did goes to the journal
        cert_cmd.deploy_hook(paths, services, os.environ)
    elif action == "record-unit-result":
        cert_cmd.record_unit_result(paths, os.environ)
    return ExitCode.OK


def _read_value(key: str) -> str:
    """The value of `key` for `env set KEY`: typed at a prompt that does not echo it, or
    one line of stdin."""
    if sys.stdin.isatty():
        return getpass.getpass(f"{key}: ")
    line = sys.stdin.readline()
    if not line:
        raise UsageError(
            f"no value for {key}: stdin ended", hint=f"echo VALUE | aipbxctl env set {key}"
        )
    return line.removesuffix("\n")


def _without_values(argv: Sequence[str], assignments: Sequence[str]) -> None:
    """`env set KEY=VALUE…` run from a shell: exec this command again with the values in
    the environment instead of the command line (appenv.VALUES_VAR). Returns when there is
    nothing to hide."""
    hidden = appenv.hide_values(assignments)
    if hidden is None or appenv.VALUES_VAR in os.environ:
        return
    names, values = hidden
    swap = dict(zip(assignments, names, strict=True))
    args = [swap.get(a, a) for a in argv]
    prefix = sys.orig_argv[: len(sys.orig_argv) - len(argv)]
    env = {**os.environ, appenv.VALUES_VAR: json.dumps(values)}
    os.execve(sys.executable, [*prefix, *args], env)


# What needs `setup` done first (the database role, its password in secrets.env, PgBouncer):
# exit 4 before anything is touched.
NEEDS_SETUP = frozenset({"upgrade", "rollback", "restart", "backup", "restore", "migrations"})


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is None and args.command == "env" and args.env_command == "set":
        _without_values(sys.argv[1:], args.assignments)
    logmod.setup(verbose=args.verbose)
    paths = Paths(Path(os.environ.get("AIPBX_ROOT", "/")))
    try:
        needs_root = args.command in (
            "setup",
            "install-defaults",
            "upgrade",
            "rollback",
            "reconcile",
            "restore",
            "restart",
            "env",  # backend.env is 0640 root:_aipbx
            "migrations",  # the app role's password (secrets.env) and the mutation lock
        )
        if needs_root and os.geteuid() != 0:
            raise UsageError(
                f"`aipbxctl {args.command}` must run as root", hint=f"sudo aipbxctl {args.command}"
            )
        if args.command in NEEDS_SETUP and not paths.secrets.exists():
            raise NotSetUpError(
                f"`aipbxctl {args.command}`: the appliance is not set up ({paths.secrets} is "
                "missing)",
                hint="run `aipbxctl setup [--domain D --email E]` first",
            )
        return int(_dispatch(args, paths))
    except AipbxError as e:
        for line in e.message.splitlines():
            print(f"aipbxctl: {line}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        log.debug("failed: %s", e.message, exc_info=args.verbose)
        return int(e.exit_code)
    except OSError as e:  # a full disk, a read-only file system: one line, not a traceback
        err = as_error(e)
        print(f"aipbxctl: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        # the journal's copy (stderr has it already): a full disk leaves a trace there
        log.info("failed: %s", err.message, exc_info=args.verbose)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("aipbxctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
