"""secrets.env keeps the app's keys only (the backend's group reads it); the watchdog's
alert credentials live in alerts.env, 0600 root (appliance.secrets.separate)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import secrets
from appliance.errors import AipbxError


def test_alert_credentials_move_out_of_secrets_env(tmp_path: Path) -> None:
    """The backend's group reads secrets.env: only the app's keys stay there; the rest moves
    to alerts.env (0600), whose own values win; a second run changes nothing."""
    sec, alerts = tmp_path / "secrets.env", tmp_path / "alerts.env"
    values, _ = secrets.ensure(sec)
    sec.write_text(
        sec.read_text()
        + "TELEGRAM_BOT_TOKEN=123:tok\nALERT_SMTP_PASSWORD=pw\nTELEGRAM_ADMIN_CHATID=7\n"
    )
    alerts.write_text("# mine\nTELEGRAM_ADMIN_CHATID=42\n")
    alerts.chmod(0o644)
    changes = secrets.separate(sec, alerts)
    assert any(
        "moved ALERT_SMTP_PASSWORD, TELEGRAM_ADMIN_CHATID, TELEGRAM_BOT_TOKEN" in c for c in changes
    )
    assert secrets.load(sec) == values  # the app's keys, unchanged
    assert secrets.load(alerts) == {
        "TELEGRAM_ADMIN_CHATID": "42",  # alerts.env's own value is kept
        "TELEGRAM_BOT_TOKEN": "123:tok",
        "ALERT_SMTP_PASSWORD": "pw",
    }
    assert alerts.read_text().startswith("# mine\n")
    assert alerts.stat().st_mode & 0o777 == 0o600 and sec.stat().st_mode & 0o777 == 0o640
    assert all("123:tok" not in c and "pw" not in c.split() for c in changes)
    assert secrets.separate(sec, alerts) == []
    secrets.ensure(sec)
    assert secrets.separate(sec, alerts) == []


def test_alerts_env_is_created_from_the_template_and_a_link_is_refused(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.env"
    assert secrets.separate(tmp_path / "secrets.env", alerts) == [
        f"created {alerts} (the watchdog's alert credentials, root only)"
    ]
    assert "# TELEGRAM_BOT_TOKEN=" in alerts.read_text() and secrets.load(alerts) == {}
    assert alerts.stat().st_mode & 0o777 == 0o600
    alerts.unlink()
    alerts.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AipbxError, match="not a regular file"):
        secrets.separate(tmp_path / "secrets.env", alerts)
