"""The argument parser of aipbxctl. Keep it, `aipbxctl --help`, man/aipbxctl.8 and the
README in step."""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

from appliance import __version__
from appliance.validate import MAX_DURATION_S

DESCRIPTION = """\
Run and operate the aiPBX appliance: nginx, PostgreSQL, PgBouncer and the backend's
blue/green releases under systemd.

exit codes: 0 ok, 1 an operation failed, 2 bad input (arguments, aipbx.toml),
3 another change holds the lock, 4 not set up yet, 5 doctor found problems"""


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and a hint, exit 2 (not argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("aipbxctl").strip()
        print(f"aipbxctl: {where + ': ' if where else ''}{message}", file=sys.stderr)
        print(f"hint: {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def seconds(text: str) -> float:
    """A duration on the command line: a finite number of seconds, 0 or more, at most a
    year (`--drain inf`, `--probation nan`, `--health-timeout -5` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a finite number, 0 or more")
    if value > MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be at most a year")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be more than 0")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="aipbxctl",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"aipbxctl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show each command run")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("setup", help="set up (or repair) the appliance; safe to run again")
    s.add_argument("--domain", help="public DNS name (saved in aipbx.toml)")
    s.add_argument("--email", help="ACME account email (saved in aipbx.toml)")
    s.add_argument("--public-ip", help="address Asterisk reaches for RTP (saved in aipbx.toml)")
    s.add_argument("--json", action="store_true", help="print what changed as JSON")

    sub.add_parser(
        "install-defaults",
        help="what the package runs at install: self-signed certificate and the nginx site",
    )

    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cc = csub.add_parser("check", help="validate /etc/aipbx/aipbx.toml (exit 2 if invalid)")
    cc.add_argument("file", nargs="?", help="another file to check instead")

    st = sub.add_parser("status", help="each service's state and the live color")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    lg = sub.add_parser("logs", help="the journal of the appliance's services")
    lg.add_argument(
        "service",
        nargs="?",
        default="all",
        help="all (default), backend, watchdog, nginx, postgresql, pgbouncer, aipbxctl",
    )
    lg.add_argument("-f", "--follow", action="store_true", help="follow new entries")
    lg.add_argument("-n", "--lines", type=count, help="show the last N entries")

    r = sub.add_parser("release", help="release artifacts")
    rsub = r.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    rp = rsub.add_parser("pack", help="make NAME-VERSION.tar.gz + .sha256 from a built app dir")
    rp.add_argument("dir", help="the built application directory (packed unmodified)")
    rp.add_argument("--name", help="release name (else from DIR/aipbx-release.toml)")
    rp.add_argument("--version", dest="release_version", help="release version")
    rp.add_argument("--kind", choices=["backend", "frontend"], help="default: backend")
    rp.add_argument(
        "--command",
        dest="release_cmd",
        help='how to start it, e.g. "node dist/main.js" (split like a shell)',
    )
    rp.add_argument("--migrate", help="migration command, run before the new color starts")
    rp.add_argument("--runtime", help="dir inside the release prepended to PATH (e.g. node/bin)")
    rp.add_argument(
        "--shared-dir",
        dest="shared_dirs",
        action="append",
        metavar="DIR",
        help="a dir the app writes at run time, kept across releases (repeat; replaces the "
        "manifest's list; default: static, public)",
    )
    rp.add_argument(
        "--sql-migrations",
        metavar="DIR",
        help="dir inside the release whose *.sql files upgrade runs, each once, in name order "
        "(manifest: [migrations] sql_dir)",
    )
    rp.add_argument(
        "--sql-baseline",
        choices=["empty-database", "never"],
        help="on a database with no tables yet, record the SQL files without running them "
        "(empty-database, the default: the app creates its schema) or run them (never)",
    )
    rp.add_argument(
        "--require-env",
        dest="required_env",
        action="append",
        metavar="KEY",
        help="a variable the release needs in backend.env: upgrade refuses it while it is "
        "missing or empty (repeat; replaces the manifest's required_env)",
    )
    rp.add_argument(
        "--generate-env",
        dest="generated_env",
        action="append",
        metavar="KEY",
        help="a secret the appliance generates once into backend.env before the release "
        "first starts (repeat; replaces the manifest's generated_env)",
    )
    rp.add_argument("-o", "--out", default=".", help="output directory (default: .)")

    rl = sub.add_parser("releases", help="installed releases, which color runs what, which failed")
    rl.add_argument("--json", action="store_true", help="machine-readable output")

    up = sub.add_parser("upgrade", help="blue/green upgrade to a release artifact")
    up.add_argument("artifact", help="NAME-VERSION.tar.gz (with its .sha256 beside it)")
    _rollout_options(up)

    rb = sub.add_parser("rollback", help="switch back to the previous release")
    rb.add_argument("--to", help="an installed version (or release dir name) instead")
    _rollout_options(rb)

    rt = sub.add_parser(
        "restart",
        help="blue/green restart of the live release (e.g. with a new environment): "
        "started on the idle color, health-gated, switched, drained",
    )
    _rollout_options(rt, restore_db=False)

    en = sub.add_parser("env", help="the app's environment, /etc/aipbx/backend.env")
    ensub = en.add_subparsers(dest="env_command", metavar="ACTION", required=True)
    el = ensub.add_parser("list", help="the app's variables (secrets masked) and what is missing")
    el.add_argument("--json", action="store_true", help="machine-readable output")
    es = ensub.add_parser(
        "set",
        help="set variables, then apply them with a blue/green restart of the live release",
    )
    es.add_argument(
        "assignments",
        nargs="+",
        metavar="KEY=VALUE",
        help="a variable and its value; KEY alone reads the value from stdin (or a prompt "
        "that does not echo), so a secret need not be typed on the command line",
    )
    eu = ensub.add_parser(
        "unset", help="remove variables, then apply with a blue/green restart of the live release"
    )
    eu.add_argument("keys", nargs="+", metavar="KEY")
    for ep in (es, eu):
        ep.add_argument(
            "--no-restart",
            action="store_true",
            help="only write the file; the next `aipbxctl restart` or upgrade applies it",
        )
        _rollout_options(ep, restore_db=False)

    sub.add_parser(
        "reconcile",
        help="make the nft switch, the colors' links and the backend units match state.json, "
        "and finish an interrupted rollout (the rest of its probation, then its drain)",
    )

    bk = sub.add_parser(
        "backup", help="back up the database now (pg_dump -Fc, verified, then retention)"
    )
    bk.add_argument("--json", action="store_true", help="machine-readable output")
    # What aipbx-backup.service runs (as postgres), and its privileged ExecStopPost.
    bk.add_argument("--scheduled", action="store_true", help=argparse.SUPPRESS)
    bk.add_argument("--record-unit-result", action="store_true", help=argparse.SUPPRESS)

    bl = sub.add_parser("backups", help="the database backups: size, age, verified")
    bl.add_argument("--json", action="store_true", help="machine-readable output")

    rs = sub.add_parser(
        "restore",
        help="replace the database with a backup (checked first; the API answers 503 meanwhile)",
    )
    rs.add_argument("file", help="a backup file, or its name in the backup directory")
    rs.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rs.add_argument("--json", action="store_true", help="print the steps and row counts as JSON")

    ce = sub.add_parser("cert", help="TLS certificates: issue with certbot (ACME), status")
    cesub = ce.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    ci = cesub.add_parser(
        "issue", help="get a certificate with certbot through nginx's webroot, then serve it"
    )
    ci.add_argument("--domain", help="DNS name (default: [site] domain; saved in aipbx.toml)")
    ci.add_argument("--email", help="ACME account email (default: [site] email; saved)")
    ci.add_argument("--server", help="ACME directory URL (default: [site] acme_server; saved)")
    ci.add_argument("--json", action="store_true", help="machine-readable output")
    cs = cesub.add_parser("status", help="the certificate nginx serves and its renewal")
    cs.add_argument("--json", action="store_true", help="machine-readable output")
    # What certbot runs: the deploy hook after a renewal, certbot.service's ExecStopPost.
    cesub.add_parser("deploy-hook")
    cesub.add_parser("record-unit-result")

    mg = sub.add_parser(
        "migrations", help="a release's SQL files against the database: list, mark handled"
    )
    mgsub = mg.add_subparsers(dest="migrations_command", metavar="ACTION", required=True)
    ml = mgsub.add_parser(
        "list", help="each SQL file: applied, baseline, marked, pending or changed"
    )
    ml.add_argument(
        "--release", help="an installed version or release dir (default: the newest with SQL)"
    )
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    mm = mgsub.add_parser(
        "mark", help="record SQL files as handled by hand (marked), without running them"
    )
    mm.add_argument("files", nargs="*", metavar="FILE", help="a file name of the release's SQL dir")
    mm.add_argument(
        "--all",
        action="store_true",
        help="every file of the release (a database that came from before the appliance and "
        "already has them)",
    )
    mm.add_argument(
        "--release", help="an installed version or release dir (default: the newest with SQL)"
    )
    mm.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("doctor", help="list what is wrong on this host, with a hint each")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _rollout_options(p: argparse.ArgumentParser, *, restore_db: bool = True) -> None:
    p.add_argument(
        "--probation",
        type=seconds,
        metavar="S",
        help="seconds the new color must stay healthy after the switch "
        "(default: [upgrade] probation)",
    )
    p.add_argument(
        "--drain",
        type=seconds,
        metavar="S",
        help="seconds the old color may keep WebSocket connections and calls "
        "(default: [upgrade] drain)",
    )
    p.add_argument(
        "--health-timeout",
        type=positive_seconds,
        metavar="S",
        help="seconds the new color has to become healthy (default: the manifest's)",
    )
    if restore_db:
        _restore_db_option(p)
    p.add_argument(
        "--yes",
        action="store_true",
        help="do not ask for confirmation (a downgrade needs it, or a yes on a terminal)",
    )
    p.add_argument("--json", action="store_true", help="print the steps and figures as JSON")


def _restore_db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--restore-db",
        action="store_true",
        help="also put back the database backed up before the upgrade (upgrade: if it fails "
        "after its migration ran; rollback: the backup taken before the release being left "
        "was installed). Every write since that backup is lost",
    )
