"""Certificates with certbot (appliance.acme, appliance.actions.cert_cmd): the argv, the
reason read from certbot's output and log, systemd's view of certbot.service, the renewal
record and how it is judged, the webroot probe against a real HTTP server on loopback, and
the refusal of bad input before certbot could run."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import acme, config
from appliance.__main__ import main
from appliance.actions import cert_cmd
from appliance.errors import AipbxError, ConfigError
from appliance.paths import Paths
from appliance.services import UnitState
from appliance.watchdog.checks import CERT_RENEWAL, Checks, Targets
from appliance.watchdog.model import Status
from appliance.watchdog.settings import Settings

URL = "https://localhost:14000/dir"

ISSUE_FAILED = """\
Saving debug log to /var/log/letsencrypt/letsencrypt.log
An unexpected error occurred:
requests.exceptions.ConnectionError: HTTPSConnectionPool(host='localhost', port=14000): \
Max retries exceeded with url: /dir
Ask for help or search for solutions at https://community.letsencrypt.org. See the logfile \
/var/log/letsencrypt/letsencrypt.log or re-run Certbot with -v for more details.
"""

LOG = """\
2026-11-23 01:23:47,421:DEBUG:certbot._internal.main:certbot version: 2.1.0
2026-11-23 01:23:48,000:ERROR:certbot._internal.renewal:Failed to renew certificate old.test \
with error: an earlier run
2026-11-23 01:30:24,500:DEBUG:certbot._internal.main:certbot version: 2.1.0
2026-11-23 01:30:24,722:ERROR:certbot._internal.renewal:Failed to renew certificate \
pbx.aipbx.test with error: Requesting localhost/dir: Connection refused
Traceback (most recent call last):
2026-11-23 01:30:24,729:ERROR:certbot._internal.renewal:All renewals failed. The following \
certificates could not be renewed:
2026-11-23 01:30:24,729:ERROR:certbot._internal.renewal:  \
/etc/letsencrypt/live/pbx.aipbx.test/fullchain.pem (failure)
2026-11-23 01:30:24,730:ERROR:certbot._internal.log:1 renew failure(s), 0 parse failure(s)
"""


def test_certbot_argv_names_the_lineage_after_the_domain() -> None:
    argv = acme.certbot_argv("pbx.aipbx.test", "ops@aipbx.test", Path("/var/www/acme"), URL)
    assert argv[:5] == ["certbot", "certonly", "--webroot", "-w", "/var/www/acme"]
    pairs = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert pairs["-d"] == pairs["--cert-name"] == "pbx.aipbx.test"
    assert pairs["-m"] == "ops@aipbx.test"
    assert argv[argv.index("--server") + 1] == URL
    assert {"--agree-tos", "--non-interactive", "--no-eff-email"} <= set(argv)


def test_certbot_error_keeps_the_reason_on_one_line() -> None:
    text = acme.certbot_error(ISSUE_FAILED)
    assert text.startswith("requests.exceptions.ConnectionError: HTTPSConnectionPool")
    assert "\n" not in text and "Saving debug log" not in text and "Ask for help" not in text
    assert "no reason" in acme.certbot_error("Saving debug log to x\n")
    assert len(acme.certbot_error("x" * 1000)) == 400


def test_the_log_of_the_last_run_gives_the_reason() -> None:
    assert acme.last_run_errors(LOG) == [
        "certbot could not renew pbx.aipbx.test: Requesting localhost/dir: Connection refused"
    ]
    other = "2026-11-23 01:00:00,000:DEBUG:x:certbot version: 2.1.0\n"
    other += "2026-11-23 01:00:01,000:ERROR:certbot._internal.main:The lock is held\n"
    assert acme.last_run_errors(other) == ["The lock is held"]
    assert acme.last_run_errors("") == []


def test_unit_and_timer_as_systemd_prints_them() -> None:
    run = acme.parse_unit_show(
        "Result=exit-code\nActiveState=failed\nExecMainStatus=1\n"
        "ExecMainExitTimestamp=@1795397412\nInvocationID=abc\n"
    )
    assert run == acme.UnitRun("exit-code", "failed", 1, 1795397412.0, "abc") and run.failed
    never = acme.parse_unit_show("Result=success\nExecMainExitTimestamp=\nExecMainStatus=0\n")
    assert never.exited_at is None and not never.failed
    timers = '[{"next":1795471085281362,"left":1,"last":0,"unit":"certbot.timer"}]'
    assert acme.parse_list_timers(timers) == (1795471085.281362, None)
    assert acme.parse_list_timers("[]") == (None, None)
    assert acme.parse_list_timers("not json") == (None, None)


def ok(at: float, run: str = "") -> dict[str, object]:
    return {"at": at, "what": "renewed", "invocation": run}


def err(at: float, run: str = "", message: str = "CA unreachable") -> dict[str, object]:
    return {"at": at, "message": message, "invocation": run}


def unit(at: float | None, result: str = "success", run: str = "r9") -> acme.UnitRun:
    return acme.UnitRun(result, "failed" if result != "success" else "inactive", 0, at, run)


def test_renewal_problem_the_newest_record_wins() -> None:
    problem = acme.renewal_problem
    assert problem({}, None) is None
    assert problem({}, unit(None)) is None
    assert problem({"last_ok": ok(10), "last_error": err(20)}, None) == "CA unreachable"
    assert problem({"last_ok": ok(30), "last_error": err(20)}, None) is None
    # certbot.service failed and nothing recorded it (no ExecStopPost): still seen
    failed = problem({"last_ok": ok(10)}, unit(20, "exit-code"))
    assert failed is not None and "certbot.service failed" in failed
    assert "journalctl -u certbot.service" in failed
    # a later good run of the unit clears an older failure
    assert problem({"last_error": err(20)}, unit(30)) is None
    # the recorded reason is newer than the unit's exit (ExecStopPost runs after it)
    assert problem({"last_error": err(21, "r9")}, unit(20, "exit-code")) == "CA unreachable"
    # a run whose deploy hook failed, then certbot exited 0: the failure stays
    same_run = {"last_error": err(20, "r9", "nginx refused it"), "last_ok": ok(5)}
    assert problem(same_run, unit(25, run="r9")) == "nginx refused it"
    assert problem(same_run, unit(25, run="r10")) is None
    # at the same instant a failure is not hidden by a success
    assert problem({"last_ok": ok(20), "last_error": err(20)}, None) == "CA unreachable"


def test_judge_renewal_levels() -> None:
    level, error, _ = acme.judge_renewal({"last_error": err(20)}, None)
    assert level == "warning" and error == "certificate renewal failed: CA unreachable"
    renewed = {"last_ok": ok(30), "last_renewal": {"at": 30, "serial": "AB"}}
    level, error, detail = acme.judge_renewal(renewed, None)
    assert (level, error) == ("ok", "") and "serial AB" in detail
    assert acme.judge_renewal({}, None)[0] == "idle"
    assert acme.judge_renewal({}, unit(40))[0] == "ok"


def test_record_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    acme.record_ok(paths, at=10, what="renewed x", invocation="r1", renewal={"serial": "AB"})
    acme.record_failure(paths, at=20, message="CA unreachable", invocation="r2")
    doc = acme.load_status(acme.status_path(paths))
    assert doc["last_renewal"] == {"at": 10, "serial": "AB"}
    assert doc["last_attempt"] == {"at": 20, "ok": False, "what": "CA unreachable"}
    assert acme.renewal_problem(doc, None) == "CA unreachable"
    assert oct(acme.status_path(paths).stat().st_mode & 0o777) == "0o644"
    acme.status_path(paths).write_text("{torn")
    assert acme.load_status(acme.status_path(paths)) == {}


def test_rendered_site_names_the_served_file(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    site = "server {\n    ssl_certificate     /etc/letsencrypt/live/d.test/fullchain.pem;\n"
    served = acme.served_certificate(site)
    assert served == Path("/etc/letsencrypt/live/d.test/fullchain.pem")
    store = "map $ssl_server_name $aipbx_tls_dir {\n    default /etc/aipbx-tls/key-0123;\n}\n"
    site = store + "server {\n    ssl_certificate     $aipbx_tls_dir/fullchain.pem;\n"
    assert acme.served_certificate(site) == Path("/etc/aipbx-tls/key-0123/fullchain.pem")
    assert acme.served_certificate("server {}") is None
    assert acme.kind_of(paths.selfsigned_cert, paths) == "self-signed"
    assert acme.kind_of(acme.lineage(paths, "d.test") / "fullchain.pem", paths) == "acme"
    assert acme.kind_of(Path("/elsewhere.pem"), paths) == "other"


def test_acme_server_must_be_https() -> None:
    assert config.Config().site.acme_server.startswith("https://")
    cfg = config.parse(f'[site]\nacme_server = "{URL}"\n')
    assert cfg.site.acme_server == URL
    with pytest.raises(ConfigError) as e:
        config.parse('[site]\nacme_server = "http://localhost:14000/dir"\n')
    assert ":2: site.acme_server" in e.value.message and "https://" in e.value.message


@pytest.fixture
def webroot_server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """nginx's part, played by http.server on loopback: serves the webroot."""
    root = tmp_path / "acme"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_probe_webroot_reads_the_file_back_through_http(
    webroot_server: tuple[Path, int], tmp_path: Path
) -> None:
    root, port = webroot_server
    acme.probe_webroot(root, port, "pbx.aipbx.test")
    assert list((root / acme.CHALLENGE_DIR).iterdir()) == []  # the probe is removed
    elsewhere = tmp_path / "not-served"
    with pytest.raises(AipbxError) as e:
        acme.probe_webroot(elsewhere, port, "pbx.aipbx.test")
    assert "HTTP 404" in e.value.message and "does not serve the ACME webroot" in e.value.message


def test_probe_webroot_says_when_nothing_listens(tmp_path: Path) -> None:
    with pytest.raises(AipbxError) as e:
        acme.probe_webroot(tmp_path, 9, "pbx.aipbx.test", timeout=2)  # discard: closed
    assert "ConnectionRefusedError" in e.value.message


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host under tmp_path with the shipped aipbx.toml, and a `certbot` on PATH that
    leaves a mark if anything runs it."""
    conf = tmp_path / "etc/aipbx/aipbx.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text((Path(__file__).parents[2] / "packaging/aipbx.toml").read_text())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "certbot"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/certbot-ran\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("AIPBX_ROOT", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--domain", "bad_domain", "--email", "a@b.test"], "--domain: 'bad_domain' is not a"),
        (["--domain", "10.0.0.1", "--email", "a@b.test"], "is an address, not a domain"),
        (["--domain", "pbx.aipbx.test", "--email", "nope"], "--email: 'nope' is not a valid"),
        (["--domain", "pbx.aipbx.test"], "--email is required"),
        (["--email", "a@b.test"], "--domain is required"),
        (["--domain", " pbx.aipbx.test", "--email", "a@b.test"], "has surrounding spaces"),
        (
            ["--domain", "pbx.aipbx.test", "--email", "a@b.test", "--server", "http://x/dir"],
            "--server: 'http://x/dir' is not an https:// ACME directory URL",
        ),
    ],
)
def test_issue_refuses_bad_input_before_certbot_runs(
    root: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    before = (root / "etc/aipbx/aipbx.toml").read_text()
    assert main(["cert", "issue", *args]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("aipbxctl: ") and message in err_text, err_text
    assert len(err_text.splitlines()) <= 2  # the message, maybe a hint; no traceback
    assert not (root / "certbot-ran").exists()
    assert (root / "etc/aipbx/aipbx.toml").read_text() == before


def test_cli_parses_the_cert_actions() -> None:
    from appliance.cli import parser

    a = parser().parse_args(["cert", "issue", "--domain", "d.test", "--server", URL, "--json"])
    assert (a.cert_command, a.domain, a.email, a.server, a.json) == (
        "issue",
        "d.test",
        None,
        URL,
        True,
    )
    assert parser().parse_args(["cert", "status"]).cert_command == "status"
    assert parser().parse_args(["cert", "deploy-hook"]).cert_command == "deploy-hook"


def test_unit_result_records_the_reason_from_certbots_log(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    paths = Paths(root)
    log_file = acme.certbot_log(paths)
    log_file.parent.mkdir(parents=True)
    log_file.write_text(LOG)
    env = {"SERVICE_RESULT": "exit-code", "EXIT_STATUS": "1", "INVOCATION_ID": "r1"}
    out = cert_cmd.record_unit_result(paths, env)
    assert out["ok"] is False
    assert out["message"] == (
        "certbot.service failed (exit-code, exit status 1): certbot could not renew "
        "pbx.aipbx.test: Requesting localhost/dir: Connection refused"
    )
    doc = acme.load_status(acme.status_path(paths))
    assert acme.renewal_problem(doc, None) == out["message"]
    # a later good run clears it
    assert cert_cmd.record_unit_result(paths, {"SERVICE_RESULT": "success", "INVOCATION_ID": "r2"})
    assert acme.renewal_problem(acme.load_status(acme.status_path(paths)), None) is None


def test_unit_success_does_not_hide_its_own_deploy_hook_failure(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    paths = Paths(root)
    acme.record_failure(paths, at=1, message="nginx refused it", invocation="r1")
    out = cert_cmd.record_unit_result(paths, {"SERVICE_RESULT": "success", "INVOCATION_ID": "r1"})
    assert out == {"ok": False, "message": "nginx refused it"}
    doc = json.loads(acme.status_path(paths).read_text())
    assert "last_ok" not in doc


def test_hooks_refuse_to_run_outside_certbot(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(AipbxError, match="RENEWED_LINEAGE"):
        cert_cmd.deploy_hook(Paths(root), NoServices(), {})  # type: ignore[arg-type]
    with pytest.raises(AipbxError, match="SERVICE_RESULT"):
        cert_cmd.record_unit_result(Paths(root), {})


class NoServices:
    """Services that must not be used."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"services.{name} was used")

    def state(self, unit: str) -> UnitState:
        raise AssertionError("services.state was used")


def test_watchdog_warns_while_renewal_fails(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    asked: list[int] = []

    def ask() -> acme.UnitRun | None:
        asked.append(1)
        return None

    checks = Checks(Settings(), NoServices(), clock=lambda: 0.0)  # type: ignore[arg-type]
    checks.renewals.ask = ask
    t = Targets(
        color=None,
        backend_host="",
        backend_unit="",
        http_port=5005,
        ws_port=3033,
        nginx_port=443,
        postgres_port=5432,
        pgbouncer_port=6432,
        pgbouncer_set_up=False,
        db_user="u",
        db_name="d",
        disk_paths=(),
        cert=None,
        renewal_status=acme.status_path(paths),
    )

    async def scenario() -> None:
        r = await checks.run(CERT_RENEWAL, t)
        assert r.status is Status.IDLE and r.detail == "no renewal has run yet"
        acme.record_failure(paths, at=20, message="CA unreachable", invocation="r1")
        r = await checks.run(CERT_RENEWAL, t)
        assert r.status is Status.WARNING
        assert r.error == "certificate renewal failed: CA unreachable"
        acme.record_ok(paths, at=30, what="renewed", invocation="r2", renewal={"serial": "CD"})
        r = await checks.run(CERT_RENEWAL, t)
        assert r.status is Status.OK and "serial CD" in r.detail
        await asyncio.sleep(0.05)  # let the background ask finish

    asyncio.run(scenario())
    assert asked == [1]  # once per ttl, not every round
