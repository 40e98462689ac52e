"""Alert delivery: Telegram (bot API), a JSON webhook and email (smtplib in a thread).

Each configured channel has its own task draining its own Outbox, every send under a
timeout, so a dead channel delays nothing else and loses nothing: its alerts wait queued
and are retried with backoff. A channel without its settings or credentials is off, and
says why. Credentials never reach a log line: errors are masked before they are kept."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from appliance.config import Alerts
from appliance.run import masked
from appliance.watchdog.alerts import Alert, Outbox, Severity, alert_doc, alert_from_doc
from appliance.watchdog.backoff import Backoff, Clock

log = logging.getLogger("aipbx.watchdog")

ICONS = {Severity.CRITICAL: "🔴", Severity.WARNING: "🟡", Severity.INFO: "🟢"}
LEVELS = {Severity.CRITICAL: logging.CRITICAL, Severity.WARNING: logging.WARNING}


class ChannelError(Exception):
    pass


def when(alert: Alert) -> str:
    return datetime.fromtimestamp(alert.wall, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def message(alert: Alert, host: str) -> str:
    return (
        f"{ICONS[alert.severity]} {alert.severity} aipbx@{host}\n{alert.text}\n"
        f"{when(alert)} · incident {alert.incident}"
    )


def payload(alert: Alert, host: str) -> dict[str, Any]:
    return {
        "source": "aipbx-watchdog",
        "host": host,
        "severity": str(alert.severity),
        "check": alert.check,
        "incident": alert.incident,
        "text": alert.text,
        "time": datetime.fromtimestamp(alert.wall, UTC).isoformat(timespec="seconds"),
    }


class Sender(Protocol):
    @property
    def secrets(self) -> tuple[str, ...]:
        """Masked out of every error kept or logged."""
        ...

    async def send(self, alert: Alert, host: str, timeout: float) -> None: ...
    async def close(self) -> None: ...


class _Http:
    """JSON over HTTP with urllib in a worker thread: the watchdog needs one POST per
    alert, and an HTTP client library would cost it megabytes of memory."""

    async def post_json(self, url: str, body: dict[str, Any], timeout: float) -> str:
        return await asyncio.to_thread(_post_json, url, body, timeout)

    async def close(self) -> None:
        pass


# No proxy from the environment: the channels are reached directly (loopback in tests).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post_json(url: str, body: dict[str, Any], timeout: float) -> str:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "aipbx-watchdog"},
    )
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            text: str = resp.read(65536).decode(errors="replace")
            return text
    except urllib.error.HTTPError as e:
        raise ChannelError(f"HTTP {e.code}: {e.read(200).decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ChannelError(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None


class Telegram(_Http):
    def __init__(self, base_url: str, token: str, chat_id: str) -> None:
        super().__init__()
        self.url = f"{base_url.rstrip('/')}/bot{token}/sendMessage"
        self.chat_id = chat_id
        self.secrets: tuple[str, ...] = (token,)

    async def send(self, alert: Alert, host: str, timeout: float) -> None:
        body = {"chat_id": self.chat_id, "text": message(alert, host)}
        await self.post_json(self.url, body, timeout)


class Webhook(_Http):
    def __init__(self, url: str, *, secret: bool = False) -> None:
        super().__init__()
        self.url = url
        # A URL from alerts.env carries its token (Slack, Teams...): masked like one.
        self.secrets: tuple[str, ...] = (url,) if secret else ()

    async def send(self, alert: Alert, host: str, timeout: float) -> None:
        await self.post_json(self.url, payload(alert, host), timeout)


@dataclass(frozen=True)
class Email:
    host: str
    port: int
    starttls: bool
    user: str
    password: str
    sender: str
    to: tuple[str, ...]

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.password,) if self.password else ()

    def compose(self, alert: Alert, host: str) -> Any:
        from email.message import EmailMessage

        msg = EmailMessage()
        msg["Subject"] = f"[aipbx {host}] {alert.severity}: {alert.text.splitlines()[0][:120]}"
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg.set_content(message(alert, host) + "\n")
        return msg

    def _send(self, alert: Alert, host: str, timeout: float) -> None:
        import smtplib
        import ssl

        smtp: smtplib.SMTP
        if self.port == 465:
            ctx = ssl.create_default_context()
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=timeout, context=ctx)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=timeout)
        with smtp:
            if self.starttls and self.port != 465:
                smtp.starttls(context=ssl.create_default_context())
            if self.user:
                smtp.login(self.user, self.password)
            smtp.send_message(self.compose(alert, host))

    async def send(self, alert: Alert, host: str, timeout: float) -> None:
        await asyncio.to_thread(self._send, alert, host, timeout)

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class Channel:
    name: str
    sender: Sender | None  # None: off
    reason: str  # why it is off ("" when on)


def configure(a: Alerts, secrets: Mapping[str, str]) -> list[Channel]:
    """The three channels from [alerts] and alerts.env; off (with a reason) when a setting
    or credential is missing."""
    out = []
    token = secrets.get("TELEGRAM_BOT_TOKEN", "")
    chat = (
        a.telegram_chat_id
        or secrets.get("TELEGRAM_ADMIN_CHATID", "")
        or secrets.get("TELEGRAM_CHAT_ID", "")
    )
    if not token:
        out.append(Channel("telegram", None, "TELEGRAM_BOT_TOKEN is not in alerts.env"))
    elif not chat:
        reason = "no chat: set alerts.telegram_chat_id or TELEGRAM_ADMIN_CHATID in alerts.env"
        out.append(Channel("telegram", None, reason))
    else:
        out.append(Channel("telegram", Telegram(a.telegram_base_url, token, chat), ""))
    hook = secrets.get("ALERT_WEBHOOK_URL", "")  # wins: aipbx.toml is the backend's to read
    if hook and (not hook.startswith(("http://", "https://")) or any(c.isspace() for c in hook)):
        out.append(Channel("webhook", None, "ALERT_WEBHOOK_URL in alerts.env is not a URL"))
    elif hook or a.webhook_url:
        out.append(Channel("webhook", Webhook(hook or a.webhook_url, secret=bool(hook)), ""))
    else:
        out.append(Channel("webhook", None, "alerts.webhook_url is not set"))
    password = secrets.get("ALERT_SMTP_PASSWORD", "")
    missing = [
        what
        for what, ok in (
            ("alerts.smtp_host", a.smtp_host),
            ("alerts.smtp_from", a.smtp_from),
            ("alerts.smtp_to", a.smtp_to),
        )
        if not ok
    ]
    if missing:
        out.append(Channel("email", None, f"{', '.join(missing)} not set"))
    elif a.smtp_user and not password:
        out.append(Channel("email", None, "ALERT_SMTP_PASSWORD is not in alerts.env"))
    else:
        email = Email(
            a.smtp_host, a.smtp_port, a.smtp_starttls, a.smtp_user, password, a.smtp_from, a.smtp_to
        )
        out.append(Channel("email", email, ""))
    return out


class ChannelRunner:
    def __init__(
        self, name: str, sender: Sender, outbox: Outbox, timeout: float, clock: Clock, host: str
    ) -> None:
        self.name = name
        self.sender = sender
        self.outbox = outbox
        self.timeout = timeout
        self.clock = clock
        self.host = host
        self._wake = asyncio.Event()
        self.on_change: Callable[[], None] = lambda: None  # the queue changed

    def push(self, alert: Alert) -> None:
        dropped = self.outbox.push(alert)
        if dropped is not None:
            log.warning(
                "alert queue of %s is full: dropped %s %s (%d dropped so far)",
                self.name,
                dropped.severity,
                dropped.incident,
                self.outbox.dropped,
                extra={"fields": {"action": "alert_dropped", "channel": self.name}},
            )
        self.on_change()
        self._wake.set()

    def _mask(self, text: str) -> str:
        return masked([text], self.sender.secrets)[0]

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            alert = self.outbox.take(now)
            if alert is None:
                due = self.outbox.due(now)
                wait = None if due is None else max(0.0, due - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            try:
                sending = self.sender.send(alert, self.host, self.timeout)
                await asyncio.wait_for(sending, self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                error = self._mask(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                self.outbox.fail(self.clock(), error)
                log.warning(
                    "alert to %s failed (attempt %d, retry in %.1f s): %s",
                    self.name,
                    self.outbox.backoff.failures,
                    max(0.0, self.outbox.retry_at - self.clock()),
                    error,
                    extra={"fields": {"action": "alert_failed", "channel": self.name}},
                )
            else:
                self.outbox.done(self.clock())
                self.on_change()
                log.info(
                    "alert %s %s sent to %s",
                    alert.severity,
                    alert.incident,
                    self.name,
                    extra={"fields": {"action": "alert_sent", "channel": self.name}},
                )


class Alerter:
    """Fans each alert out to every channel that is on."""

    def __init__(
        self,
        channels: list[Channel],
        *,
        capacity: int,
        rate_per_min: int,
        timeout: float,
        backoff_initial: float,
        backoff_max: float,
        clock: Clock,
        host: str | None = None,
    ) -> None:
        self.channels = channels
        self.host = host or socket.gethostname()
        self.runners: dict[str, ChannelRunner] = {}
        for c in channels:
            if c.sender is not None:
                box = Outbox(capacity, rate_per_min, Backoff(backoff_initial, backoff_max))
                runner = ChannelRunner(c.name, c.sender, box, timeout, clock, self.host)
                self.runners[c.name] = runner
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run()) for r in self.runners.values()]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for r in self.runners.values():
            await r.sender.close()

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a queue changes (an alert queued, sent or dropped)."""
        for r in self.runners.values():
            r.on_change = callback

    def queue_docs(self) -> dict[str, list[dict[str, object]]]:
        """The alerts not yet delivered, per channel, oldest first."""
        return {n: [alert_doc(a) for a in r.outbox.queue] for n, r in self.runners.items()}

    def requeue(self, docs: object, now: float, wall_now: float) -> int:
        """Queue again what was not delivered before a restart (to the channels still on);
        returns how many."""
        if not isinstance(docs, dict):
            return 0
        n = 0
        for name, entries in docs.items():
            runner = self.runners.get(name)
            if runner is None or not isinstance(entries, list):
                continue
            for d in entries:
                alert = alert_from_doc(d, now, wall_now)
                if alert is not None:
                    runner.outbox.push(alert)
                    n += 1
        return n

    def publish(self, alert: Alert) -> None:
        log.log(
            LEVELS.get(alert.severity, logging.INFO),
            "%s alert: %s",
            alert.severity,
            alert.text,
            extra={
                "fields": {
                    "action": "alert",
                    "check": alert.check,
                    "severity": str(alert.severity),
                    "incident": alert.incident,
                }
            },
        )
        for r in self.runners.values():
            r.push(alert)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for c in self.channels:
            r = self.runners.get(c.name)
            if r is None:
                out[c.name] = {"enabled": False, "reason": c.reason, "queued": 0, "sent": 0}
                out[c.name].update({"failed": 0, "dropped": 0, "last_error": ""})
                continue
            box = r.outbox
            out[c.name] = {
                "enabled": True,
                "reason": "",
                "queued": len(box.queue),
                "sent": box.sent,
                "failed": box.failed,
                "dropped": box.dropped,
                "last_error": box.last_error,
            }
        return out
