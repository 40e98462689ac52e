"""What a page's DevTools events say, sorted into what the appliance caused and what it did
not (pure functions over the events browser.py records).

The appliance's fault, for a page served from `origin`:
- a request to the page's own origin that failed (not cancelled by a navigation), was
  blocked, or answered >= 400, except the API's own 4xx answers (the app's business: a
  401 without a token, a 404 for an unknown id); nginx's 502/503/504 on /api/ are the
  appliance's;
- a Content-Security-Policy violation for something the app serves itself: its own
  origin's files, inline code, eval, data: or blob: URLs (the appliance sends the CSP);
- a WebSocket to the own origin whose handshake did not answer 101, or a frame error;
- a chunk the page could not load (webpack's ChunkLoadError, "Loading chunk ... failed").
Not the appliance's: whatever concerns another origin (Google sign-in, Telegram, fonts:
the sandbox has no Internet) and the app's own console errors and exceptions."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CHUNK_ERROR = re.compile(r"ChunkLoadError|Loading (CSS )?chunk \S+ failed")
OWN_SOURCES = ("inline", "eval", "wasm-eval", "data", "blob")


@dataclass(frozen=True)
class Event:
    t: float  # host time it arrived
    method: str
    params: dict[str, Any]


@dataclass
class Exchange:
    """One HTTP request and its answer (a redirect is an exchange of its own)."""

    request_id: str
    url: str
    kind: str  # Document, Script, Stylesheet, XHR, Fetch, ...
    t: float
    status: int | None = None
    error: str | None = None
    blocked: str | None = None
    canceled: bool = False


@dataclass
class Socket:
    request_id: str
    url: str
    created: float
    status: int | None = None
    closed: float | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class Problems:
    appliance: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


def same_origin(url: str, origin: str) -> bool:
    """Whether url is the page's own (any of http/https/ws/wss to its host, or data:/blob:)."""
    if url.startswith(("data:", "blob:")):
        return True
    return urlsplit(url).netloc == urlsplit(origin).netloc


def exchanges(events: list[Event]) -> list[Exchange]:
    done: list[Exchange] = []
    live: dict[str, Exchange] = {}
    for e in events:
        p = e.params
        rid = p.get("requestId", "")
        if e.method == "Network.requestWillBeSent":
            prev = live.pop(rid, None)
            if prev is not None and "redirectResponse" in p:
                prev.status = int(p["redirectResponse"]["status"])
                done.append(prev)
            live[rid] = Exchange(rid, p["request"]["url"], p.get("type", ""), e.t)
        elif e.method == "Network.responseReceived" and rid in live:
            live[rid].status = int(p["response"]["status"])
        elif e.method == "Network.loadingFailed" and rid in live:
            x = live[rid]
            x.error = p.get("errorText") or "failed"
            x.blocked = p.get("blockedReason")
            x.canceled = bool(p.get("canceled"))
    return done + sorted(live.values(), key=lambda x: x.t)


def websockets(events: list[Event]) -> list[Socket]:
    found: dict[str, Socket] = {}
    for e in events:
        p = e.params
        rid = p.get("requestId", "")
        if e.method == "Network.webSocketCreated":
            found[rid] = Socket(rid, p["url"], e.t)
        elif rid not in found:
            continue
        elif e.method == "Network.webSocketHandshakeResponseReceived":
            found[rid].status = int(p["response"]["status"])
        elif e.method == "Network.webSocketClosed":
            found[rid].closed = e.t
        elif e.method == "Network.webSocketFrameError":
            found[rid].errors.append(str(p.get("errorMessage")))
    return list(found.values())


def _exchange_problem(x: Exchange, origin: str) -> tuple[bool, str] | None:
    """(the appliance's?, what) for an exchange that went wrong, or None."""
    own = same_origin(x.url, origin)
    if x.error is not None and not x.canceled:
        why = f"blocked ({x.blocked})" if x.blocked else x.error
        return own, f"{x.kind} {x.url}: {why}"
    if x.status is not None and x.status >= 400:
        path = urlsplit(x.url).path
        apps_answer = path.startswith("/api/") and x.status < 500
        return own and not apps_answer, f"{x.kind} {x.url}: HTTP {x.status}"
    return None


def _text(args: list[dict[str, Any]]) -> str:
    return " ".join(str(a.get("value", a.get("description", a.get("type", "")))) for a in args)


def problems(events: list[Event], origin: str) -> Problems:
    out = Problems()

    def add(ours: bool, what: str) -> None:
        (out.appliance if ours else out.others).append(what)

    for x in exchanges(events):
        found = _exchange_problem(x, origin)
        if found:
            add(*found)
    for s in websockets(events):
        if s.status not in (None, 101) or s.errors:
            add(same_origin(s.url, origin), f"WebSocket {s.url}: {s.status} {s.errors}")
        elif s.status is None and s.closed is not None:
            add(same_origin(s.url, origin), f"WebSocket {s.url}: closed before its handshake")
    for e in events:
        p = e.params
        if e.method == "Runtime.bindingCalled" and p.get("name") == "__aipbxCsp":
            v = json.loads(p["payload"])
            blocked = str(v.get("blocked") or "")
            ours = blocked in OWN_SOURCES or same_origin(blocked, origin)
            add(ours, f"CSP {v.get('directive')} blocked {blocked or '?'} ({v.get('source')})")
        elif e.method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = str(d.get("exception", {}).get("description") or d.get("text"))
            add(bool(CHUNK_ERROR.search(text)), f"exception: {text.splitlines()[0]}")
        elif e.method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = _text(p.get("args", []))
            add(bool(CHUNK_ERROR.search(text)), f"console.error: {text[:300]}")
        elif e.method == "Log.entryAdded" and p["entry"].get("level") == "error":
            entry = p["entry"]
            text, url = str(entry.get("text", "")), str(entry.get("url") or "")
            if entry.get("source") == "network" or "Content Security Policy" in text:
                continue  # the exchange says it (with its status), the binding the CSP's
            ours = bool(CHUNK_ERROR.search(text)) or (bool(url) and same_origin(url, origin))
            add(ours, f"{entry.get('source')}: {text[:300]} {url}".rstrip())
    return out
