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
    assert "ws_port equals backend.http_port" in err


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
