"""The app's environment (issue 10 point 4): backend.env, `aipbxctl env`, masking, the
release's required and generated variables, and one environment for a color and its
migration."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from appliance import appenv, config, envfile, migrate, state, upgrade
from appliance.actions import doctor, env_cmd, rollout
from appliance.cli import parser
from appliance.colors import Color
from appliance.errors import ExitCode, LockedError, UsageError
from appliance.fsutil import locked
from appliance.launcher import backend_env
from appliance.paths import Paths
from appliance.release.manifest import Kind, Manifest, parse_manifest, render_manifest
from appliance.release.pack import pack
from appliance.releases import Installed
from appliance.services import UnitState

CFG = config.parse("")
REAL = Manifest(
    name="aipbx",
    version="2.5.4",
    kind=Kind.BACKEND,
    command=("node", "dist/main.js"),
    required_env=("OPENAI_API_KEY", "STRIPE_SECRET_KEY"),
    generated_env=("JWT_SECRET", "HELPDESK_ENCRYPTION_KEY", "PRIVATE_KEY", "ENCRYPTION_KEY"),
)


class Recorder:
    """Services that records every call and has nothing running."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def state(self, unit: str) -> UnitState:
        return UnitState(unit, "inactive", "dead", "disabled", "", 0)

    def is_active(self, unit: str) -> bool:
        return False

    def start(self, unit: str) -> None:
        self.calls.append(f"start {unit}")

    def stop(self, unit: str) -> None:
        self.calls.append(f"stop {unit}")

    def restart(self, unit: str) -> None:
        self.calls.append(f"restart {unit}")

    def reload(self, unit: str) -> None:
        self.calls.append(f"reload {unit}")

    def enable(self, unit: str, *, now: bool = False) -> None:
        self.calls.append(f"enable {unit}")

    def disable(self, unit: str, *, now: bool = False) -> None:
        self.calls.append(f"disable {unit}")

    def daemon_reload(self) -> None:
        self.calls.append("daemon-reload")

    def reset_failed(self, unit: str) -> None:
        self.calls.append(f"reset-failed {unit}")

    def kill(self, unit: str, signal: str) -> None:
        self.calls.append(f"kill {unit}")


def _paths(tmp_path: Path, backend: str | None = None, secrets: str = "") -> Paths:
    paths = Paths(tmp_path)
    paths.etc.mkdir(parents=True, exist_ok=True)
    paths.config.write_text("")
    if backend is not None:
        paths.backend_env.write_text(backend)
    paths.secrets.write_text(secrets)
    return paths


def _install(paths: Paths, m: Manifest, live: Color | None = Color.BLUE) -> Installed:
    """An installed release (its manifest only), live on `live`."""
    path = paths.releases / m.release_dirname
    path.mkdir(parents=True)
    (path / "aipbx-release.toml").write_text(render_manifest(m))
    if live is not None:
        state.save(paths.state, state.State(live_color=live, colors={str(live): path.name}))
    return Installed(path.name, m, path, 0.0)


def _args(verb: str, *items: str, **kw: Any) -> dict[str, Any]:
    a = {
        "env_command": verb,
        "assignments": list(items),
        "keys": list(items),
        "no_restart": False,
        "probation": None,
        "drain": None,
        "health_timeout": None,
        "yes": True,
        "json": True,
    }
    a.update(kw)
    return a


# --- secrets: which keys, and masking ---------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "OPENAI_API_KEY",
        "STRIPE_SECRET_KEY",
        "PRIVATE_KEY",
        "JWT_SECRET",
        "MAIL_PASS",
        "DB_PASSWORD",
        "TELEGRAM_BOT_TOKEN",
        "GOOGLE_CREDENTIALS",
        "SENTRY_DSN",
        "sbis_pass",
    ],
)
def test_secret_names(key: str) -> None:
    assert appenv.is_secret(key)
    assert appenv.shown(key, "s3cr3t-value") == appenv.MASK


@pytest.mark.parametrize("key", ["API_URL", "CLIENT_URL", "TIMEZONE", "NODE_ENV", "MAIL_HOST"])
def test_plain_names_are_shown(key: str) -> None:
    assert not appenv.is_secret(key)
    assert appenv.shown(key, "https://pbx.example.com") == "https://pbx.example.com"


def test_generated_keys_are_secret_whatever_their_name() -> None:
    assert appenv.shown("SESSION_SEED", "abc", generated=["SESSION_SEED"]) == appenv.MASK


def test_secrets_inside_urls_are_masked() -> None:
    assert appenv.shown("REDIS_URL", "redis://:hunter2@10.0.0.5:6379/0") == (
        "redis://:***@10.0.0.5:6379/0"
    )
    assert appenv.shown("CURRENCY_UPDATE_URL", "https://x/latest.json?app_id=abc123&b=1") == (
        "https://x/latest.json?app_id=***&b=1"
    )
    assert appenv.shown("K", "") == ""


# --- validation of `env set` / `env unset` ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["OPENAI_API_KEY"], "is not KEY=VALUE"),
        (["=x"], "empty variable name"),
        (["1X=a"], "is not a variable name"),
        (["A-B=a"], "is not a variable name"),
        (["A B=a"], "is not a variable name"),
        (["K=a\nb"], "newline"),
        (["K=a\0b"], "NUL"),
        (["K=a", "K=b"], "given twice"),
        (["PORT=8080"], "set by the appliance"),
        (["DB_PASS=x"], "set by the appliance"),
        (["DB_HOST=db"], "set by the appliance"),
        (["UDP_SERVER_PORT=1"], "set by the appliance"),
    ],
)
def test_bad_assignments_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        appenv.parse_assignments(args)
    assert message in e.value.message and e.value.exit_code == ExitCode.USAGE
    assert e.value.hint


def test_owned_keys_name_where_they_are_set() -> None:
    with pytest.raises(UsageError) as e:
        appenv.parse_assignments(["PORT=1"])
    assert e.value.hint is not None and "http_port" in e.value.hint


def test_assignments_keep_equals_and_specials_in_the_value() -> None:
    got = appenv.parse_assignments(["A=x=y", "B=", "C= sp ", "AIPBX_BOTNAME=bot"])
    assert got == {"A": "x=y", "B": "", "C": " sp ", "AIPBX_BOTNAME": "bot"}


def test_unset_takes_names() -> None:
    assert appenv.parse_keys(["A", "B", "A"]) == ["A", "B"]
    with pytest.raises(UsageError):
        appenv.parse_keys(["A=1"])


# --- the file created at install ----------------------------------------------------------


def test_template_lists_seed_003_keys_commented_and_no_owned_key() -> None:
    parsed = envfile.parse(appenv.TEMPLATE)
    assert parsed.entries == ()  # every key is commented out
    for key in ("OPENAI_API_KEY", "STRIPE_SECRET_KEY", "JWT_SECRET", "HELPDESK_ENCRYPTION_KEY"):
        assert re.search(rf"^#{key}=", appenv.TEMPLATE, re.M), key
    for key in ("REDIS_URL", "MAIL_PASS", "TELEGRAM_BOT_TOKEN", "EXTERNAL_HOST", "API_URL"):
        assert key in appenv.TEMPLATE_KEYS
    assert not set(appenv.TEMPLATE_KEYS) & set(appenv.OWNED)
    assert "PORT, UDP_SERVER_PORT, DB_DIALECT, DB_HOST" in appenv.TEMPLATE
    assert not any(c.text.endswith("\\") for c in parsed.comments)


def test_ensure_file_creates_once_and_repairs_mode(tmp_path: Path) -> None:
    path = tmp_path / "backend.env"
    assert appenv.ensure_file(path)
    assert path.read_text() == appenv.TEMPLATE and path.stat().st_mode & 0o777 == 0o640
    path.write_text("OPENAI_API_KEY=mine\n")
    path.chmod(0o644)
    assert appenv.ensure_file(path)  # mode put right, content kept
    assert path.read_text() == "OPENAI_API_KEY=mine\n" and path.stat().st_mode & 0o777 == 0o640
    assert appenv.ensure_file(path) == []


def test_set_into_the_template_lands_under_its_comment() -> None:
    new = envfile.set_values(appenv.TEMPLATE, {"OPENAI_API_KEY": "sk-x"})
    assert "#OPENAI_API_KEY=sk-proj-...\nOPENAI_API_KEY=sk-x\n" in new
    assert envfile.parse(new).values() == {"OPENAI_API_KEY": "sk-x"}


# --- required and generated variables -------------------------------------------------------


def test_missing_required_counts_empty_and_ignores_generated(tmp_path: Path) -> None:
    files = appenv.files_from("OPENAI_API_KEY=x\nSTRIPE_SECRET_KEY=\n", "")
    assert appenv.missing_required(files, REAL) == ["STRIPE_SECRET_KEY"]
    files = appenv.files_from("OPENAI_API_KEY=x\nSTRIPE_SECRET_KEY=y\n", "")
    assert appenv.missing_required(files, REAL) == []


def test_generated_once_taking_setups_values_over(tmp_path: Path) -> None:
    paths = _paths(
        tmp_path,
        backend="# mine\nOPENAI_API_KEY=x\n",
        secrets="DB_PASS=db\nPRIVATE_KEY=from-setup\nENCRYPTION_KEY=" + "a" * 64 + "\n",
    )
    generated, adopted = appenv.generate_missing(paths, REAL)
    assert generated == ["JWT_SECRET", "HELPDESK_ENCRYPTION_KEY"]
    assert adopted == ["PRIVATE_KEY", "ENCRYPTION_KEY"]
    text = paths.backend_env.read_text()
    assert text.startswith("# mine\nOPENAI_API_KEY=x\n")
    values = envfile.parse(text).values()
    assert re.fullmatch(r"[0-9a-f]{64}", values["JWT_SECRET"])
    assert re.fullmatch(r"[0-9a-f]{64}", values["HELPDESK_ENCRYPTION_KEY"])
    assert values["JWT_SECRET"] != values["HELPDESK_ENCRYPTION_KEY"]
    assert values["PRIVATE_KEY"] == "from-setup" and values["ENCRYPTION_KEY"] == "a" * 64
    assert paths.backend_env.stat().st_mode & 0o777 == 0o640
    assert appenv.generate_missing(paths, REAL) == ([], [])  # once
    assert paths.backend_env.read_text() == text


def test_prepare_env_refuses_a_missing_required_variable_and_shows_no_value(
    tmp_path: Path,
) -> None:
    paths = _paths(tmp_path, backend="OPENAI_API_KEY=x\n")
    rel = _install(paths, REAL, live=None)
    out: list[str] = []
    ctx = upgrade.Ctx(paths, CFG, Recorder(), upgrade.Timeline(out=out.append))
    with pytest.raises(UsageError) as e:
        upgrade._prepare_env(ctx, rel)
    assert "STRIPE_SECRET_KEY" in e.value.message and "aipbxctl env set" in e.value.message
    assert "JWT_SECRET" not in paths.backend_env.read_text()  # refused: nothing generated
    paths.backend_env.write_text("OPENAI_API_KEY=x\nSTRIPE_SECRET_KEY=y\n")
    upgrade._prepare_env(ctx, rel)
    values = envfile.parse(paths.backend_env.read_text()).values()
    assert "generated JWT_SECRET, HELPDESK_ENCRYPTION_KEY, PRIVATE_KEY, ENCRYPTION_KEY" in out[-1]
    assert not any(values["JWT_SECRET"] in line for line in out)


def test_upgrade_refuses_before_unpacking_or_starting(tmp_path: Path) -> None:
    paths = _paths(tmp_path, backend="OPENAI_API_KEY=x\n")
    src = tmp_path / "app"
    (src / "dist").mkdir(parents=True)
    (src / "dist" / "main.js").write_text("//")
    artifact = pack(
        src,
        tmp_path / "out",
        name="aipbx",
        version="2.5.4",
        command=["node", "dist/main.js"],
        required_env=["OPENAI_API_KEY", "STRIPE_SECRET_KEY"],
        generated_env=["JWT_SECRET"],
    )
    services = Recorder()
    ctx = upgrade.Ctx(paths, CFG, services, upgrade.Timeline(out=lambda _s: None))
    with pytest.raises(UsageError) as e:
        upgrade.upgrade(ctx, artifact, upgrade.Options(probation_s=0, drain_s=0))
    assert e.value.exit_code == ExitCode.USAGE
    assert "aipbx-2.5.4 requires STRIPE_SECRET_KEY" in e.value.message
    assert e.value.hint == "aipbxctl env set STRIPE_SECRET_KEY=..."
    assert not paths.releases.exists() or not any(paths.releases.iterdir())
    assert services.calls == []
    assert [s["step"] for s in ctx.tl.steps] == ["verify", "env"]


def test_restart_deploys_the_live_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _paths(tmp_path, backend="")
    ctx = upgrade.Ctx(paths, CFG, Recorder(), upgrade.Timeline(out=lambda _s: None))
    with pytest.raises(UsageError, match="nothing is live"):
        upgrade.restart(ctx, upgrade.Options(probation_s=0, drain_s=0))
    _install(paths, REAL, live=Color.GREEN)
    seen: list[str] = []

    def deploy(c: upgrade.Ctx, rel: Installed, o: upgrade.Options) -> dict[str, Any]:
        seen.append(rel.dirname)
        return {}

    monkeypatch.setattr(upgrade, "deploy", deploy)
    upgrade.restart(ctx, upgrade.Options(probation_s=0, drain_s=0))
    assert seen == ["aipbx-2.5.4"]
    assert "restarting aipbx-2.5.4 on blue" in ctx.tl.steps[-1]["detail"]


# --- the manifest ------------------------------------------------------------------------


def test_manifest_required_and_generated_round_trip() -> None:
    text = render_manifest(REAL)
    assert "required_env = [" in text and "generated_env = [" in text
    assert parse_manifest(text) == REAL
    old = parse_manifest('name = "a"\nversion = "1"\nkind = "backend"\ncommand = ["x"]\n')
    assert old.required_env == () and old.generated_env == ()
    assert "required_env" not in render_manifest(old)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("required_env = ['1A']", "is not a variable name"),
        ("required_env = 'A'", "must be an array"),
        ("generated_env = ['PORT']", "PORT is set by the appliance"),
        ("required_env = ['DB_PASS']", "DB_PASS is set by the appliance"),
        ("required_env = ['A', 'A']", "twice"),
        ("required_env = ['A']\ngenerated_env = ['A']", "also required"),
        ("required_env = ['A']\n[env]\nA = '1'", "env.A: has a fixed value"),
    ],
)
def test_manifest_env_lists_are_validated(extra: str, message: str) -> None:
    head = 'name = "a"\nversion = "1"\nkind = "backend"\ncommand = ["x"]\n'
    with pytest.raises(UsageError) as e:
        parse_manifest(head + extra)
    assert message in e.value.message


def test_a_frontend_requires_nothing() -> None:
    with pytest.raises(UsageError, match="a frontend runs nothing"):
        parse_manifest('name = "a"\nversion = "1"\nkind = "frontend"\nrequired_env = ["A"]\n')


def test_pack_options() -> None:
    a = parser().parse_args(
        [
            "release",
            "pack",
            "d",
            "--require-env",
            "OPENAI_API_KEY",
            "--require-env",
            "STRIPE_SECRET_KEY",
            "--generate-env",
            "JWT_SECRET",
        ]
    )
    assert a.required_env == ["OPENAI_API_KEY", "STRIPE_SECRET_KEY"]
    assert a.generated_env == ["JWT_SECRET"]


def test_cli_env_and_restart() -> None:
    p = parser()
    a = p.parse_args(["env", "set", "A=1", "B=x y", "--no-restart", "--json"])
    assert a.assignments == ["A=1", "B=x y"] and a.no_restart and a.json
    a = p.parse_args(["env", "unset", "A", "--probation", "3", "--drain", "5", "--yes"])
    assert a.keys == ["A"] and a.probation == 3 and a.drain == 5 and not a.no_restart
    assert p.parse_args(["env", "list", "--json"]).json
    a = p.parse_args(["restart", "--probation", "2", "--yes", "--json"])
    assert a.command == "restart" and a.probation == 2 and not hasattr(a, "restore_db")
    with pytest.raises(SystemExit):
        p.parse_args(["restart", "--restore-db"])


# --- one environment for a color and its migration ---------------------------------------


def test_backend_env_layers(tmp_path: Path) -> None:
    files = appenv.files_from(
        "PORT=1\nDB_HOST=evil\nOPENAI_API_KEY=op\nPRIVATE_KEY=rotated\nNODE_ENV=staging\n"
        "FROM_MANIFEST=operator\n",
        "DB_PASS=dbpw\nPRIVATE_KEY=setup\nENCRYPTION_KEY=setup-enc\nTELEGRAM_BOT_TOKEN=watchdog\n",
    )
    m = Manifest(
        name="a", version="1", kind=Kind.BACKEND, command=("x",), env=(("FROM_MANIFEST", "m"),)
    )
    env = backend_env(CFG, Color.BLUE, m, Path("/r/a-1"), {"PATH": "/usr/bin"}, files)
    assert env["PORT"] == "5005" and env["DB_HOST"] == "10.203.0.1" and env["DB_PORT"] == "6432"
    assert env["DB_PASS"] == "dbpw" and env["OPENAI_API_KEY"] == "op"
    assert env["PRIVATE_KEY"] == "rotated"  # backend.env over setup's
    assert env["ENCRYPTION_KEY"] == "setup-enc"
    assert env["FROM_MANIFEST"] == "m" and env["NODE_ENV"] == "staging"
    assert "TELEGRAM_BOT_TOKEN" not in env  # the watchdog's, not the app's
    assert env["AIPBX_COLOR"] == "blue"


def test_the_migration_gets_the_apps_environment(tmp_path: Path) -> None:
    paths = _paths(
        tmp_path,
        backend="OPENAI_API_KEY=sk-op\nREDIS_URL=redis://:redispw@h:1\n",
        secrets="DB_PASS=s3cret\nPRIVATE_KEY=setup-key\nALERT_SMTP_PASSWORD=watchdog\n",
    )
    rel = Installed("aipbx-2.5.4", REAL, tmp_path / "rel", 0.0)
    env, hidden = migrate.migration_env(paths, CFG, rel, tmp_path / "home")
    app = backend_env(CFG, Color.BLUE, REAL, rel.path, {}, appenv.load(paths))
    # exactly the app's, but for the color, the database address and the process's own
    differs = {k for k in {*env, *app} if env.get(k) != app.get(k)}
    assert differs == {
        "DB_HOST",
        "DB_PORT",
        "AIPBX_COLOR",
        "AIPBX_MIGRATE",
        "HOME",
        "TMPDIR",
        "USER",
        "LOGNAME",
        "PATH",
        "LANG",
    }
    assert env["DB_HOST"] == "127.0.0.1" and env["DB_PORT"] == "5432"
    assert env["OPENAI_API_KEY"] == "sk-op" and env["DB_PASS"] == "s3cret"
    assert "ALERT_SMTP_PASSWORD" not in env
    assert {"sk-op", "s3cret", "setup-key"} <= set(hidden)
    assert "redispw" in hidden and "5432" not in hidden


# --- aipbxctl env ------------------------------------------------------------------------


def test_env_set_without_a_live_release_only_writes(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    assert appenv.ensure_file(paths.backend_env)
    done = env_cmd.change(paths, Recorder(), _args("set", "OPENAI_API_KEY=sk-1", "B=it's"))
    assert done["changed"] == ["OPENAI_API_KEY", "B"] and not done["applied"]
    assert "no release is live" in done["note"]
    text = paths.backend_env.read_text()
    assert text.startswith(appenv.TEMPLATE.split("\n# === General")[0])
    assert envfile.parse(text).values() == {"OPENAI_API_KEY": "sk-1", "B": "it's"}
    assert paths.backend_env.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in paths.etc.iterdir() if p.name.startswith(".")] == []
    again = env_cmd.change(paths, Recorder(), _args("set", "OPENAI_API_KEY=sk-1"))
    assert again["changed"] == [] and again["note"] == "nothing to change"
    done = env_cmd.change(paths, Recorder(), _args("unset", "B", "NOT_THERE"))
    assert done["changed"] == ["B"]
    assert envfile.parse(paths.backend_env.read_text()).values() == {"OPENAI_API_KEY": "sk-1"}


def test_env_set_bad_input_writes_nothing(tmp_path: Path) -> None:
    paths = _paths(tmp_path, backend="# keep me\nA=1\n")
    before = paths.backend_env.stat()
    for args in (["A=2", "BAD KEY=1"], ["A=2", "PORT=1"], ["A=line\nbreak"]):
        with pytest.raises(UsageError) as e:
            env_cmd.change(paths, Recorder(), _args("set", *args))
        assert e.value.exit_code == ExitCode.USAGE
    after = paths.backend_env.stat()
    assert paths.backend_env.read_text() == "# keep me\nA=1\n"
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_env_set_is_refused_while_another_change_holds_the_lock(tmp_path: Path) -> None:
    paths = _paths(tmp_path, backend="A=1\n")
    with locked(paths.lock, "upgrade"), pytest.raises(LockedError):
        env_cmd.change(paths, Recorder(), _args("set", "A=2"))
    assert paths.backend_env.read_text() == "A=1\n"


def test_env_set_applies_with_a_blue_green_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _paths(tmp_path, backend="OPENAI_API_KEY=a\nSTRIPE_SECRET_KEY=b\n")
    _install(paths, REAL)
    calls: list[tuple[str, bool]] = []

    def fake_rollout(p: Paths, s: object, a: dict[str, Any], verb: str) -> dict[str, Any]:
        calls.append((verb, a["yes"]))
        return {"ok": True, "release": "aipbx-2.5.4", "color": "green"}

    monkeypatch.setattr(rollout, "run_rollout", fake_rollout)
    caplog.set_level(logging.DEBUG, logger="aipbx")
    done = env_cmd.change(paths, Recorder(), _args("set", "OPENAI_API_KEY=sk-new-secret"))
    assert done["applied"] and done["restart"]["color"] == "green"
    assert calls == [("restart", True)]
    # the journal says which keys changed, never a value
    assert any("OPENAI_API_KEY" in str(r.__dict__) for r in caplog.records)
    assert not any("sk-new-secret" in str(r.__dict__) for r in caplog.records)
    # --no-restart only writes
    done = env_cmd.change(paths, Recorder(), _args("set", "X=1", no_restart=True))
    assert not done["applied"] and "aipbxctl restart" in done["note"] and len(calls) == 1


def test_env_unset_refuses_to_drop_what_the_live_release_requires(tmp_path: Path) -> None:
    paths = _paths(tmp_path, backend="OPENAI_API_KEY=a\nSTRIPE_SECRET_KEY=b\n")
    _install(paths, REAL)
    for args in (_args("unset", "STRIPE_SECRET_KEY"), _args("set", "STRIPE_SECRET_KEY=")):
        with pytest.raises(UsageError, match="requires STRIPE_SECRET_KEY"):
            env_cmd.change(paths, Recorder(), args)
    assert paths.backend_env.read_text() == "OPENAI_API_KEY=a\nSTRIPE_SECRET_KEY=b\n"


def test_env_list_masks_and_names_what_is_missing(tmp_path: Path) -> None:
    paths = _paths(
        tmp_path,
        backend="OPENAI_API_KEY=sk-very-secret\nAPI_URL=https://pbx.example.com\nPORT=1\n",
        secrets="DB_PASS=dbpw\nPRIVATE_KEY=setup-key\nTELEGRAM_BOT_TOKEN=wd\n",
    )
    _install(paths, REAL)
    data = env_cmd.list_env(paths)
    rows = {r["key"]: r for r in data["variables"]}
    assert rows["OPENAI_API_KEY"]["value"] == "***" and rows["OPENAI_API_KEY"]["secret"]
    assert rows["API_URL"]["value"] == "https://pbx.example.com"
    assert rows["PRIVATE_KEY"]["source"] == "secrets.env"
    assert set(rows) == {"OPENAI_API_KEY", "API_URL", "PRIVATE_KEY"}
    assert data["ignored"] == ["PORT"] and data["missing"] == ["STRIPE_SECRET_KEY"]
    text = env_cmd.format_list(data)
    assert "sk-very-secret" not in text and "setup-key" not in text and "dbpw" not in text
    assert "MISSING for aipbx-2.5.4: STRIPE_SECRET_KEY" in text


# --- doctor ------------------------------------------------------------------------------


def test_doctor_reports_the_apps_environment(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    found = doctor.check_app_env(paths, Recorder())
    assert [f.severity for f in found] == ["warning"] and "missing" in found[0].message
    paths.backend_env.write_text("OPENAI_API_KEY=a\nexport X=1\nDB_PASS=x\n# trailing \\\n")
    paths.backend_env.chmod(0o644)
    _install(paths, REAL)
    found = doctor.check_app_env(paths, Recorder())
    text = "\n".join(f"{f.severity}: {f.message} / {f.hint}" for f in found)
    assert "error: " in text and "not 0640" in text  # world-readable secrets
    assert "'export X' is not a variable name" in text
    assert "sets DB_PASS, which the appliance sets" in text
    assert "systemd 252" in text
    assert "live release aipbx-2.5.4 requires STRIPE_SECRET_KEY" in text
    assert "aipbxctl env set STRIPE_SECRET_KEY=..." in text
    paths.backend_env.write_text("OPENAI_API_KEY=a\nSTRIPE_SECRET_KEY=b\n")
    paths.backend_env.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(paths.backend_env, 0, appenv.group_id())
        assert doctor.check_app_env(paths, Recorder()) == []


def test_values_leave_the_command_line() -> None:
    from appliance.appenv import fill_values, hide_values

    assert hide_values(["A", "B"]) is None
    names, values = hide_values(["A=1", "B", "C=x=y", "A=2"]) or ([], {})
    # a key given twice stays as given: the re-executed command refuses it
    assert names == ["A", "B", "C", "A=2"] and values == {"A": "1", "C": "x=y"}
    asked: list[str] = []

    def read(key: str) -> str:
        asked.append(key)
        return "typed"

    assert fill_values(names, values, read) == ["A=1", "B=typed", "C=x=y", "A=2"]
    assert asked == ["B"]
