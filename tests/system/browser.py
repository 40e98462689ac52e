"""A real browser on the booted machine: Debian's chromium, headless, driven over the
DevTools protocol.

The machine has a private network, so chromium runs in its network namespace (`nsenter -t
PID1 -n`) with the host's filesystem (chromium is the host's: `apt install chromium`): it
reaches https://127.0.0.1/ as a browser on the machine would. It is driven over
`--remote-debugging-pipe` (its fds 3 and 4), so nothing has to connect the two namespaces.
Every other host name fails at once (`--host-resolver-rules`): the sandbox has no Internet,
and the app's calls to third parties (Google sign-in, Telegram, fonts) fail as they would
in any offline network.

What the page's session reports (requests, responses, WebSocket handshakes and closes,
console errors, exceptions, CSP violations through a binding) is kept with the host time it
arrived; browser_log.py sorts it into what the appliance caused and what it did not.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.system.browser_log import Event

CHROMIUM = "/usr/bin/chromium"
ORIGIN = "https://127.0.0.1"
# Every Content-Security-Policy violation the page sees, through a binding (its
# `securitypolicyviolation` event names the blocked URI and the directive).
CSP_HOOK = """
document.addEventListener('securitypolicyviolation', (e) => {
  window.__aipbxCsp(JSON.stringify({blocked: e.blockedURI, directive: e.effectiveDirective,
                                    source: e.sourceFile}));
});
"""


class BrowserError(AssertionError):
    """The browser did not do what was asked (it died, a command failed, a wait timed out)."""


class Browser:
    """One headless chromium with one page, in the network namespace of host PID `netns_pid`
    (the machine's init). A context manager: the browser is started on entry and closed
    (then killed if it lingers) on exit; its profile is a temporary directory."""

    def __init__(self, netns_pid: int, *, origin: str = ORIGIN) -> None:
        self.netns_pid = netns_pid
        self.origin = origin
        self.events: list[Event] = []
        self._profile = Path(tempfile.mkdtemp(prefix="aipbx-chromium-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._to_browser = -1
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._closed = False
        self._session = ""
        self._loads = 0  # Page.loadEventFired seen

    # -- lifecycle

    def __enter__(self) -> Browser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if not Path(CHROMIUM).exists():
            raise BrowserError(f"{CHROMIUM} is missing: apt install chromium")
        to_r, to_w = os.pipe()  # we write, chromium reads (its fd 3)
        from_r, from_w = os.pipe()  # chromium writes (its fd 4), we read
        argv = [
            "nsenter",
            "-t",
            str(self.netns_pid),
            "-n",
            "--",
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # as root
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            "--ignore-certificate-errors",  # the appliance's self-signed certificate
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--window-size=1366,900",
            "about:blank",
        ]
        # the pipes become the child's fds 3 and 4 (to_r < from_w: dup2 order is safe)
        wrapped = ["bash", "-c", 'exec 3<&"$0" 4>&"$1"; exec "${@:2}"', str(to_r), str(from_w)]
        with (self._profile / "chromium.log").open("wb") as logf:
            self._proc = subprocess.Popen(
                [*wrapped, *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                pass_fds=(to_r, from_w),
                start_new_session=True,
            )
        os.close(to_r)
        os.close(from_w)
        self._to_browser = to_w
        threading.Thread(target=self._read, args=(from_r,), daemon=True).start()
        pages = [
            t
            for t in self.send("Target.getTargets", browser=True, timeout=60)["targetInfos"]
            if t["type"] == "page"
        ]
        target = pages[0]["targetId"] if pages else self._new_target()
        attached = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True
        )
        self._session = attached["sessionId"]
        for method in ("Page.enable", "Network.enable", "Runtime.enable", "Log.enable"):
            self.send(method)
        self.send("Runtime.addBinding", {"name": "__aipbxCsp"})
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_HOOK})

    def _new_target(self) -> str:
        made = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        return str(made["targetId"])

    def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError):
                self.send("Browser.close", browser=True, timeout=5)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                # its own session: chromium (nsenter exec'd it) and the helpers it started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None
        if self._to_browser >= 0:
            with contextlib.suppress(OSError):
                os.close(self._to_browser)
            self._to_browser = -1
        shutil.rmtree(self._profile, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self._profile / "chromium.log").read_text(errors="replace")
        except OSError:
            return "(no chromium log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- the protocol

    def _read(self, fd: int) -> None:
        buf = b""
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    self._dispatch(json.loads(raw))
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        with self._cond:
            if "id" in msg:
                self._replies[msg["id"]] = msg
            elif msg.get("sessionId") == self._session and self._session:
                method, params = msg["method"], msg.get("params", {})
                self.events.append(Event(time.time(), method, params))
                if method == "Page.loadEventFired":
                    self._loads += 1
            self._cond.notify_all()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        browser: bool = False,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """A DevTools command to the page (or, with `browser`, to the browser); its result."""
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if not browser:
            msg["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "the browser exited" if self._closed else f"no reply in {timeout:.0f} s"
                    raise BrowserError(f"{method}: {why}\n{self.log_tail()}")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    # -- the page

    def open(self, path: str, *, timeout: float = 60) -> None:
        """Load origin+path as a new document (typed in the address bar) and wait for its
        load event and then for the network to be quiet."""
        with self._cond:
            loads = self._loads
        nav = self.send("Page.navigate", {"url": self.origin + path}, timeout=timeout)
        if nav.get("errorText"):
            raise BrowserError(f"navigating to {path}: {nav['errorText']}")
        self._wait(lambda: self._loads > loads, timeout, f"the load event of {path}")
        self.wait_quiet(timeout=timeout)

    def go(self, path: str) -> None:
        """A client-side route change, as the app's own links do (history.pushState and a
        popstate event, which react-router follows): no new document is loaded."""
        self.js(
            f"history.pushState({{}}, '', {json.dumps(path)});"
            "window.dispatchEvent(new PopStateEvent('popstate', {state: {}}))"
        )

    def js(self, expression: str, *, timeout: float = 30) -> Any:
        """Evaluate in the page (awaiting a promise); its value as JSON gives it."""
        r = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout=timeout,
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            raise BrowserError(f"in the page: {text}\n{expression}")
        return r["result"].get("value")

    def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a page expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.js(expression)
            if got:
                return got
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    def wait_quiet(self, *, quiet: float = 1.0, timeout: float = 60) -> None:
        """Until no request but Socket.IO's long polls has been in flight for `quiet` s."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                pending, last = _in_flight(self.events)
            idle_for = time.time() - last
            if not pending and idle_for >= quiet:
                return
            if time.monotonic() > deadline:
                raise BrowserError(f"the network is still busy after {timeout:.0f} s: {pending}")
            time.sleep(0.2)

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what}")
                self._cond.wait(left)

    def mark(self) -> int:
        """A point in the event log, for looking only at what came after it."""
        with self._cond:
            return len(self.events)

    def since(self, mark: int = 0) -> list[Event]:
        with self._cond:
            return list(self.events[mark:])

    def screenshot(self, path: Path) -> Path:
        shot = self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def _in_flight(events: list[Event]) -> tuple[list[str], float]:
    """URLs of requests still in flight and the host time of the newest network event, both
    leaving out Socket.IO (its long polls stay open, its WebSocket frames keep coming)."""
    open_: dict[str, str] = {}
    sio: set[str] = set()
    last = 0.0
    for e in events:
        if not e.method.startswith("Network."):
            continue
        rid = e.params.get("requestId", "")
        url = e.params.get("request", {}).get("url") or e.params.get("url") or ""
        if "/socket.io/" in url:
            sio.add(rid)
        if rid in sio:
            continue
        last = e.t
        if e.method == "Network.requestWillBeSent":
            open_[rid] = url
        elif e.method in ("Network.loadingFinished", "Network.loadingFailed"):
            open_.pop(rid, None)
    return sorted(open_.values()), last
