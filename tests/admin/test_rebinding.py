"""DNS rebinding: a web page at ``http://evil.example:PORT/`` whose name the
attacker then points at 127.0.0.1 is same-origin with the admin API, so it can
send ``X-Midway-UI`` and gets ``Sec-Fetch-Site: same-origin``.  What gives it
away is the ``Host`` header, which names the attacker's domain: to a request
that a browser may have sent, the API answers only a Host that is an IP address, ``localhost`` (or under ``.localhost``), the
admin address's own name or one of ``admin_hosts`` (``*``: any), else 403 and
nothing changes.  The rule directly (:func:`host_allowed`, fuzzed), then a real
midway over raw HTTP, then a real Chromium told that evil.example is 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from midway.admin.server import host_allowed
from midway.config.load import load_config

from ..helpers import proxy_process, wait_until
from .conftest import Admin, EchoServer
from .test_token import admin_of
from .test_ui import CHROMIUM, browser_missing

# What a browser sends from the rebound page (Chrome's headers, same-origin).
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "X-Midway-UI": "1",
           "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}


@pytest.mark.parametrize("host", [
    None, "", "127.0.0.1", "127.0.0.1:8474", "127.9.9.9:1", "[::1]:8474", "[::1]",
    "localhost", "localhost:8474", "LocalHost.:8474", "app.localhost:8474",
    "10.1.2.3:8474", "[2001:db8::1]:8474", "toxiproxy:8474", "Toxiproxy.:80"])
def test_allowed_hosts(host: str | None) -> None:
    assert host_allowed(host, ("toxiproxy",))


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:8474", "localhost.evil.example:8474",
    "127.0.0.1.evil.example", "127.1:8474", "[evil.example]:8474", "xn--localhst-.com",
    "toxiproxy.evil.example", "[::1", "localhost:8474:1", "a b", "evil.example\x00:1"])
def test_refused_hosts(host: str) -> None:
    assert not host_allowed(host, ("toxiproxy",))


def test_a_star_allows_any_host() -> None:
    assert host_allowed("evil.example:8474", ("*",))


@given(st.one_of(st.none(), st.text(max_size=80)),
       st.lists(st.text(max_size=20), max_size=3))
def test_host_allowed_never_raises(host: str | None, names: list[str]) -> None:
    assert host_allowed(host, tuple(names)) in (True, False)


def test_admin_hosts_is_a_server_option(tmp_path: Path) -> None:
    config = tmp_path / "midway.toml"
    config.write_text('[server]\nadmin = "127.0.0.1:0"\nadmin_hosts = ["midway.test"]\n')
    assert load_config(str(config)).server.admin_hosts == ("midway.test",)


def test_a_rebound_page_changes_nothing(admin: Admin, echo: EchoServer) -> None:
    body = {"name": "pwn", "listen": "127.0.0.1:0", "upstream": echo.address}
    for host in ("evil.example", f"evil.example:{admin.port}"):
        evil = {**BROWSER, "Host": host, "Origin": f"http://{host}"}
        for method, path, data in (("POST", "/proxies", body), ("GET", "/proxies", None),
                                   ("POST", "/reset", None), ("GET", "/ui/", None),
                                   ("GET", "/metrics", None)):
            reply = admin.request(method, path, data, headers=evil)
            assert reply.status == 403, (method, path, reply.body)
            assert reply.json["status"] == 403
            assert "Host" in reply.json["error"] and "admin_hosts" in reply.json["error"]
        # A page may set its own User-Agent (Firefox lets fetch() do so), but
        # not take off the Sec-Fetch-* headers or Origin.
        for mark in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Mode": "cors"},
                     {"Origin": f"http://{host}"}, {"X-Midway-UI": "1"}):
            headers = {"User-Agent": "curl/8.0", "Host": host, **mark}
            assert admin.request("GET", "/version", headers=headers).status == 403, mark
    # A request target's authority stands for its Host (RFC 9112 section 3.2.2).
    assert admin.request("GET", "http://evil.example/version", headers=BROWSER).status == 403
    assert admin.request("GET", f"http://127.0.0.1:{admin.port}/version",
                         headers=BROWSER).status == 200
    assert admin.get("/proxies").json == {}
    # The dashboard on loopback, under every name for it, still works.
    for host in (f"127.0.0.1:{admin.port}", f"localhost:{admin.port}", f"[::1]:{admin.port}"):
        ui = {**BROWSER, "Host": host}
        assert admin.request("GET", "/ui/", headers=ui).status == 200
        assert admin.request("GET", "/proxies", headers=ui).status == 200


def test_clients_other_than_browsers_may_name_the_api_by_any_host(
        admin: Admin, echo: EchoServer) -> None:
    """curl, Toxiproxy's clients and midway's commands choose their Host
    themselves, and no web page is behind them: a remote API reached by a name
    (``toxiproxy:8474`` from another container) needs no admin_hosts."""
    body = {"name": "by_name", "listen": "127.0.0.1:0", "upstream": echo.address}
    headers = {"Host": f"toxiproxy:{admin.port}", "User-Agent": "toxiproxy-python/0.1.1"}
    assert admin.request("POST", "/proxies", body, headers=headers).status == 201
    assert admin.request("GET", "http://toxiproxy/proxies", headers=headers).status == 200
    assert list(admin.get("/proxies").json) == ["by_name"]


def test_admin_hosts_lets_a_name_in_and_a_reload_changes_it(tmp_path: Path) -> None:
    config = tmp_path / "midway.toml"
    config.write_text('[server]\nadmin = "127.0.0.1:0"\nadmin_hosts = ["midway.test"]\n')
    with proxy_process("--config", str(config)) as p:
        api = admin_of(p)
        assert api.request("GET", "/version",
                           headers={**BROWSER, "Host": "midway.test:1"}).status == 200
        assert api.request("GET", "/version",
                           headers={**BROWSER, "Host": "other.test"}).status == 403
        assert wait_until(lambda: any("other.test" in line and "admin_hosts" in line
                                      for line in p.stderr_lines))
        config.write_text('[server]\nadmin = "127.0.0.1:0"\nadmin_hosts = ["*"]\n')
        assert api.post("/reload").status == 200
        assert api.request("GET", "/version",
                           headers={**BROWSER, "Host": "other.test"}).status == 200


@browser_missing
def test_a_real_rebound_page_in_chromium(admin: Admin, echo: EchoServer) -> None:
    """Chromium resolves evil.example to 127.0.0.1, as after a rebinding: the
    page it loads from there cannot reach the API."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from .test_ui import CHROMEDRIVER
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--host-resolver-rules=MAP evil.example 127.0.0.1"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.get(f"http://evil.example:{admin.port}/ui/")
        assert "Host" in driver.page_source  # the 403's text, not the dashboard
        status: Any = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/proxies', {method: 'POST', headers: {'X-Midway-UI': '1'},
                               body: JSON.stringify(arguments[0])})
              .then(r => done(r.status), e => done(String(e)));
        """, {"name": "pwn", "listen": "127.0.0.1:0", "upstream": echo.address})
        assert status == 403
    finally:
        driver.quit()
    assert admin.get("/proxies").json == {}
