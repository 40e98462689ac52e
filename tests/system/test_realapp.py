"""Issue 10: the real aiPBX backend (NestJS, ../shared/realapp), built with npm and packed with
`aipbxctl release pack` by tests/realapp/ (`make realapp`), run as its operators run it in a
booted Debian 12: its environment set with `aipbxctl env`, deployed, upgraded v1 -> v2 and
rolled back under load (HTTP through nginx, Socket.IO clients over wss://…/socket.io/, RTP
flows), its uploads in the shared static/ dir, its SQL migrations. The tests run in order
on one machine."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.appliance import (
    aipbxctl_json,
    assert_no_failed_units,
    backend_environ,
    install,
    wait_until,
)
from tests.system.machine import Machine
from tests.system.realapp import (
    APP_ENV,
    NotBuilt,
    app_info,
    artifact,
    copy_in,
    curl,
    env_file,
    jwt,
    live_color,
    progress,
    psql,
    start_load,
    state,
    stop_load,
    udp_targets,
    upgrade_in_thread,
    ws_on,
)

pytestmark = pytest.mark.system
# what tests/realapp/pack-backend.sh declares the appliance generates (the JWT secret is
# PRIVATE_KEY; without it the app signs tokens with a hard-coded one)
GENERATED = ("PRIVATE_KEY", "JWT_SECRET", "HELPDESK_ENCRYPTION_KEY", "ENCRYPTION_KEY")


@pytest.fixture(scope="module")
def app() -> dict[str, Any]:
    try:
        return app_info()
    except NotBuilt as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path, app: dict[str, Any]) -> None:
    copy_in(machine, app)
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)


# --- the tests -----------------------------------------------------------------------


def test_a_release_missing_required_variables_is_refused(
    machine: Machine, app: dict[str, Any]
) -> None:
    code, out = aipbxctl_json(machine, "upgrade", artifact(app["v1"]), "--yes", check=False)
    assert code == 2, out
    error = json.dumps(out)
    assert "OPENAI_API_KEY" in error and "STRIPE_SECRET_KEY" in error, error
    assert "env set" in error
    assert live_color(machine) is None
    for color in ("blue", "green"):
        active = machine.run(
            ["systemctl", "is-active", f"aipbx-backend@{color}.service"], check=False
        ).stdout.strip()
        assert active == "inactive", (color, active)


def test_first_deploy_of_the_real_backend(machine: Machine, app: dict[str, Any]) -> None:
    pairs = [f"{k}={v}" for k, v in APP_ENV.items()]
    machine.run(["aipbxctl", "env", "set", *pairs])
    mode = machine.run(["stat", "-c", "%a %U:%G", "/etc/aipbx/backend.env"]).stdout.split()
    assert mode == ["640", "root:_aipbx"], mode
    t0 = time.monotonic()
    _, out = aipbxctl_json(
        machine, "upgrade", artifact(app["v1"]), "--probation", "3", "--drain", "5", "--yes"
    )
    print(f"first deploy of the real backend: {time.monotonic() - t0:.1f} s")
    assert out["ok"] and out["color"] == "blue" and out["release"] == f"aipbx-{app['v1']}"
    # generated once, kept in backend.env, masked in `env list`, never in the journal
    env = env_file(machine)
    for key in GENERATED:
        assert len(env.get(key, "")) >= 32, key
    _, listed = aipbxctl_json(machine, "env", "list")
    shown = json.dumps(listed)
    for key in (*GENERATED, "OPENAI_API_KEY", "STRIPE_SECRET_KEY"):
        assert env[key] not in shown, key
    journal = machine.run(["journalctl", "--no-pager", "-o", "cat"]).stdout
    for key in (*GENERATED, "OPENAI_API_KEY", "STRIPE_SECRET_KEY"):
        assert env[key] not in journal, key
    # the app created its schema (Sequelize sync) through PgBouncer
    tables = int(psql(machine, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))
    assert tables >= 50, tables
    # Nest's log without colour codes
    backend_log = machine.run(
        ["journalctl", "--no-pager", "-o", "cat", "-u", "aipbx-backend@blue.service"]
    ).stdout
    assert "Nest application successfully started" in backend_log, backend_log[-3000:]
    assert "\x1b[" not in backend_log
    # the app answers through nginx: its health route, and a file of its shared static/
    status, _, _ = curl(machine, "/api/")
    assert status == 404  # Nest answers /api/ with 404: < 500 is healthy (its Dockerfile)
    assert_no_failed_units(machine)


def test_static_files_through_nginx(machine: Machine, app: dict[str, Any]) -> None:
    status, headers, body = curl(machine, "/static/invoice-pechat.jpg")
    assert status == 200, (status, headers)
    # the bytes the release ships (tests/realapp/build-backend.sh copies the app's own)
    shipped = machine.path("/var/lib/aipbx/shared/aipbx/static/invoice-pechat.jpg").read_bytes()
    assert body == shipped and body[:3] == b"\xff\xd8\xff"
    assert headers.get("cache-control") == ["max-age=604800", "public"] or headers.get(
        "cache-control"
    ) == ["max-age=604800, public"], headers.get("cache-control")
    # one value of each security header, the appliance's
    for name in (
        "x-frame-options",
        "x-content-type-options",
        "x-xss-protection",
        "referrer-policy",
    ):
        assert len(headers.get(name, [])) == 1, (name, headers.get(name))
    # the self-signed default: no HSTS from nginx, and the app's own (helmet's) is dropped
    assert "strict-transport-security" not in headers
    assert headers["referrer-policy"] == ["strict-origin-when-cross-origin"]
    _, api_headers, _ = curl(machine, "/api/")
    for name in ("x-xss-protection", "referrer-policy"):
        assert len(api_headers.get(name, [])) == 1, (name, api_headers.get(name))
    assert "strict-transport-security" not in api_headers


def test_the_app_writes_an_upload_into_its_shared_dir(machine: Machine) -> None:
    """The app's own upload path (PATCH /api/users/avatar, sharp, /static/<uuid>.jpg) as the
    backend's user, and the file served through nginx."""
    secret = env_file(machine)["PRIVATE_KEY"]
    uid = psql(
        machine,
        'INSERT INTO users (email, password, name, "createdAt", "updatedAt") VALUES '
        "('upload-test@example.invalid', 'x', 'upload test', now(), now()) RETURNING id",
    ).splitlines()[0]
    token = jwt(secret, {"id": int(uid), "roles": [{"value": "USER"}], "iat": int(time.time())})
    machine.path("/root/avatar.jpg").write_bytes(
        machine.path("/var/lib/aipbx/shared/aipbx/static/invoice-pechat.jpg").read_bytes()
    )
    r = machine.run(
        [
            "curl",
            "-sk",
            "--max-time",
            "30",
            "-X",
            "PATCH",
            "-H",
            f"Authorization: Bearer {token}",
            "-F",
            f"id={uid}",
            "-F",
            "image=@/root/avatar.jpg;type=image/jpeg",
            "https://127.0.0.1/api/users/avatar",
        ]
    )
    user = json.loads(r.stdout)
    avatar = str(user.get("avatar") or "")
    assert re.fullmatch(r"[0-9a-f-]{36}\.jpg", avatar), r.stdout[:500]
    stored = machine.path(f"/var/lib/aipbx/shared/aipbx/static/{avatar}")
    assert stored.is_file()
    owner = machine.run(["stat", "-c", "%U", str(f"/var/lib/aipbx/shared/aipbx/static/{avatar}")])
    assert owner.stdout.strip() == "_aipbx"
    status, _, body = curl(machine, f"/static/{avatar}")
    assert status == 200 and body == stored.read_bytes()
    machine.path("/root/avatar-name").write_text(avatar)


INVOICE_JS = """
const { renderInvoicePdfToFile } = require('./dist/accounting/pdf/invoice-pdf');
renderInvoicePdfToFile({
  number: 'T-1', documentDate: '2026-11-29', amountRub: 1500, subject: 'aiPBX test',
  paymentPurpose: 'test invoice',
  payer: { name: 'Test LLC', tin: '7700000000', kpp: '770001001', address: 'Moscow' },
  issuer: { bankBranchName: 'Test bank', bic: '044525000', correspondentAccount: '301',
            inn: '7700000001', kpp: '770001002', settlementAccount: '407',
            recipientShortName: 'aiPBX', supplierLineBold: 'aiPBX LLC' },
}, 'appliance-test-invoice.pdf').then((p) => console.log(p));
"""


def test_the_apps_invoice_pdf_goes_into_its_shared_dir(machine: Machine) -> None:
    """The app's own invoice code (dist/accounting/pdf/invoice-pdf.js) run as the backend
    runs: as _aipbx, from the live release, with its sandbox (read-only system, only the
    shared dirs writable). It writes static/org-documents/, which the release ships empty."""
    color = live_color(machine)
    r = machine.run(
        [
            "systemd-run",
            "--wait",
            "--collect",
            "--pipe",
            "-p",
            "User=_aipbx",
            "-p",
            "Group=_aipbx",
            "-p",
            "ProtectSystem=strict",
            "-p",
            "ReadWritePaths=/var/lib/aipbx/shared",
            "-p",
            "PrivateTmp=yes",
            "-p",
            "UMask=0027",
            "-p",
            f"WorkingDirectory=/opt/aipbx/colors/{color}",
            f"/opt/aipbx/colors/{color}/runtime/bin/node",
            "-e",
            INVOICE_JS,
        ],
        timeout=120,
    )
    assert "org-documents/appliance-test-invoice.pdf" in r.stdout, r.stdout + r.stderr
    pdf = "/var/lib/aipbx/shared/aipbx/static/org-documents/appliance-test-invoice.pdf"
    assert machine.path(pdf).read_bytes()[:5] == b"%PDF-"
    assert machine.run(["stat", "-c", "%U", pdf]).stdout.strip() == "_aipbx"
    status, _, body = curl(machine, "/static/org-documents/appliance-test-invoice.pdf")
    assert status == 200 and body == machine.path(pdf).read_bytes()


def test_upgrade_and_rollback_under_load(machine: Machine, app: dict[str, Any]) -> None:
    drain_s = 25
    start_load(machine, "upgrade", 900)
    assert ws_on(machine, "blue") >= 10
    steady = set(progress(machine)["udp_ports"])
    wait_until(lambda: steady <= set(udp_targets(machine)), 30, "the RTP flows in conntrack")
    assert {udp_targets(machine)[p] for p in steady} == {"blue"}

    t, result = upgrade_in_thread(
        machine,
        "upgrade",
        artifact(app["v2"]),
        "--probation",
        "5",
        "--drain",
        str(drain_s),
    )
    wait_until(lambda: live_color(machine) == "green", 300, "the switch to green")
    switched_at = time.time()
    machine.run(["touch", "/root/load-more"])
    wait_until(lambda: progress(machine).get("late_connected") == 5, 60, "5 late clients")
    # the clients connected before the switch are still on blue, the late ones on green
    assert ws_on(machine, "blue") >= 10
    assert ws_on(machine, "green") >= 5
    targets = udp_targets(machine)
    fresh = set(progress(machine)["udp_ports"]) - steady
    assert {targets.get(p) for p in steady} == {"blue"}, targets
    wait_until(lambda: {udp_targets(machine).get(p) for p in fresh} == {"green"}, 30, "fresh flows")
    t.join(600)
    assert result.get("code") == 0, result
    out = result["out"]
    assert out["release"] == f"aipbx-{app['v2']}" and out["color"] == "green"
    # the release's own public/ files are the live release's
    widget = machine.path("/opt/aipbx/colors/green/public/widget/dist/widget.js").read_text()
    assert f"aipbx test release {app['v2']}" in widget
    # blue was stopped after the drain; its RTP flows were forgotten and now reach green
    assert (
        machine.run(
            ["systemctl", "is-active", "aipbx-backend@blue.service"], check=False
        ).stdout.strip()
        == "inactive"
    )
    wait_until(
        lambda: {udp_targets(machine).get(p) for p in steady} == {"green"},
        30,
        "the old flows on the live color",
    )
    # every client reconnected, to green (the progress file may predate the cut: count
    # nginx's connections to green instead)
    wait_until(lambda: ws_on(machine, "green") >= 15, 60, "15 clients on green")
    assert ws_on(machine, "blue") == 0

    # roll back under the same load (blue is down: started, gated, switched)
    _, rb = aipbxctl_json(machine, "rollback", "--probation", "3", "--drain", "5", "--yes")
    assert rb["release"] == f"aipbx-{app['v1']}" and rb["color"] == "blue"
    widget = machine.path("/opt/aipbx/colors/blue/public/widget/dist/widget.js").read_text()
    assert "aipbx test release" not in widget
    doc = stop_load(machine, "upgrade")
    http = doc["http"]
    print(
        f"real backend under load: {http['sent']} requests, {http['failed']} failed, "
        f"statuses {http['statuses']}, switch {out.get('switch_ms')} ms, "
        f"rollback {rb.get('rollback_ms')} ms"
    )
    assert http["sent"] > 200
    assert http["failed"] == 0, http
    # a client connected before the switch kept its first connection until the drain's end
    drain_end = switched_at + 5 + drain_s
    for c in doc["sio"]:
        if c["late"]:
            continue
        first_disconnect = next((e[0] for e in c["events"] if e[1] == "disconnect"), None)
        assert first_disconnect is None or first_disconnect >= drain_end - 2, c
    # the uploaded image and the invoice survived the upgrade and the rollback
    avatar = machine.path("/root/avatar-name").read_text()
    for path in (f"/static/{avatar}", "/static/org-documents/appliance-test-invoice.pdf"):
        status, _, body = curl(machine, path)
        assert status == 200 and len(body) > 100, path
    assert_no_failed_units(machine)


def test_env_set_applies_without_downtime(machine: Machine) -> None:
    """`aipbxctl env set` under load: a blue/green restart of the live release with the new
    environment, the same zero-failure switch as an upgrade."""
    old = live_color(machine)
    assert old is not None
    new = "green" if old == "blue" else "blue"
    start_load(machine, "envset", 900)
    _, out = aipbxctl_json(
        machine,
        "env",
        "set",
        "AIPBX_TEST_SETTING=applied-once",
        "--probation",
        "3",
        "--drain",
        "10",
        "--yes",
        timeout=900,
    )
    assert out["applied"] is True, out
    assert live_color(machine) == new
    env = backend_environ(machine, new)
    assert env.get("AIPBX_TEST_SETTING") == "applied-once"
    assert env.get("NO_COLOR") == "1" and env.get("DB_PASS")
    # the watchdog's credentials are not the app's
    assert "ALERT_SMTP_PASSWORD" not in env
    doc = stop_load(machine, "envset")
    assert doc["http"]["sent"] > 50
    assert doc["http"]["failed"] == 0, doc["http"]
    journal = machine.run(["journalctl", "--no-pager", "-o", "json"]).stdout
    assert "applied-once" not in journal


def test_doctor_names_a_required_variable_that_is_gone(machine: Machine) -> None:
    """`env unset` refuses to drop what the live release requires, unless told to only write
    the file (--no-restart); then `doctor` reports it (it said "no problems found" while
    the app could not start)."""
    r = machine.run(["aipbxctl", "env", "unset", "STRIPE_SECRET_KEY", "--yes"], check=False)
    assert r.returncode == 2 and "STRIPE_SECRET_KEY" in r.stderr, (r.stdout, r.stderr)
    assert "STRIPE_SECRET_KEY" in env_file(machine)
    machine.run(["aipbxctl", "env", "unset", "STRIPE_SECRET_KEY", "--no-restart", "--yes"])
    code, report = aipbxctl_json(machine, "doctor", check=False)
    assert code == 5, report
    assert "STRIPE_SECRET_KEY" in json.dumps(report["findings"]), report
    value = APP_ENV["STRIPE_SECRET_KEY"]
    machine.run(["aipbxctl", "env", "set", f"STRIPE_SECRET_KEY={value}", "--no-restart", "--yes"])
    code, report = aipbxctl_json(machine, "doctor", check=False)
    assert "STRIPE_SECRET_KEY" not in json.dumps(report.get("findings", [])), report


def test_the_real_apps_sql_migrations(machine: Machine, app: dict[str, Any]) -> None:
    """The real app's 38 dated SQL files on a database its v1 created. The first deploy
    recorded them as baseline (the app created its schema itself). A database that came
    from before the appliance (the app's tables, no tracking table) is refused until the
    operator marks what it has; then the other files run: each applies or is refused with
    its ERROR line and nothing switched, and the operator marks a refused one handled
    (`aipbxctl migrations mark`) and upgrades again."""
    _, listed = aipbxctl_json(machine, "migrations", "list", "--release", f"aipbx-{app['v1']}")
    hows = {f["status"] for f in listed["files"]}
    assert hows == {"baseline"}, listed
    live_before = live_color(machine)
    release_before = state(machine)["colors"][live_before]
    psql(machine, "DROP TABLE aipbx_schema_migrations")
    # a database from before the appliance: nothing runs until the operator says what it has
    r = machine.run(["aipbxctl", "upgrade", artifact(app["v2"]), "--yes"], check=False)
    assert r.returncode == 2 and "no record of its SQL files" in r.stderr, r.stderr
    assert "migrations mark --all" in r.stderr
    assert live_color(machine) == live_before
    assert psql(machine, "SELECT to_regclass('aipbx_schema_migrations') IS NULL") == "t"
    # it has the tables the destructive file recreates: mark that one, run the others
    machine.run(["aipbxctl", "migrations", "mark", "add-dynamic-analytics-fields.sql"])
    refused: dict[str, str] = {}
    for _ in range(40):
        code, out = aipbxctl_json(
            machine,
            "upgrade",
            artifact(app["v2"]),
            "--probation",
            "3",
            "--drain",
            "5",
            "--yes",
            check=False,
        )
        if code == 0:
            break
        assert code == 1, out
        sql = out.get("sql_migrations", {})
        failed = sql.get("failed")
        assert failed and failed.endswith(".sql"), out
        assert f"{failed} failed" in out["error"] and "ERROR:" in out["error"], out["error"]
        # nothing switched
        assert live_color(machine) == live_before
        assert state(machine)["colors"][live_before] == release_before
        refused[failed] = sql.get("error", "")
        applied = set(sql.get("applied", []))
        recorded = psql(
            machine, "SELECT name FROM aipbx_schema_migrations WHERE how = 'applied'"
        ).split()
        assert applied <= set(recorded) and failed not in recorded
        machine.run(["aipbxctl", "migrations", "mark", failed])
    else:
        raise AssertionError(f"v2 never switched; refused so far: {refused}")
    print(f"real SQL migrations refused then marked: {json.dumps(refused, indent=1)}")
    vector = "2026-03-21-knowledge-base-tables.sql"
    assert vector in refused and "vector" in refused[vector], refused
    # every file is now applied or marked, and one more upgrade runs nothing
    _, listed = aipbxctl_json(machine, "migrations", "list", "--release", f"aipbx-{app['v2']}")
    assert {f["status"] for f in listed["files"]} <= {"applied", "marked"}, listed
    marked = {f["name"] for f in listed["files"] if f["status"] == "marked"}
    assert marked == {*refused, "add-dynamic-analytics-fields.sql"}
    owner = psql(
        machine, "SELECT tableowner FROM pg_tables WHERE tablename = 'aipbx_schema_migrations'"
    )
    assert owner == "aipbx_user"
    assert_no_failed_units(machine)
