"""The browser tests' judge (tests/system/browser_log.py): what a page's DevTools events say
the appliance caused, and what it did not."""

from __future__ import annotations

import json
from typing import Any

from tests.system.browser_log import Event, exchanges, problems, same_origin, websockets

ORIGIN = "https://127.0.0.1"


def request(rid: str, url: str, kind: str = "Script", t: float = 1.0, **extra: Any) -> Event:
    return Event(
        t,
        "Network.requestWillBeSent",
        {"requestId": rid, "request": {"url": url}, "type": kind, **extra},
    )


def response(rid: str, status: int) -> Event:
    return Event(
        2.0, "Network.responseReceived", {"requestId": rid, "response": {"status": status}}
    )


def failed(rid: str, error: str, **extra: Any) -> Event:
    return Event(2.0, "Network.loadingFailed", {"requestId": rid, "errorText": error, **extra})


def test_same_origin() -> None:
    assert same_origin("https://127.0.0.1/main.js", ORIGIN)
    assert same_origin("wss://127.0.0.1/socket.io/?EIO=4", ORIGIN)
    assert same_origin("data:font/woff2;base64,AAAA", ORIGIN)
    assert not same_origin("https://accounts.google.com/gsi/client", ORIGIN)
    assert not same_origin("https://127.0.0.1:8443/x", ORIGIN)


def test_own_failures_are_the_appliances_third_party_ones_are_not() -> None:
    events = [
        request("1", "https://127.0.0.1/", "Document"),
        response("1", 200),
        request("2", "https://127.0.0.1/8629.abc.js"),
        response("2", 404),
        request("3", "https://accounts.google.com/gsi/client"),
        failed("3", "net::ERR_NAME_NOT_RESOLVED"),
        request("4", "https://127.0.0.1/api/users/me", "Fetch"),
        response("4", 401),  # the app's answer
        request("5", "https://127.0.0.1/api/prices/public", "Fetch"),
        response("5", 503),  # nginx: no backend
        request("6", "https://127.0.0.1/css/main.css", "Stylesheet"),
        failed("6", "net::ERR_ABORTED", canceled=True),  # a navigation cancelled it
        request("7", "https://127.0.0.1/x.js"),
        failed("7", "net::ERR_BLOCKED_BY_CLIENT", blockedReason="csp"),
    ]
    found = problems(events, ORIGIN)
    assert found.appliance == [
        "Script https://127.0.0.1/8629.abc.js: HTTP 404",
        "Fetch https://127.0.0.1/api/prices/public: HTTP 503",
        "Script https://127.0.0.1/x.js: blocked (csp)",
    ]
    assert found.others == [
        "Script https://accounts.google.com/gsi/client: net::ERR_NAME_NOT_RESOLVED",
        "Fetch https://127.0.0.1/api/users/me: HTTP 401",
    ]


def test_a_redirect_is_an_exchange_of_its_own() -> None:
    events = [
        request("1", "https://127.0.0.1/pricing", "Document"),
        request(
            "1", "https://127.0.0.1/pricing/", "Document", t=1.5, redirectResponse={"status": 301}
        ),
        response("1", 200),
    ]
    assert [(x.url, x.status) for x in exchanges(events)] == [
        ("https://127.0.0.1/pricing", 301),
        ("https://127.0.0.1/pricing/", 200),
    ]
    assert problems(events, ORIGIN).appliance == []


def test_csp_violations_by_what_was_blocked() -> None:
    def csp(blocked: str) -> Event:
        payload = json.dumps({"blocked": blocked, "directive": "script-src", "source": ""})
        return Event(1.0, "Runtime.bindingCalled", {"name": "__aipbxCsp", "payload": payload})

    found = problems(
        [csp("inline"), csp("https://127.0.0.1/a.js"), csp("https://js.stripe.com/v3")], ORIGIN
    )
    assert len(found.appliance) == 2 and "inline" in found.appliance[0]
    assert len(found.others) == 1 and "stripe" in found.others[0]


def test_chunk_load_errors_and_websockets() -> None:
    events = [
        Event(
            1.0,
            "Runtime.exceptionThrown",
            {
                "exceptionDetails": {
                    "exception": {
                        "description": "ChunkLoadError: Loading chunk 8629 failed.\n(missing: x)"
                    }
                }
            },
        ),
        Event(
            1.0,
            "Runtime.consoleAPICalled",
            {"type": "error", "args": [{"value": "Playground error"}]},
        ),
        Event(
            1.0,
            "Log.entryAdded",
            {
                "entry": {
                    "level": "error",
                    "source": "network",
                    "text": "Failed to load resource: 401",
                    "url": "https://127.0.0.1/api/users/me",
                }
            },
        ),
        Event(
            1.0,
            "Network.webSocketCreated",
            {"requestId": "w1", "url": "wss://127.0.0.1/socket.io/?EIO=4"},
        ),
        Event(
            1.1,
            "Network.webSocketHandshakeResponseReceived",
            {"requestId": "w1", "response": {"status": 101}},
        ),
        Event(5.0, "Network.webSocketClosed", {"requestId": "w1"}),
        Event(
            6.0,
            "Network.webSocketCreated",
            {"requestId": "w2", "url": "wss://127.0.0.1/socket.io/?EIO=4"},
        ),
        Event(6.1, "Network.webSocketClosed", {"requestId": "w2"}),
    ]
    socks = websockets(events)
    assert [(s.status, s.closed) for s in socks] == [(101, 5.0), (None, 6.1)]
    found = problems(events, ORIGIN)
    assert found.appliance == [
        "WebSocket wss://127.0.0.1/socket.io/?EIO=4: closed before its handshake",
        "exception: ChunkLoadError: Loading chunk 8629 failed.",
    ]
    assert found.others == ["console.error: Playground error"]
