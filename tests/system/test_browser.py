"""Issue 16: the real aiPBX frontend (React + webpack, ../shared/realapp), built with npm and
packed as two frontend releases by tests/realapp/ (`make realapp-frontend`: N, and N+1 with
one lazily loaded route's chunk changed), served by the appliance with the real backend
behind it, in a real browser: Debian's chromium, headless, in the machine's network
namespace (tests/system/browser.py).

The page must load through https://127.0.0.1/ with nothing failing that the appliance
serves or blocks (browser_log.py says what counts: the app's calls to Google, Telegram and
font hosts fail in this network-less sandbox and are not the appliance's fault; they are
printed, not asserted); its own Socket.IO connection must open and stay up through a
backend upgrade until the drain, while its API calls all succeed; and a page loaded on N
must keep loading N's chunks once N+1 is live. Screenshots: build/browser/*.png.

The tests run in order on one machine."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system.appliance import aipbxctl_json, assert_no_failed_units, install, wait_until
from tests.system.browser import Browser
from tests.system.browser_log import Problems, Socket, exchanges, problems, websockets
from tests.system.machine import Machine
from tests.system.realapp import (
    APP_ENV,
    REALAPP_DIR,
    NotBuilt,
    app_info,
    artifact,
    copy_in,
    curl,
    env_file,
    jwt,
    live_color,
    psql,
    ws_on,
)

pytestmark = pytest.mark.system
SHOTS = Path(__file__).resolve().parents[2] / "build" / "browser"
FRONTEND_DIR = REALAPP_DIR / "frontend"
PROBATION_S, DRAIN_S = 3, 12


@pytest.fixture(scope="module")
def app() -> dict[str, Any]:
    try:
        return app_info()
    except NotBuilt as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def web() -> dict[str, Any]:
    """What tests/realapp/pack-frontend.sh packed: name, v1, v2, changed_route, marker,
    only_n and only_n1 (the JS files of one release the other lacks)."""
    info = FRONTEND_DIR / "frontend.json"
    if not info.is_file():
        pytest.fail(f"{info} is missing: run `make realapp-frontend`", pytrace=False)
    doc: dict[str, Any] = json.loads(info.read_text())
    return doc


def web_artifact(web: dict[str, Any], version: str) -> str:
    return f"/root/{web['name']}-{version}.tar.gz"


@pytest.fixture(scope="module", autouse=True)
def appliance(machine: Machine, deb: Path, app: dict[str, Any], web: dict[str, Any]) -> None:
    """The appliance with the real backend v1 and the real frontend N live."""
    copy_in(machine, app)
    for v in (web["v1"], web["v2"]):
        for suffix in ("", ".sha256"):
            src = FRONTEND_DIR / f"{web['name']}-{v}.tar.gz{suffix}"
            shutil.copy(src, machine.path("/root") / src.name)
    install(machine, deb)
    machine.run(["aipbxctl", "setup"], timeout=300)
    machine.run(["aipbxctl", "env", "set", *(f"{k}={v}" for k, v in APP_ENV.items())])
    aipbxctl_json(
        machine, "upgrade", artifact(app["v1"]), "--probation", "3", "--drain", "5", "--yes"
    )
    _, out = aipbxctl_json(machine, "upgrade", web_artifact(web, web["v1"]), "--yes")
    assert out["ok"] and out["kind"] == "frontend", out


@pytest.fixture(scope="module")
def browser(machine: Machine) -> Iterator[Browser]:
    with Browser(machine.pid1) as b:
        yield b


def assert_no_appliance_problem(found: Problems, what: str) -> None:
    # The app's calls to other origins fail here (no Internet): shown, never asserted.
    for line in found.others:
        print(f"{what}: not the appliance's: {line}")
    assert found.appliance == [], f"{what}: " + "\n".join(found.appliance)


def sio_sockets(browser: Browser, mark: int = 0) -> list[Socket]:
    """The page's Socket.IO WebSockets since `mark` whose handshake answered, as they are now."""
    return [s for s in websockets(browser.since(mark)) if "/socket.io/" in s.url and s.status]


def now(browser: Browser, sock: Socket) -> Socket:
    """`sock` as the browser's log says it is now (closed or not)."""
    (found,) = [s for s in websockets(browser.since()) if s.request_id == sock.request_id]
    return found


def page_text(browser: Browser) -> str:
    return str(browser.js("document.body ? document.body.innerText : ''"))


def shot(browser: Browser, name: str) -> None:
    path = browser.screenshot(SHOTS / f"{name}.png")
    print(f"screenshot: {path}")


# --- the tests -----------------------------------------------------------------------


def test_landing_page_and_deep_links_load(browser: Browser) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    browser.open("/")
    docs = [x for x in exchanges(browser.since()) if x.kind == "Document"]
    assert [x.status for x in docs] == [200], docs
    assert "AI" in str(browser.js("document.title"))
    assert len(page_text(browser)) > 200  # rendered, not an empty shell
    scripts = [x for x in exchanges(browser.since()) if x.kind == "Script" and x.status == 200]
    assert any("/main." in x.url for x in scripts), scripts
    shot(browser, "landing")
    assert_no_appliance_problem(problems(browser.since(), browser.origin), "/")

    # a deep link to a prerendered route, and one the SPA's fallback serves (index.html)
    for path, name, expect in (
        ("/pricing", "pricing", "Pricing"),
        ("/legal/privacy-policy", "privacy-policy", "PRIVACY POLICY"),
    ):
        mark = browser.mark()
        browser.open(path)
        docs = [x for x in exchanges(browser.since(mark)) if x.kind == "Document"]
        print(f"{path}: {[(x.url, x.status) for x in docs]}")
        assert docs and docs[-1].status == 200, docs
        browser.wait_js(
            f"document.body.innerText.toUpperCase().includes({json.dumps(expect.upper())})",
            30,
            f"{path} rendered",
        )
        shot(browser, name)
        assert_no_appliance_problem(problems(browser.since(mark), browser.origin), path)


def test_the_pages_own_socketio_connection_opens(machine: Machine, browser: Browser) -> None:
    """A signed-in user's /online page: its code (StatusPage) opens Socket.IO on the
    page's own origin, wss://127.0.0.1/socket.io/."""
    uid = psql(
        machine,
        'INSERT INTO users (email, password, name, "createdAt", "updatedAt") VALUES '
        "('browser-test@example.invalid', 'x', 'browser test', now(), now()) RETURNING id",
    ).splitlines()[0]
    # the role the app's routes ask for (it seeds the roles itself)
    psql(
        machine,
        """INSERT INTO user_roles ("userId", "roleId") """
        f"SELECT '{uid}', id FROM roles WHERE value = 'USER'",
    )
    token = jwt(
        env_file(machine)["PRIVATE_KEY"],
        {"id": int(uid), "roles": [{"value": "USER"}], "iat": int(time.time())},
    )
    if browser.js("location.origin") != browser.origin:
        browser.open("/")  # the origin's storage
    browser.js(f"localStorage.setItem('token', {json.dumps(token)})")
    mark = browser.mark()
    browser.open("/online")
    try:
        sock = wait_until(lambda: sio_sockets(browser, mark), 30, "the Socket.IO WebSocket")[0]
    except AssertionError:
        shot(browser, "online-failed")
        seen = [(x.url, x.status, x.error) for x in exchanges(browser.since(mark))]
        raise AssertionError(
            f"no Socket.IO WebSocket; the page at {browser.js('location.href')} "
            f"asked: {seen}; {problems(browser.since(mark), browser.origin)}"
        ) from None
    assert sock.status == 101 and sock.url.startswith("wss://127.0.0.1/socket.io/"), sock
    me = [x for x in exchanges(browser.since(mark)) if x.url.endswith("/api/users/me")]
    assert me and me[-1].status == 200, me  # signed in: the app asked who we are
    assert ws_on(machine, live_color(machine) or "blue") >= 1
    time.sleep(1)
    assert now(browser, sock).closed is None
    shot(browser, "online")
    assert_no_appliance_problem(problems(browser.since(mark), browser.origin), "/online")


# The page's own API calls, from the page, one every 0.8 s (the app's throttler allows a
# client 100 a minute): each call's status or error.
FETCH_LOOP = """
window.__aipbxApi = {results: [], run: true};
(async () => {
  const token = localStorage.getItem('token');
  while (window.__aipbxApi.run) {
    const t = Date.now() / 1000;
    try {
      const r = await fetch('/api/users/me', {headers: {Authorization: 'Bearer ' + token}});
      await r.text();
      window.__aipbxApi.results.push([t, r.status]);
    } catch (e) {
      window.__aipbxApi.results.push([t, String(e)]);
    }
    await new Promise((ok) => setTimeout(ok, 800));
  }
})();
true
"""


def test_a_backend_upgrade_under_the_open_page(
    machine: Machine, browser: Browser, app: dict[str, Any]
) -> None:
    """Issue 16 item 4: the page's Socket.IO connection stays on the old color until the
    drain ends, then reconnects to the new one; its API calls meanwhile all succeed."""
    old = live_color(machine)
    assert old is not None
    first = [s for s in sio_sockets(browser) if s.status == 101 and s.closed is None]
    assert len(first) == 1, first
    sock = first[0]
    mark = browser.mark()
    browser.js(FETCH_LOOP)
    result: dict[str, Any] = {}

    def upgrade() -> None:
        result["code"], result["out"] = aipbxctl_json(
            machine,
            "upgrade",
            artifact(app["v2"]),
            "--probation",
            str(PROBATION_S),
            "--drain",
            str(DRAIN_S),
            "--yes",
            check=False,
        )

    t = threading.Thread(target=upgrade)
    t.start()
    wait_until(lambda: live_color(machine) not in (None, old), 300, "the switch")
    switched_at = time.time()
    # the page's connection stays where it was, on the old color, through the switch
    assert ws_on(machine, old) >= 1
    assert now(browser, sock).closed is None
    t.join(300)
    assert result.get("code") == 0, result
    assert result["out"]["release"] == f"aipbx-{app['v2']}", result
    new = live_color(machine)
    # the old color was stopped at the drain's end (the page held it), and not before
    closed = wait_until(lambda: now(browser, sock).closed, 10, "the old color's WebSocket cut")
    assert closed >= switched_at + PROBATION_S + DRAIN_S - 2, (closed, switched_at)
    # Socket.IO reconnects, to the new color
    again = wait_until(
        lambda: [s for s in sio_sockets(browser, mark) if s.status == 101 and s.closed is None],
        30,
        "the page's Socket.IO connection to the new color",
    )
    assert len(again) == 1, again
    wait_until(lambda: ws_on(machine, str(new)) >= 1, 30, "a WebSocket on the new color")
    browser.js("window.__aipbxApi.run = false")
    time.sleep(1)
    calls = browser.js("window.__aipbxApi.results")
    during = [c for c in calls if c[0] <= closed]
    print(
        f"backend upgrade under the page: {len(calls)} API calls ({len(during)} before the "
        f"drain's end), statuses {sorted({str(c[1]) for c in calls})}; Socket.IO on {old} "
        f"until {closed - switched_at:.1f} s after the switch"
    )
    assert len(during) >= 10, calls
    assert [c for c in calls if c[1] != 200] == [], calls
    shot(browser, "online-after-backend-upgrade")
    assert_no_appliance_problem(problems(browser.since(mark), browser.origin), "upgrade")
    assert_no_failed_units(machine)


def test_a_page_loaded_on_n_still_loads_its_chunks_once_n1_is_live(
    machine: Machine, browser: Browser, web: dict[str, Any]
) -> None:
    """Issue 16 item 3: a tab opened on release N asks for a chunk of N by its hashed name
    after N+1 went live (a route it had not visited): it must get it, not a 404 and a
    ChunkLoadError. A new page gets N+1. Hashed assets are cached for good, index.html
    never."""
    route, marker = web["changed_route"], web["marker"]
    (old_chunk,) = [f for f in web["only_n"] if not f.startswith("main.")]
    (new_main,) = [f for f in web["only_n1"] if f.startswith("main.")]
    browser.open("/")  # a page on N
    mark = browser.mark()
    assert not [x for x in exchanges(browser.since()) if old_chunk in x.url]
    _, out = aipbxctl_json(machine, "upgrade", web_artifact(web, web["v2"]), "--yes")
    assert out["ok"] and out["kind"] == "frontend", out
    browser.go(route)  # the app's own navigation: N's runtime asks for N's chunk
    try:
        browser.wait_js(
            "document.body.innerText.includes('TERMS OF SERVICE')", 20, f"{route} rendered"
        )
    finally:
        shot(browser, "terms-after-frontend-upgrade")
        found = problems(browser.since(mark), browser.origin)
        print(f"after the frontend upgrade: {found}")
    # The app reloads itself once on a ChunkLoadError (its ErrorBoundary), losing the
    # tab's state: the page must not have been loaded again.
    reloads = [x.url for x in exchanges(browser.since(mark)) if x.kind == "Document"]
    assert reloads == [], reloads
    fetched = [x for x in exchanges(browser.since(mark)) if old_chunk in x.url]
    assert [x.status for x in fetched] == [200], fetched
    assert marker not in page_text(browser)  # N's chunk, as the page's runtime asked
    assert [x for x in exchanges(browser.since(mark)) if x.status == 404] == []
    assert_no_appliance_problem(found, "after the frontend upgrade")

    status, headers, _ = curl(machine, f"/{old_chunk}", "-I")
    assert status == 200, (old_chunk, status)
    cache = ",".join(headers.get("cache-control", []))
    assert "public" in cache and "immutable" in cache, headers
    for path in ("/", route):
        status, headers, body = curl(machine, path)
        assert status == 200 and new_main.encode() in body, (path, status)
        cache = ",".join(headers.get("cache-control", []))
        assert "no-cache" in cache or "no-store" in cache, (path, headers)

    # a new page gets N+1: its main, and the changed route's new chunk
    mark = browser.mark()
    browser.open("/")
    assert [x for x in exchanges(browser.since(mark)) if new_main in x.url]
    browser.go(route)
    browser.wait_js(f"document.body.innerText.includes({json.dumps(marker)})", 20, "N+1's chunk")
    shot(browser, "terms-on-n1")
