"""PostgreSQL stopped, for real (a throwaway cluster on loopback): pg_isready's verdict,
and what an upgrade's database step says when it meets the stopped server: "PostgreSQL
is not answering on ...: start it", from psql's own error text, not "runuser exited with
1"."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from appliance import config, pgready, sqlmigrations
from appliance.errors import AipbxError
from appliance.sqlmigrations import Target
from tests.integration.procs import create_app_database, postgres_cluster

pytestmark = pytest.mark.integration


def test_a_stopped_postgresql_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Path(tempfile.mkdtemp(prefix="aipbx-pgready-it-"))
    pg = pwd.getpwnam("postgres")
    os.chown(d, pg.pw_uid, pg.pw_gid)
    monkeypatch.setenv("PGHOST", str(d))  # the cluster's socket, for the socket check
    try:
        with postgres_cluster(d) as port:
            cfg = config.Config()
            cfg = replace(cfg, database=replace(cfg.database, postgres_port=port))
            create_app_database(d, port, "app", "appdb", "pw")
            target = Target(
                database="appdb", role="app", password="pw", port=port, os_user="nobody"
            )
            assert pgready.probe(cfg) is None
            with sqlmigrations.session(target) as s:
                assert s.query("SELECT 1") == "1"
        # stopped: both the socket and 127.0.0.1 give no answer
        down = pgready.probe(cfg)
        assert down == pgready.Down(f"the local socket (port {port})", "no answer")
        with pytest.raises(pgready.PostgresDown) as e:
            pgready.check(cfg, consequence="nothing was changed")
        assert e.value.message.startswith(
            f"PostgreSQL is not answering on the local socket (port {port}) (no answer): "
            "start it (systemctl start postgresql) and run the upgrade again"
        )
        # what a migration step met: psql's own words, recognised
        with sqlmigrations.session(target) as s, pytest.raises(AipbxError) as met:
            s.query("SELECT 1")
        assert pgready.looks_unreachable(met.value.message), met.value.message
        named = pgready.explain(cfg, met.value, consequence="nothing was migrated or switched")
        assert named is not None and named.message.endswith("nothing was migrated or switched")
    finally:
        shutil.rmtree(d)
