"""What the checks read without paying for it every round: a unit's state asked of
systemd at most every `ttl` seconds in a thread, and files parsed again only when they
change (the certificate, the backups' and the renewals' status records)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Generic, TypeVar

from appliance import acme, cert
from appliance.services import Services
from appliance.watchdog.backoff import Clock

log = logging.getLogger("aipbx.watchdog")

D = TypeVar("D")


class UnitWatch:
    """Whether a unit is active, asked of systemd at most every `ttl` seconds in a thread,
    so a check never waits for systemctl (nor spawns one every interval)."""

    def __init__(self, services: Services, ttl: float, clock: Clock) -> None:
        self.services = services
        self.ttl = ttl
        self.clock = clock
        self._known: dict[str, tuple[bool, float]] = {}
        self._asking: dict[str, asyncio.Task[None]] = {}

    def active(self, unit: str) -> bool | None:
        """The last answer (None: not known yet); refreshed in the background when old."""
        known = self._known.get(unit)
        if (known is None or self.clock() - known[1] >= self.ttl) and unit not in self._asking:
            self._asking[unit] = asyncio.create_task(self._ask(unit))
        return known[0] if known else None

    async def _ask(self, unit: str) -> None:
        try:
            active = await asyncio.to_thread(self.services.is_active, unit)
            self._known[unit] = (active, self.clock())
        except Exception as e:
            log.warning("cannot ask systemd about %s: %s", unit, e)
        finally:
            del self._asking[unit]


class CertWatch:
    """The certificate's end date, read again (openssl, in a thread) only when the file
    changes: renewals are noticed, and no process is spawned every interval."""

    def __init__(self) -> None:
        self._key: tuple[str, int, int, int] | None = None
        self._info: cert.CertInfo | None = None
        self._expires: datetime | None = None

    async def info(self, path: Path) -> tuple[cert.CertInfo, datetime]:
        st = path.stat()
        key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key or self._info is None or self._expires is None:
            self._info = await asyncio.to_thread(cert.info, path)
            self._expires = self._info.expires()
            self._key = key
        return self._info, self._expires


class FileWatch(Generic[D]):
    """A JSON record another process replaces (the backups' status, certbot's renewal
    record), parsed again only when it changes; {} while there is none."""

    def __init__(self, load: Callable[[Path], dict[str, D]]) -> None:
        self.load = load
        self._key: tuple[int, int, int] | None = None
        self._doc: dict[str, D] = {}

    def doc(self, path: Path) -> dict[str, D]:
        try:
            st = path.stat()
        except FileNotFoundError:
            self._key, self._doc = None, {}
            return self._doc
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            self._doc, self._key = self.load(path), key
        return self._doc


class RenewalWatch(FileWatch[object]):
    """certbot's renewal record (appliance.acme: the deploy hook and certbot.service's
    ExecStopPost write it), parsed again only when it changes, and certbot.service's last
    result, asked of systemd in a thread at most every `ttl` seconds."""

    def __init__(
        self,
        ttl: float,
        clock: Clock,
        ask: Callable[[], acme.UnitRun | None] = acme.certbot_unit_run,
    ) -> None:
        super().__init__(acme.load_status)
        self.ttl = ttl
        self.clock = clock
        self.ask = ask
        self._unit: acme.UnitRun | None = None
        self._asked: float | None = None
        self._asking: asyncio.Task[None] | None = None

    def unit(self) -> acme.UnitRun | None:
        """The last answer (None: not known yet); refreshed in the background when old."""
        old = self._asked is None or self.clock() - self._asked >= self.ttl
        if old and self._asking is None:
            self._asking = asyncio.create_task(self._ask())
        return self._unit

    async def _ask(self) -> None:
        try:
            self._unit = await asyncio.to_thread(self.ask)
        except Exception as e:
            log.warning("cannot ask systemd about %s: %s", acme.CERTBOT_UNIT, e)
        finally:
            self._asked, self._asking = self.clock(), None
