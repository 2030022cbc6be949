"""The dashboard (``/ui/``) in a real headless Chromium driven by selenium, over
a real ``python -m midway --config`` with two proxies to an echo server: it loads
with no console error, lists the proxies, its throughput graph follows a known
load, the toxic form slows round trips by the latency asked and removing the
toxic restores them, a kill closes exactly that connection, it keeps working
through a reload, and it says when midway has gone away (and when it is back); a
toxic added to one connection from its row and removed there; the focus kept
through the redraws and the headers sorting from the keyboard; no sideways
scrolling at a phone's width; markup in a name shown as text, and what another
site's page can send without a preflight changing nothing.  Then the files as served (content types, policy,
no path escapes) and ``GET /toxic-types``.

With ``MIDWAY_SCREENSHOTS=DIR`` the load test saves the page to DIR/dashboard.png
(the README's picture)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from midway.chain.toxics import TOXICS

from ..helpers import ProxyProcess, free_port, http_server, needs
from ..helpers import wait_until as _wait_until
from .conftest import Admin, EchoServer, checked_route, port_of, round_trip
from .screenshots import save_small_png

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
except ImportError:  # the test extra has it; without it these tests are skipped
    webdriver = None

    class StaleElementReferenceException(Exception):  # type: ignore[no-redef]
        """Never raised without selenium."""

browser_missing = pytest.mark.skipif(
    webdriver is None or not CHROMIUM or not CHROMEDRIVER,
    reason=needs("headless Chromium and selenium", apt="chromium chromium-driver",
                 pip="selenium"))

UI_WAIT_S = 10.0
"""How long the page may take to show a change: it polls each second."""


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """:func:`tests.helpers.wait_until` for the page: an element the page
    replaced while the predicate read it (it redraws each second) means "not
    yet", not a failure."""
    def settled() -> bool:
        try:
            return bool(predicate())
        except StaleElementReferenceException:
            return False
    return _wait_until(settled, timeout)


@dataclass
class Midway:
    process: ProxyProcess
    admin: Admin

    def port(self, proxy: str) -> int:
        return port_of(self.admin.get(f"/proxies/{proxy}").json["listen"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}/ui/"


def start_midway(tmp_path: Path, echo: EchoServer, admin_port: int = 0,
                 extra: str = "", web: str = "") -> Midway:
    """midway with proxies web and cache to ``echo``; ``extra`` goes in
    ``[server]``, ``web`` after ``[proxy.web]``."""
    config = tmp_path / "midway.toml"
    config.write_text(f"""
[server]
admin = "127.0.0.1:{admin_port}"
{extra}
[proxy.web]
listen = "127.0.0.1:0"
upstreams = "{echo.address}"
{web}
[proxy.cache]
listen = "127.0.0.1:0"
upstreams = "{echo.address}"
""")
    process = ProxyProcess("--config", str(config))
    admin = Admin(process)
    assert wait_until(lambda: any("admin API" in line for line in process.stderr_lines), 10)
    admin.port = int(next(line for line in process.stderr_lines if "admin API" in line)
                     .rsplit(":", 1)[1])
    return Midway(process, admin)


@pytest.fixture
def midway(tmp_path: Path, echo: EchoServer) -> Iterator[Midway]:
    running = start_midway(tmp_path, echo)
    yield running
    running.process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: Any, midway: Midway) -> None:
    browser.get(midway.url)
    browser.get_log("browser")  # start each test with empty logs
    browser.get_log("performance")
    assert wait_until(lambda: browser.find_element(By.TAG_NAME, "body")
                      .get_attribute("data-connected") == "true", UI_WAIT_S)


def proxies_shown(browser: Any) -> list[str]:
    """The proxies' sections on the page, read in one step: the page redraws them
    each second, so an element found before a redraw may be gone when read."""
    names: list[str] = browser.execute_script(
        "return [...document.querySelectorAll('section.proxy')].map(s => s.dataset.proxy)")
    return names


def section(browser: Any, proxy: str) -> Any:
    return browser.find_element(By.CSS_SELECTOR, f'section.proxy[data-proxy="{proxy}"]')


def console_errors(browser: Any) -> list[dict[str, Any]]:
    """Console errors, less the one the page expects from a midway without
    /connections (it asks, gets 404 and says "not available")."""
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
            and not ("/connections " in e["message"] and "404" in e["message"])]


def failed_requests(browser: Any) -> list[tuple[str, str, str]]:
    """(method, url, error) of each request the browser saw fail since the
    last call (DevTools' Network.loadingFailed: what its network panel shows
    in red), from the performance log."""
    sent: dict[str, tuple[str, str]] = {}
    failed = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = (params["request"]["method"], params["request"]["url"])
        elif message["method"] == "Network.loadingFailed":
            failed.append((*sent.get(params["requestId"], ("?", "?")), params["errorText"]))
    return failed


def timed_round_trip(port: int) -> float:
    start = time.monotonic()
    assert round_trip(port, b"x" * 100) == b"x" * 100
    return time.monotonic() - start


@browser_missing
def test_page_loads_clean_and_lists_the_proxies(browser: Any, midway: Midway,
                                                echo: EchoServer) -> None:
    browser.get(f"http://127.0.0.1:{midway.admin.port}/")  # / sends a browser to /ui/
    assert wait_until(lambda: browser.find_element(By.TAG_NAME, "body")
                      .get_attribute("data-connected") == "true", UI_WAIT_S)
    assert browser.current_url == midway.url
    assert proxies_shown(browser) == ["cache", "web"]
    web = section(browser, "web")
    assert f"127.0.0.1:{midway.port('web')}" in web.find_element(By.CSS_SELECTOR, ".addresses").text
    # Its upstream, up (no health checks configured: none has run).
    assert wait_until(lambda: [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                               for tr in section(browser, "web").find_elements(
                                   By.CSS_SELECTOR, "table.upstreams tbody tr")]
                      == [[echo.address, "up", "1", "", "0", "none"]], UI_WAIT_S)
    # The toxic form is built from GET /toxic-types: every type, with units.
    types = [o.text for o in Select(web.find_element(By.NAME, "type")).options]
    assert types == list(TOXICS)
    assert "milliseconds" in web.find_element(By.CSS_SELECTOR, ".attributes").text
    time.sleep(2.5)  # a few polls, each of which could log an error
    if os.environ.get("MIDWAY_SCREENSHOTS"):
        screenshot(browser, midway, Path(os.environ["MIDWAY_SCREENSHOTS"]) / "dashboard.png")
    assert console_errors(browser) == []
    assert failed_requests(browser) == []


SCREENSHOT_WIDTH = 1024


def test_an_sni_route_s_upstreams_are_shown_with_their_route(browser: Any, tmp_path: Path,
                                                             echo: EchoServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    running = start_midway(tmp_path, echo, web=checked_route(dead))
    try:
        open_page(browser, running)

        def rows() -> list[list[str]]:
            found: list[list[str]] = browser.execute_script(
                "return [...document.querySelectorAll('section.proxy[data-proxy=\"web\"] "
                "table.upstreams tbody tr')].map(tr => [...tr.cells].map(td => td.textContent))")
            return [row[:2] for row in found]

        # The route's upstream, down, says its route; the proxy's own says none.
        assert wait_until(lambda: rows() == [[echo.address, "up"],
                                             [f"{dead} (route api)", "down"]], UI_WAIT_S), rows()
        assert console_errors(browser) == []
    finally:
        running.process.stop()


def screenshot(browser: Any, midway: Midway, path: Path) -> None:
    """The README's picture: a latency toxic on cache, a connection to each
    proxy and a third pushing data through web; the whole page, 1024 pixels wide,
    as a small indexed PNG."""
    assert midway.admin.post("/proxies/cache/toxics", {
        "type": "latency", "attributes": {"latency": 20}}).status == 200
    idle = [socket.create_connection(("127.0.0.1", midway.port(name)), timeout=5)
            for name in ("web", "cache")]
    size = browser.get_window_size()
    try:
        with socket.create_connection(("127.0.0.1", midway.port("web")), timeout=5) as busy:
            for sock in (*idle, busy):
                sock.sendall(b"hello")
                assert sock.recv(10) == b"hello"
            rows = "#connections tbody tr"
            assert wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, rows)) == 3
                              and browser.find_elements(By.CSS_SELECTOR, "tr[data-toxic]"),
                              UI_WAIT_S)
            # The window as tall as the page, so the picture has all of it.
            browser.set_window_size(SCREENSHOT_WIDTH, size["height"])
            chrome = browser.execute_script("return window.outerHeight - window.innerHeight")
            page = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(SCREENSHOT_WIDTH, page + chrome)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:  # some traffic for the graphs
                busy.sendall(b"x" * 200_000)
                got = 0
                while got < 200_000:
                    got += len(busy.recv(1 << 20))
                time.sleep(0.05)
            save_small_png(browser.get_screenshot_as_png(), path)
    finally:
        for sock in idle:
            sock.close()
        browser.set_window_size(size["width"], size["height"])


@browser_missing
def test_throughput_graph_follows_a_known_load(browser: Any, midway: Midway) -> None:
    open_page(browser, midway)
    rate = 2 << 20  # bytes per second, each way (the echo sends it back)
    piece, interval = rate // 10, 0.1
    seen_up: list[int] = []
    seen_down: list[int] = []
    with socket.create_connection(("127.0.0.1", midway.port("web")), timeout=5) as sock:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            sock.sendall(b"y" * piece)
            got = 0
            while got < piece:
                got += len(sock.recv(1 << 20))
            web = section(browser, "web")
            seen_up.append(int(web.get_attribute("data-rate-up")))
            seen_down.append(int(web.get_attribute("data-rate-down")))
            time.sleep(interval)
    # The page's rate is bytes between two /metrics polls over their interval:
    # under a loaded machine the load itself is uneven, hence the wide band.
    assert rate / 3 < max(seen_up) < rate * 3, seen_up
    assert rate / 3 < max(seen_down) < rate * 3, seen_down
    assert int(section(browser, "cache").get_attribute("data-rate-up")) == 0
    # Once the load stops the graph falls back to nothing.
    assert wait_until(lambda: section(browser, "web").get_attribute("data-rate-up") == "0",
                      UI_WAIT_S)


@browser_missing
def test_latency_toxic_from_the_form_slows_round_trips_and_removing_restores(
        browser: Any, midway: Midway) -> None:
    port = midway.port("web")
    before = min(timed_round_trip(port) for _ in range(3))
    open_page(browser, midway)
    web = section(browser, "web")
    Select(web.find_element(By.NAME, "type")).select_by_visible_text("latency")
    latency = web.find_element(By.NAME, "attr-latency")
    latency.clear()
    latency.send_keys("300")
    web.find_element(By.CSS_SELECTOR, ".toxic-form .submit").click()
    assert wait_until(lambda: [t["attributes"]["latency"] for t in
                               midway.admin.get("/proxies/web").json["toxics"]] == [300], 5)
    assert wait_until(lambda: len(section(browser, "web").find_elements(
        By.CSS_SELECTOR, 'tr[data-toxic="latency_downstream"]')) == 1, UI_WAIT_S)
    slowed = min(timed_round_trip(port) for _ in range(2))
    assert 0.3 <= slowed < 0.3 + before + 0.25, (before, slowed)
    assert midway.admin.get("/proxies/cache").json["toxics"] == []

    section(browser, "web").find_element(
        By.CSS_SELECTOR, 'tr[data-toxic="latency_downstream"] button.remove').click()
    assert wait_until(lambda: midway.admin.get("/proxies/web").json["toxics"] == [], 5)
    assert min(timed_round_trip(port) for _ in range(3)) < 0.15
    assert console_errors(browser) == []
    assert failed_requests(browser) == []


@browser_missing
def test_editing_a_toxic_changes_its_attributes(browser: Any, midway: Midway) -> None:
    assert midway.admin.post("/proxies/web/toxics", {
        "type": "bandwidth", "attributes": {"rate": 100}}).status == 200
    open_page(browser, midway)
    row = 'tr[data-toxic="bandwidth_downstream"]'
    assert wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, row)) == 1, UI_WAIT_S)
    browser.find_element(By.CSS_SELECTOR, f"{row} button.edit").click()
    rate = section(browser, "web").find_element(By.NAME, "attr-rate")
    assert rate.get_attribute("value") == "100"
    rate.clear()
    rate.send_keys("250")
    section(browser, "web").find_element(By.CSS_SELECTOR, ".toxic-form .submit").click()
    assert wait_until(lambda: midway.admin.get("/proxies/web/toxics/bandwidth_downstream")
                      .json["attributes"] == {"rate": 250}, 5)


@browser_missing
def test_names_are_shown_as_text_never_as_html(browser: Any, midway: Midway) -> None:
    """Names come from whoever can reach the API or write the file: markup in
    one is shown as the characters it is made of."""
    name = "<b>x<i>y\"'&amp;<img>"
    assert midway.admin.post("/proxies/web/toxics", {"name": name, "type": "latency"}
                             ).status == 200
    open_page(browser, midway)
    shown = ("return [...document.querySelectorAll('tr[data-toxic]')]"
             ".filter(r => r.dataset.toxic === arguments[0]).map(r => r.cells[0].textContent)")
    assert wait_until(lambda: browser.execute_script(shown, name) == [name], UI_WAIT_S)
    assert browser.find_elements(By.CSS_SELECTOR, "tr[data-toxic] :is(b, i, img)") == []
    assert console_errors(browser) == []


@browser_missing
def test_another_site_cannot_change_anything(browser: Any, midway: Midway,
                                            tmp_path: Path) -> None:
    """What a page of another site can send without a preflight (a form's POST,
    a no-cors fetch, an image's GET) is refused: nothing changes."""
    api = f"http://127.0.0.1:{midway.admin.port}"
    (tmp_path / "index.html").write_text("<title>evil</title><iframe name=sink></iframe>")
    with http_server(tmp_path) as port:
        browser.get(f"http://localhost:{port}/")  # another site than 127.0.0.1
    body = json.dumps({"name": "pwn", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"})
    outcome = browser.execute_async_script("""
        // The form's text/plain body is NAME=VALUE: {"type":"latency","name":"pwn="}
        const [api, body, done] = arguments;
        const sent = [];
        for (const [path, data] of [['/proxies', body], ['/reset', ''],
                                    ['/proxies/web', '{"enabled":false}']])
          sent.push(fetch(api + path, {method: 'POST', mode: 'no-cors', body: data,
                                       headers: {'X-Midway-UI': '1', 'Content-Type': 'text/plain'}})
                    .then(() => 'answered', (e) => String(e)));
        sent.push(new Promise((ok) => { const img = new Image();
          img.onload = img.onerror = () => ok('answered'); img.src = api + '/proxies/web'; }));
        Promise.all(sent).then((results) => {
          const form = document.createElement('form');
          Object.assign(form, {method: 'POST', action: api + '/proxies/web/toxics',
                               target: 'sink', enctype: 'text/plain'});
          const field = document.createElement('input');
          Object.assign(field, {name: '{"type":"latency","name":"pwn', value: '"}'});
          form.append(field);
          document.body.append(form);
          document.querySelector('iframe').onload = () => done(results);
          form.submit();
        });
    """, api, body)
    assert outcome == ["answered"] * 4
    assert sorted(midway.admin.get("/proxies").json) == ["cache", "web"]
    web = midway.admin.get("/proxies/web").json
    assert web["enabled"] and web["toxics"] == []


@browser_missing
def test_kill_from_the_table_closes_exactly_that_connection(browser: Any,
                                                            midway: Midway) -> None:
    port = midway.port("web")
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(b"hi")
            assert sock.recv(10) == b"hi"
        victim = socks[1]
        client = f"127.0.0.1:{victim.getsockname()[1]}"
        open_page(browser, midway)

        def row() -> Any:
            for tr in browser.find_elements(By.CSS_SELECTOR, "#connections tbody tr"):
                if tr.find_elements(By.XPATH, f'td[text()="{client}"]'):
                    return tr
            return None

        assert wait_until(lambda: row() is not None, UI_WAIT_S)
        row().find_element(By.CSS_SELECTOR, "button.kill").click()
        try:
            assert victim.recv(10) == b""
        except ConnectionResetError:
            pass
        for sock in (socks[0], socks[2]):  # the neighbours keep flowing
            sock.sendall(b"still")
            assert sock.recv(10) == b"still"
        assert failed_requests(browser) == []
    finally:
        for sock in socks:
            sock.close()


@browser_missing
def test_page_says_disconnected_while_midway_is_gone(browser: Any, tmp_path: Path,
                                                     echo: EchoServer) -> None:
    admin_port = free_port()
    midway = start_midway(tmp_path, echo, admin_port)
    try:
        open_page(browser, midway)
        banner = browser.find_element(By.ID, "banner")
        assert not banner.is_displayed()
        midway.process.stop()
        assert wait_until(lambda: banner.is_displayed(), UI_WAIT_S)
        assert "disconnected" in banner.text
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-connected") == "false"
        # midway back on the same address: the banner goes, the proxies come back.
        midway = start_midway(tmp_path, echo, admin_port)
        assert wait_until(lambda: not banner.is_displayed(), UI_WAIT_S)
        assert browser.find_elements(By.CSS_SELECTOR, 'section.proxy[data-proxy="web"]')
    finally:
        midway.process.stop()


@browser_missing
def test_page_asks_for_the_token(browser: Any, tmp_path: Path, echo: EchoServer) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    midway = start_midway(tmp_path, echo, extra=f'admin_token_file = "{token}"')
    try:
        browser.get(midway.url)
        browser.execute_script("sessionStorage.clear()")
        browser.refresh()
        form = browser.find_element(By.ID, "token-form")
        assert wait_until(form.is_displayed, UI_WAIT_S)
        assert not browser.find_elements(By.CSS_SELECTOR, "section.proxy")
        browser.find_element(By.ID, "token").send_keys("s3cret")
        form.find_element(By.TAG_NAME, "button").click()
        assert wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "section.proxy"))
                          == 2, UI_WAIT_S)
        assert not form.is_displayed()
        browser.execute_script("sessionStorage.clear()")
    finally:
        midway.process.stop()


# -- the files as served, and /toxic-types (no browser needed) ---------------------

def test_files_are_served_with_their_types_and_policy(midway: Midway) -> None:
    for path, kind in [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                       ("/ui/style.css", "text/css")]:
        reply = midway.admin.request("GET", path, headers={"User-Agent": "Mozilla/5.0"})
        assert reply.status == 200, path
        assert reply.headers["Content-Type"].startswith(kind)
        assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
    root = midway.admin.get("/")
    assert root.status == 302 and root.headers["Location"] == "/ui/"
    for path in ("/ui/../routes.py", "/ui/%2e%2e/routes.py", "/ui/nope.js", "/ui/.hidden.js",
                 "/ui/sub/app.js"):
        assert midway.admin.get(path).status == 404, path
    # Toxiproxy's routes are as they were: / is not one of them.
    assert midway.admin.request("POST", "/").status == 404


def test_browsers_get_the_api_only_from_the_page(midway: Midway) -> None:
    browser_ua = {"User-Agent": "Mozilla/5.0"}
    assert midway.admin.request("GET", "/proxies", headers=browser_ua).status == 403
    assert midway.admin.request("GET", "/proxies", headers={
        **browser_ua, "X-Midway-UI": "1", "Sec-Fetch-Site": "cross-site"}).status == 403
    assert midway.admin.request("GET", "/proxies", headers={
        **browser_ua, "X-Midway-UI": "1", "Sec-Fetch-Site": "same-origin"}).status == 200


def test_toxic_types_describe_every_toxic(midway: Midway) -> None:
    types = midway.admin.get("/toxic-types").json
    assert [t["type"] for t in types] == list(TOXICS)
    latency = next(t for t in types if t["type"] == "latency")
    assert [(a["name"], a["default"], a["unit"], a["integer"]) for a in latency["attributes"]] \
        == [("latency", 0, "milliseconds", True), ("jitter", 0, "milliseconds", True)]
    # The defaults are what a toxic created without attributes gets; where a
    # default (Toxiproxy's) is below the minimum, the API refuses it, naming it.
    for kind in types:
        made = midway.admin.post("/proxies/web/toxics", {"type": kind["type"], "name": "t",
                                                        "attributes": {}})
        low = [a["name"] for a in kind["attributes"] if a["default"] < a["minimum"]]
        if low:
            assert made.status == 400 and f"attributes.{low[0]}" in made.json["error"], kind
            continue
        assert made.status == 200, (kind, made.body)
        assert made.json["attributes"] == {a["name"]: a["default"]
                                           for a in kind["attributes"]}, kind
        assert midway.admin.delete("/proxies/web/toxics/t").status == 204


@browser_missing
def test_page_keeps_working_while_midway_reloads(browser: Any, tmp_path: Path,
                                                 echo: EchoServer) -> None:
    """A reload (SIGHUP) that adds a proxy and removes one: the page never says
    it is disconnected, shows the new proxy and drops the removed one, and a
    connection open through the reload stays in its table."""
    midway = start_midway(tmp_path, echo)
    try:
        open_page(browser, midway)
        banner = browser.find_element(By.ID, "banner")
        with socket.create_connection(("127.0.0.1", midway.port("web")), timeout=5) as client:
            client.sendall(b"hello")
            assert client.recv(10) == b"hello"
            rows = "#connections tbody tr"
            assert wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, rows)) == 1,
                              UI_WAIT_S)
            config = tmp_path / "midway.toml"
            config.write_text(config.read_text().replace("[proxy.cache]", "[proxy.db]"))
            reloads = midway.process.stderr_text().count("reload: done")
            midway.process.signal(signal.SIGHUP)
            deadline = time.monotonic() + UI_WAIT_S
            shown: list[str] = []
            while time.monotonic() < deadline:
                assert not banner.is_displayed(), "the page said disconnected during a reload"
                shown = proxies_shown(browser)
                if shown == ["db", "web"]:
                    break
                time.sleep(0.1)
            assert shown == ["db", "web"]
            assert midway.process.stderr_text().count("reload: done") == reloads + 1
            assert len(browser.find_elements(By.CSS_SELECTOR, rows)) == 1
            client.sendall(b"after")  # the connection lived through the reload
            assert client.recv(10) == b"after"
        assert console_errors(browser) == []
    finally:
        midway.process.stop()


# -- per-connection toxics, keyboard, narrow windows ----------------------------------

def echo_time(sock: socket.socket) -> float:
    start = time.monotonic()
    sock.sendall(b"z" * 10)
    got = b""
    while len(got) < 10:
        got += sock.recv(100)
    return time.monotonic() - start


def click(browser: Any, css: str) -> None:
    """Click the element ``css`` names, found and clicked at once: the page
    redraws its rows each second, so an element found first may be gone by the
    time a separate click reaches it."""
    browser.execute_script("document.querySelector(arguments[0]).click()", css)


def connection_row(browser: Any, client: str) -> Any:
    for tr in browser.find_elements(By.CSS_SELECTOR, "#connections tbody tr"):
        if tr.find_elements(By.XPATH, f'td[text()="{client}"]'):
            return tr
    return None


@browser_missing
def test_per_connection_toxic_added_and_removed_from_the_page(browser: Any,
                                                             midway: Midway) -> None:
    """A connection's row offers "toxic": the proxy's form then adds the toxic to
    that connection alone; the row lists it with a remove button, which takes it
    off live (the connection stays open, its neighbour never slowed)."""
    port = midway.port("web")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as target, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as other:
        for sock in (target, other):
            assert echo_time(sock) < 0.2
        client = f"127.0.0.1:{target.getsockname()[1]}"
        open_page(browser, midway)
        assert wait_until(lambda: connection_row(browser, client) is not None, UI_WAIT_S)
        number = int(connection_row(browser, client).get_attribute("data-id"))
        row = f'#connections tbody tr[data-id="{number}"]'
        click(browser, f"{row} button.add-toxic")
        web = section(browser, "web")
        assert web.find_element(By.NAME, "connection").get_attribute("value") == str(number)
        Select(web.find_element(By.NAME, "type")).select_by_visible_text("latency")
        latency = web.find_element(By.NAME, "attr-latency")
        latency.clear()
        latency.send_keys("300")
        web.find_element(By.CSS_SELECTOR, ".toxic-form .submit").click()
        assert wait_until(lambda: [t["name"] for t in midway.admin.get(
            f"/connections/{number}/toxics").json] == ["latency_downstream"], 5)
        assert midway.admin.get("/proxies/web").json["toxics"] == []
        assert echo_time(target) >= 0.3
        assert echo_time(other) < 0.2
        remove = f'{row} button.remove-conn-toxic[data-toxic="latency_downstream"]'
        assert wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, remove), UI_WAIT_S)
        click(browser, remove)
        assert wait_until(lambda: midway.admin.get(
            f"/connections/{number}/toxics").json == [], 5)
        assert echo_time(target) < 0.2
        assert wait_until(lambda: not browser.find_elements(By.CSS_SELECTOR, remove), UI_WAIT_S)
    assert console_errors(browser) == []
    assert failed_requests(browser) == []


@browser_missing
def test_keyboard_focus_survives_the_polls_and_headers_sort(browser: Any,
                                                            midway: Midway) -> None:
    """The page redraws each second: a button reached with Tab keeps the focus
    through the redraws (Enter then acts on it), and the column headers are
    buttons, so the table sorts from the keyboard."""
    port = midway.port("web")
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        for sock in socks:
            assert echo_time(sock) < 1
        assert midway.admin.post("/proxies/web/toxics", {"type": "noop"}).status == 200
        open_page(browser, midway)
        rows = "#connections tbody tr"
        assert wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, rows)) == 2
                          and browser.find_elements(By.CSS_SELECTOR, "tr[data-toxic] .edit"),
                          UI_WAIT_S)
        focused = 'return document.activeElement.closest("tr")?.dataset.id ?? null'
        browser.execute_script("arguments[0].focus()", browser.find_element(
            By.CSS_SELECTOR, f"{rows} button.kill"))
        number = browser.execute_script(focused)
        assert number is not None
        time.sleep(2.5)  # two redraws
        assert browser.execute_script(focused) == number
        assert browser.execute_script("return document.activeElement.className") == "kill"
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert wait_until(lambda: len(midway.admin.get("/connections").json) == 1, 5)

        browser.execute_script("arguments[0].focus()", browser.find_element(
            By.CSS_SELECTOR, 'tr[data-toxic="noop_downstream"] button.edit'))
        time.sleep(2.5)
        assert browser.execute_script("return document.activeElement.className") == "edit"

        header = browser.find_element(By.CSS_SELECTOR, '#connections th[data-key="client"]')
        button = header.find_element(By.TAG_NAME, "button")
        browser.execute_script("arguments[0].focus()", button)
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert wait_until(lambda: header.get_attribute("aria-sort") == "ascending", 2)
        browser.switch_to.active_element.send_keys(" ")
        assert wait_until(lambda: header.get_attribute("aria-sort") == "descending", 2)
    finally:
        for sock in socks:
            sock.close()
    assert console_errors(browser) == []


@browser_missing
def test_narrow_window_scrolls_only_the_tables(browser: Any, midway: Midway) -> None:
    """At a phone's width the page itself does not scroll sideways: the graphs
    shrink to fit and only the wide connections table scrolls in its box."""
    size = browser.get_window_size()
    with socket.create_connection(("127.0.0.1", midway.port("web")), timeout=5) as sock:
        assert echo_time(sock) < 1
        try:
            browser.set_window_size(360, 800)
            open_page(browser, midway)
            assert wait_until(lambda: browser.find_elements(
                By.CSS_SELECTOR, "#connections tbody tr"), UI_WAIT_S)
            width = browser.execute_script("return document.documentElement.clientWidth")
            assert browser.execute_script(
                "return document.documentElement.scrollWidth") <= width
            for canvas in browser.find_elements(By.TAG_NAME, "canvas"):
                assert canvas.rect["x"] + canvas.rect["width"] <= width
        finally:
            browser.set_window_size(size["width"], size["height"])
