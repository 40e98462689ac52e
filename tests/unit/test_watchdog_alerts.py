"""Alert decisions and the channel queue, driven by a fake clock: one CRITICAL and one INFO
per incident, WARNINGs for slow answers, rate limits, retries, overflow."""

from __future__ import annotations

from pathlib import Path

from appliance.config import Alerts
from appliance.watchdog.alerts import Alert, IncidentTracker, Outbox, Severity
from appliance.watchdog.backoff import Backoff
from appliance.watchdog.channels import Email, Telegram, Webhook, configure, message, payload
from appliance.watchdog.model import Status

OK, WARN, CRIT, IDLE = Status.OK, Status.WARNING, Status.CRITICAL, Status.IDLE


def feed(tr: IncidentTracker, statuses: list[Status], step: float = 1.0) -> list[Alert]:
    out: list[Alert] = []
    for i, s in enumerate(statuses):
        out += tr.observe(s, i * step, "why")
    return out


def test_short_outage_sends_nothing() -> None:
    tr = IncidentTracker("nginx", critical_after=60, recover_after=3)
    assert feed(tr, [CRIT] * 30 + [OK] * 5, step=2) == []


def test_long_outage_sends_one_critical_then_one_info() -> None:
    tr = IncidentTracker("nginx", critical_after=60, recover_after=3)
    alerts = feed(tr, [OK] + [CRIT] * 100 + [OK] * 10, step=2)
    assert [a.severity for a in alerts] == [Severity.CRITICAL, Severity.INFO]
    crit, info = alerts
    assert crit.at == 62  # down since t=2, 60 s later
    assert crit.text == "nginx is down for 60 s: why"
    assert crit.incident == info.incident == "nginx#1"
    assert info.text.startswith("nginx recovered after ")
    assert info.at == 2 * (101 + 2)  # the third ok in a row


def test_flapping_within_an_incident_does_not_repeat() -> None:
    tr = IncidentTracker("db", critical_after=10, recover_after=3)
    pattern = ([CRIT] * 20 + [OK, OK]) * 5 + [OK] * 3
    alerts = feed(tr, pattern)
    assert [a.severity for a in alerts] == [Severity.CRITICAL, Severity.INFO]


def test_each_incident_has_its_own_id() -> None:
    tr = IncidentTracker("db", critical_after=0, recover_after=1)
    alerts = feed(tr, [CRIT, OK, CRIT, OK])
    assert [(a.severity, a.incident) for a in alerts] == [
        (Severity.CRITICAL, "db#1"),
        (Severity.INFO, "db#1"),
        (Severity.CRITICAL, "db#2"),
        (Severity.INFO, "db#2"),
    ]


def test_slow_sends_one_warning_and_its_recovery() -> None:
    tr = IncidentTracker("backend_http", critical_after=60, recover_after=2)
    alerts = feed(tr, [WARN, OK, WARN, WARN, OK, OK, OK])
    assert [a.severity for a in alerts] == [Severity.WARNING, Severity.INFO]


def test_warning_then_down_sends_critical_too_but_one_info() -> None:
    tr = IncidentTracker("x", critical_after=5, recover_after=1)
    alerts = feed(tr, [WARN] + [CRIT] * 10 + [OK])
    assert [a.severity for a in alerts] == [Severity.WARNING, Severity.CRITICAL, Severity.INFO]


def test_a_check_going_idle_ends_its_incident() -> None:
    tr = IncidentTracker("backend_http", critical_after=0, recover_after=5)
    alerts = feed(tr, [CRIT, IDLE])
    assert [a.severity for a in alerts] == [Severity.CRITICAL, Severity.INFO]
    assert "no longer checked" in alerts[1].text


def alert(sev: Severity, n: int) -> Alert:
    return Alert(sev, "c", f"{sev} {n}", f"c#{n}", float(n))


def test_outbox_rate_limit_delays_but_keeps_alerts() -> None:
    box = Outbox(capacity=100, rate_per_min=2, backoff=Backoff(1, 300))
    for i in range(4):
        box.push(alert(Severity.CRITICAL, i))
    sent = []
    now = 0.0
    while box.queue and now < 1000:
        while (a := box.take(now)) is not None:
            box.done(now)
            sent.append((a.incident, now))
        now += 1
    assert [s[0] for s in sent] == ["c#0", "c#1", "c#2", "c#3"]
    # two at once (a full bucket), then one every 30 s
    assert [s[1] for s in sent] == [0, 0, 30, 60]


def test_outbox_retries_with_backoff_and_loses_nothing() -> None:
    box = Outbox(capacity=10, rate_per_min=1000, backoff=Backoff(1, 8))
    box.push(alert(Severity.CRITICAL, 1))
    attempts = []
    now = 0.0
    while now < 40:
        a = box.take(now)
        if a is not None:
            attempts.append(now)
            if now < 20:
                box.fail(now, "connection refused")
            else:
                box.done(now)
        now = round(now + 0.5, 1)
    assert attempts == [0, 1, 3, 7, 15, 23]  # waits 1, 2, 4, 8, 8 (capped)
    assert box.sent == 1 and box.failed == 5 and not box.queue
    assert box.last_error == ""


def test_outbox_head_is_not_taken_twice_while_in_flight() -> None:
    box = Outbox(capacity=10, rate_per_min=1000, backoff=Backoff(1, 8))
    box.push(alert(Severity.INFO, 1))
    box.push(alert(Severity.INFO, 2))
    assert box.take(0) is not None
    assert box.take(0) is None and box.due(0) is None
    box.done(0)
    taken = box.take(0)
    assert taken is not None and taken.incident == "c#2"


def test_outbox_overflow_drops_oldest_info_first_then_warning() -> None:
    box = Outbox(capacity=4, rate_per_min=10, backoff=Backoff(1, 8))
    box.push(alert(Severity.CRITICAL, 1))
    box.push(alert(Severity.INFO, 2))
    box.push(alert(Severity.WARNING, 3))
    box.push(alert(Severity.INFO, 4))
    dropped = box.push(alert(Severity.CRITICAL, 5))
    assert dropped is not None and dropped.incident == "c#2"
    dropped = box.push(alert(Severity.CRITICAL, 6))
    assert dropped is not None and dropped.incident == "c#4"
    dropped = box.push(alert(Severity.CRITICAL, 7))
    assert dropped is not None and dropped.incident == "c#3"
    assert [a.incident for a in box.queue] == ["c#1", "c#5", "c#6", "c#7"]
    assert box.dropped == 3


def test_outbox_overflow_spares_the_alert_in_flight() -> None:
    box = Outbox(capacity=2, rate_per_min=10, backoff=Backoff(1, 8))
    box.push(alert(Severity.INFO, 1))
    box.push(alert(Severity.INFO, 2))
    assert box.take(0) is not None
    dropped = box.push(alert(Severity.INFO, 3))
    assert dropped is not None and dropped.incident == "c#2"
    box.done(0)
    assert [a.incident for a in box.queue] == ["c#3"]


def test_channels_are_off_without_settings_or_credentials() -> None:
    channels = {c.name: c for c in configure(Alerts(), {})}
    assert all(c.sender is None for c in channels.values())
    assert "TELEGRAM_BOT_TOKEN" in channels["telegram"].reason
    assert "webhook_url" in channels["webhook"].reason
    assert "smtp_host" in channels["email"].reason

    a = Alerts(
        webhook_url="http://127.0.0.1:9/hook",
        smtp_host="mail.example.test",
        smtp_from="pbx@example.test",
        smtp_to=("ops@example.test",),
        smtp_user="pbx",
    )
    secrets = {"TELEGRAM_BOT_TOKEN": "123:abc"}
    channels = {c.name: c for c in configure(a, secrets)}
    assert channels["telegram"].sender is None and "chat" in channels["telegram"].reason
    assert isinstance(channels["webhook"].sender, Webhook)
    assert channels["email"].sender is None
    assert "ALERT_SMTP_PASSWORD" in channels["email"].reason

    secrets |= {"TELEGRAM_ADMIN_CHATID": "42", "ALERT_SMTP_PASSWORD": "pw"}
    channels = {c.name: c for c in configure(a, secrets)}
    tg = channels["telegram"].sender
    assert isinstance(tg, Telegram)
    assert tg.url == "https://api.telegram.org/bot123:abc/sendMessage"
    assert tg.chat_id == "42" and tg.secrets == ("123:abc",)
    mail = channels["email"].sender
    assert isinstance(mail, Email) and mail.secrets == ("pw",)


def test_messages_carry_severity_host_text_and_incident() -> None:
    a = Alert(Severity.CRITICAL, "nginx", "nginx is down for 61 s: refused", "nginx#2", 5.0, 0.0)
    text = message(a, "pbx1")
    assert text.splitlines()[0] == "🔴 CRITICAL aipbx@pbx1"
    assert "nginx is down for 61 s: refused" in text and "nginx#2" in text
    body = payload(a, "pbx1")
    assert body["severity"] == "CRITICAL" and body["check"] == "nginx"
    assert body["time"] == "1970-01-01T00:00:00+00:00"
    mail = Email("h", 25, False, "", "", "pbx@example.test", ("a@example.test", "b@example.test"))
    msg = mail.compose(a, "pbx1")
    assert msg["Subject"] == "[aipbx pbx1] CRITICAL: nginx is down for 61 s: refused"
    assert msg["To"] == "a@example.test, b@example.test"


# -- what survives a restart (appliance.watchdog.spool)


def test_an_open_incident_survives_a_restart_without_a_second_critical() -> None:
    before = IncidentTracker("nginx", critical_after=10, recover_after=2)
    alerts = [a for t in range(20) for a in before.observe(CRIT, float(t), "down")]
    assert [a.severity for a in alerts] == [Severity.CRITICAL]
    # saved at monotonic 19 = epoch 1000019; the new process's clock starts anew
    doc = before.state_doc(19.0, 1_000_019.0)
    assert doc == {
        "count": 1,
        "started": 1_000_000,
        "down_since": 1_000_000,
        "critical_sent": True,
        "warning_sent": False,
    }
    after = IncidentTracker("nginx", critical_after=10, recover_after=2)
    after.resume(doc, 5.0, 1_000_025.0)  # 6 s later, monotonic 5 in the new process
    assert after.observe(CRIT, 6.0, "down") == []  # already alerted: not again
    info = after.observe(OK, 7.0, "") + after.observe(OK, 8.0, "")
    assert [(a.severity, a.incident) for a in info] == [(Severity.INFO, "nginx#1")]
    assert "after 28 s" in info[0].text  # counted from the start before the restart
    # the next incident is #2, not #1 again
    nxt = [a for t in range(9, 30) for a in after.observe(CRIT, float(t), "down")]
    assert [a.incident for a in nxt] == ["nginx#2"]


def test_a_closed_incident_keeps_only_the_count_and_junk_is_ignored() -> None:
    tr = IncidentTracker("pg", critical_after=0, recover_after=1)
    feed(tr, [CRIT, OK])
    assert tr.state_doc(5.0, 100.0) == {"count": 1}
    fresh = IncidentTracker("pg", critical_after=0, recover_after=1)
    junks: list[object] = [None, [], {"count": "x"}, {"count": -1, "started": "soon"}]
    for junk in junks:
        fresh.resume(junk, 0.0, 100.0)
    assert fresh.count == 0 and fresh.started is None


def test_alert_documents_round_trip_and_junk_is_refused() -> None:
    from appliance.watchdog.alerts import alert_doc, alert_from_doc

    a = Alert(Severity.CRITICAL, "nginx", "nginx is down", "nginx#3", at=50.0, wall=1000.0)
    back = alert_from_doc(alert_doc(a), 10.0, 1030.0)
    assert back == Alert(Severity.CRITICAL, "nginx", "nginx is down", "nginx#3", -20.0, 1000.0)
    for junk in ("x", {}, {**alert_doc(a), "severity": "LOUD"}, {**alert_doc(a), "wall": "?"}):
        assert alert_from_doc(junk, 0.0, 0.0) is None


def test_the_spool_writes_only_changes_and_survives_a_bad_file(tmp_path: Path) -> None:
    from appliance.watchdog.spool import Spool

    path = tmp_path / "watchdog-alerts.json"
    spool = Spool(path)
    assert spool.load() == {}
    spool.save({"incidents": {}}, {"webhook": []})
    first = path.stat().st_ino
    spool.save({"incidents": {}}, {"webhook": []})
    assert path.stat().st_ino == first  # unchanged: not written again
    assert path.stat().st_mode & 0o777 == 0o600
    doc = Spool(path).load()
    assert doc["queues"] == {"webhook": []} and doc["monitor"] == {"incidents": {}}
    path.write_text("{torn")
    assert Spool(path).load() == {}
    path.write_text('{"schema": "something-else"}')
    assert Spool(path).load() == {}


def test_the_spool_moves_from_where_an_older_appliance_kept_it(tmp_path: Path) -> None:
    """The watchdog writes only /var/lib/aipbx/watchdog/: the old spool is read once, and
    the first save writes the new one even when nothing changed since."""
    from appliance.watchdog.spool import Spool

    legacy, new = tmp_path / "watchdog-alerts.json", tmp_path / "watchdog" / "alerts.json"
    Spool(legacy).save({"incidents": {"nginx": {"count": 1}}}, {"webhook": []})
    spool = Spool(new, legacy=legacy)
    doc = spool.load()
    assert doc["monitor"] == {"incidents": {"nginx": {"count": 1}}}
    spool.save(doc["monitor"], doc["queues"])
    assert Spool(new).load() == doc and (new.parent.stat().st_mode & 0o777) == 0o700
    assert Spool(new, legacy=legacy).load() == doc  # the new one wins from now on


def test_a_webhook_url_in_alerts_env_wins_and_is_masked() -> None:
    """aipbx.toml is readable by the backend's group: a URL carrying its token belongs in
    alerts.env (ALERT_WEBHOOK_URL), root's only."""
    url = "https://hooks.example.test/services/T0/B0/s3cr3t"
    a = Alerts(webhook_url="http://127.0.0.1:9/hook")
    hook = {c.name: c for c in configure(a, {"ALERT_WEBHOOK_URL": url})}["webhook"].sender
    assert isinstance(hook, Webhook) and hook.url == url and hook.secrets == (url,)
    plain = {c.name: c for c in configure(a, {})}["webhook"].sender
    assert isinstance(plain, Webhook) and plain.secrets == ()
    bad = {c.name: c for c in configure(Alerts(), {"ALERT_WEBHOOK_URL": "ftp://x"})}["webhook"]
    assert bad.sender is None and "ALERT_WEBHOOK_URL" in bad.reason
