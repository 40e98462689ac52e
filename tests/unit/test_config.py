from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError, ExitCode

SHIPPED = Path(__file__).resolve().parents[2] / "packaging" / "aipbx.toml"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(text, "aipbx.toml")
    assert e.value.exit_code == ExitCode.USAGE
    return e.value.message.splitlines()


def test_empty_file_gives_the_defaults() -> None:
    cfg = config.parse("")
    assert cfg.backend.http_port == 5005
    assert cfg.backend.ws_port == 3033
    assert cfg.backend.udp_port == 3032
    assert cfg.database.pool_size == 20
    assert cfg.backend.memory_max == "2g"


def test_shipped_conffile_is_valid() -> None:
    if SHIPPED.exists():
        config.load(SHIPPED)


def test_values_are_read() -> None:
    cfg = config.parse('[site]\ndomain = "PBX.Example.com"\n[database]\npool_size = 40\n')
    assert cfg.site.domain == "PBX.Example.com"
    assert cfg.database.pool_size == 40


def test_wrong_type_names_file_and_line() -> None:
    assert errors_of('[site]\n\n[backend]\nhttp_port = "5005"\n') == [
        "aipbx.toml:4: backend.http_port must be an integer, not str"
    ]


def test_unknown_key_and_section() -> None:
    errs = errors_of("[site]\ndomian = 'x.example'\n[nope]\na = 1\n")
    assert errs == ["aipbx.toml:2: unknown key site.domian", "aipbx.toml:3: unknown section [nope]"]


@pytest.mark.parametrize("bad", ["exa mple.com", "-bad.example", "localhost", "1.2.3.4", "a..b"])
def test_bad_domain(bad: str) -> None:
    (err,) = errors_of(f'[site]\ndomain = "{bad}"\n')
    assert err.startswith("aipbx.toml:2: site.domain:")


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_bad_port(port: int) -> None:
    (err,) = errors_of(f"[nginx]\nhttps_port = {port}\n")
    assert err.startswith("aipbx.toml:2: nginx.https_port: port")


def test_bool_is_not_an_int() -> None:
    (err,) = errors_of("[database]\npool_size = true\n")
    assert "must be an integer, not bool" in err


def test_syntax_error_has_line() -> None:
    (err,) = errors_of('[site]\ndomain = "unterminated\n')
    assert err.startswith("aipbx.toml:2:")


def test_port_clash_is_refused() -> None:
    (err,) = errors_of("[backend]\nws_port = 5005\n")
    assert "aipbx.toml:2: backend.ws_port 5005 is also backend.http_port" in err


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        (
            "[database]\npgbouncer_port = 5432\n",
            "database.pgbouncer_port 5432 is also database.postgres_port",
        ),
        (
            "[nginx]\nhttp_port = 5432\n",
            "nginx.http_port 5432 is also",
        ),  # reported at postgres_port
        ("[watchdog]\napi_port = 443\n", "watchdog.api_port 443 is also nginx.https_port"),
        ("[watchdog]\napi_port = 5005\n", "watchdog.api_port 5005 is also backend.http_port"),
        ("[nginx]\nhttps_port = 6432\n", "nginx.https_port 6432 is also database.pgbouncer_port"),
        ("[nginx]\nhttp_port = 443\n", "nginx.http_port 443 is also nginx.https_port"),
    ],
)
def test_every_tcp_port_the_appliance_listens_on_is_its_own(toml: str, named: str) -> None:
    (err,) = errors_of(toml)
    assert named in err, err


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[nginx]\napi_rate = "0r/s"\n', "a rate of 0 refuses every request"),
        ('[nginx]\nlogin_rate = "0r/m"\n', "a rate of 0 refuses every request"),
        (
            '[nginx]\nworker_shutdown_timeout = "0s"\n',
            "worker_shutdown_timeout must be at least 1s",
        ),
        ('[upgrade]\nhealth_timeout = "0s"\n', "health_timeout must be at least 1s"),
        ('[nginx]\nclient_max_body_size = "0"\n', "client_max_body_size 0 lifts nginx's limit"),
        ('[releases]\nmax_unpacked_size = "1"\n', "max_unpacked_size must be at least 1m"),
        (
            '[watchdog]\ninterval = "1ms"\ntimeout = "1ms"\nslow_threshold = "0s"\n',
            "interval must be at least 100ms",
        ),
        ('[database]\nname = "postgres"\n', "PostgreSQL's or PgBouncer's own database"),
        ('[database]\nname = "template1"\n', "PostgreSQL's or PgBouncer's own database"),
        ('[database]\nuser = "postgres"\n', "the backend needs a role of its own"),
        ('[database]\nuser = "pg_monitor"\n', "the backend needs a role of its own"),
    ],
)
def test_values_that_would_break_the_host_are_refused(toml: str, message: str) -> None:
    errs = errors_of(toml)
    assert any(message in e for e in errs), errs


def test_all_errors_reported_at_once() -> None:
    errs = errors_of('[site]\nemail = "nope"\n[backend]\nhttp_port = 99999\ncpu_quota = "lots"\n')
    assert [e.split(":")[1] for e in errs] == ["2", "4", "5"]


def test_subnet_must_leave_room() -> None:
    (err,) = errors_of('[network]\nsubnet = "10.0.0.0/30"\n')
    assert "too small" in err
    (err,) = errors_of('[network]\nsubnet = "10.0.0.1/24"\n')
    assert "not an IPv4 subnet" in err


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "aipbx.toml")


def test_host_ports_are_checked_with_their_line() -> None:
    cfg = config.parse('[network]\nhost_ports = ["tcp/5038", "udp/10000-10100"]\n')
    assert cfg.network.host_ports == ("tcp/5038", "udp/10000-10100")
    errs = errors_of('[network]\nhost_ports = ["tcp/5038", "5060"]\n')
    assert errs == [
        "aipbx.toml:2: network.host_ports: '5060' is not tcp/PORT, udp/PORT or tcp/FIRST-LAST"
    ]
