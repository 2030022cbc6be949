"""Every route and error code of the admin API over raw HTTP, against Toxiproxy 2.x's
documented behaviour (api.go, proxy_collection.go, toxic_collection.go, README)."""

from __future__ import annotations

import hashlib
import http.client
import random
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..helpers import ProxyProcess, needs, proxy_process, wait_until
from ..layers.fixtures import load
from ..metrics.support import parse, value
from .conftest import Admin, EchoServer, Reply, checked_route, port_of, refused, round_trip

pytestmark = pytest.mark.timeout(60)

PROXY_KEYS = {"name", "listen", "upstream", "enabled", "toxics", "upstreams"}
TOXIC_KEYS = {"name", "type", "stream", "toxicity", "attributes"}


def create(admin: Admin, name: str, upstream: str, **fields: object) -> dict[str, object]:
    reply = admin.post("/proxies", {"name": name, "upstream": upstream,
                                    "listen": "127.0.0.1:0", **fields})
    assert reply.status == 201, reply.body
    proxy: dict[str, object] = reply.json
    return proxy


def error(reply: Reply, status: int, message: str) -> None:
    assert reply.status == status, reply.body
    assert reply.json == {"error": message, "status": status}


def admin_of(process: ProxyProcess) -> Admin:
    """The admin API of a midway started with ``admin = "127.0.0.1:0"`` in its
    file, at the port its start-up line names."""
    assert wait_until(lambda: any("admin API" in line for line in process.stderr_lines))
    api = Admin(process)
    line = next(line for line in process.stderr_lines if "admin API" in line)
    api.port = int(line.rsplit(":", 1)[1])
    return api


# -- server --------------------------------------------------------------------


def test_version_is_toxiproxy_2_json(admin: Admin) -> None:
    reply = admin.get("/version")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json["version"].startswith("2.")


def test_no_proxies_at_start_like_toxiproxy_server(admin: Admin) -> None:
    reply = admin.get("/proxies")
    assert (reply.status, reply.json) == (200, {})
    assert reply.headers["Content-Type"] == "application/json"


def test_unknown_route_404_wrong_method_405(admin: Admin) -> None:
    assert admin.get("/nope").status == 404
    assert admin.get("/proxies/").status == 404
    assert admin.request("PUT", "/proxies").status == 405
    assert admin.request("GET", "/reset").status == 405
    assert admin.request("DELETE", "/proxies").status == 405
    # RFC 9110 15.5.6: a 405 says which methods the resource has.
    assert admin.request("PUT", "/metrics").headers["Allow"] == "GET"
    assert admin.request("PUT", "/proxies/x").headers["Allow"] == "DELETE, GET, PATCH, POST"


def test_browsers_are_refused(admin: Admin) -> None:
    reply = admin.request("GET", "/proxies",
                          headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"})
    assert reply.status == 403


def test_keep_alive_serves_several_requests_on_one_connection(admin: Admin) -> None:
    conn = http.client.HTTPConnection(admin.host, admin.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/version")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
    finally:
        conn.close()


def test_chunked_bodies_are_read_and_oversized_ones_refused(admin: Admin) -> None:
    conn = http.client.HTTPConnection(admin.host, admin.port, timeout=5)
    try:
        conn.request("POST", "/proxies", body=iter([b'{"name":', b'"x"}']),
                     headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        reply = conn.getresponse()
        assert (reply.status, reply.read()) == (
            400, b'{"error":"missing required field: upstream","status":400}')
    finally:
        conn.close()
    with socket.create_connection((admin.host, admin.port), timeout=5) as raw:
        raw.sendall(b"POST /proxies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2000000\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert admin.get("/proxies").json == {}


# -- proxies -------------------------------------------------------------------


def test_create_proxy_reports_real_port_and_relays(admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "redis", echo.address)
    assert set(proxy) == PROXY_KEYS
    assert proxy["name"] == "redis" and proxy["upstream"] == echo.address
    assert proxy["enabled"] is True and proxy["toxics"] == []
    listen = str(proxy["listen"])
    assert listen.startswith("127.0.0.1:") and port_of(listen) > 0
    assert proxy["upstreams"][0]["connects"] == 0
    assert round_trip(port_of(listen), b"hello") == b"hello"
    # midway's upstreams list: the connection is counted, the rest is as created.
    after = admin.get("/proxies/redis").json
    assert after["upstreams"][0]["connects"] == 1
    assert after["upstreams"][0]["address"] == echo.address
    assert after["upstreams"][0]["state"] == "up"
    same = {k: v for k, v in proxy.items() if k != "upstreams"}
    assert {k: v for k, v in after.items() if k != "upstreams"} == same
    assert {k: v for k, v in admin.get("/proxies").json["redis"].items()
            if k != "upstreams"} == same


def test_create_without_listen_picks_a_loopback_port(admin: Admin, echo: EchoServer) -> None:
    reply = admin.post("/proxies", {"name": "nolisten", "upstream": echo.address})
    assert reply.status == 201
    assert reply.json["listen"].startswith("127.0.0.1:")
    assert round_trip(port_of(reply.json["listen"])) == b"ping"


def test_create_disabled_proxy_does_not_listen(admin: Admin, echo: EchoServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reply = admin.post("/proxies", {"name": "off", "upstream": echo.address,
                                    "listen": f"localhost:{port}", "enabled": False})
    assert reply.status == 201
    assert reply.json["enabled"] is False
    assert reply.json["listen"] == f"localhost:{port}"
    assert refused(port)


def test_create_errors_change_nothing(admin: Admin, echo: EchoServer) -> None:
    create(admin, "taken", echo.address)
    before = admin.get("/proxies").json
    error(admin.post("/proxies", {"name": "taken", "upstream": echo.address}),
          409, "proxy already exists")
    error(admin.post("/proxies", {"upstream": echo.address}), 400,
          "missing required field: name")
    error(admin.post("/proxies", {"name": "x"}), 400, "missing required field: upstream")
    for bad in (b"{not json", b"[1, 2]", b"", b'{"name": "x", "upstream": "h:1", "enabled": "yes"}',
                b'{"name": 5, "upstream": "h:1"}'):
        reply = admin.post("/proxies", raw=bad)
        assert reply.status == 400, bad
        assert reply.json["error"].startswith("bad request body"), reply.json
    # The error names the body's field, as for listen[0] (it named the config
    # file's key, upstreams[0], a field the client never sent).
    for upstream, key in (("no-port", "upstream[0]"), (f"{echo.address},no-port", "upstream[1]")):
        reply = admin.post("/proxies", {"name": "x", "upstream": upstream})
        assert reply.status == 400
        assert reply.json["error"].startswith(f"bad request body: {key}: 'no-port': "), reply.json
    reply = admin.post("/proxies", {"name": "x", "upstream": echo.address, "listen": "no-port"})
    assert reply.json["error"].startswith("bad request body: listen[0]: 'no-port': "), reply.json
    # A host no lookup can take (a lone surrogate: JSON allows it; an empty label) is
    # the body's error too: it was a 500 with a UnicodeError and a traceback in the log.
    for listen, upstream, key in (("\ud800:0", echo.address, "listen[0]"),
                                  ("127.0.0.1:0", "a..b:1", "upstream[0]")):
        reply = admin.post("/proxies", {"name": "x", "upstream": upstream, "listen": listen})
        assert reply.status == 400, reply.json
        assert reply.json["error"].startswith(f"bad request body: {key}: "), reply.json
        assert "is not a host name" in reply.json["error"], reply.json
    assert admin.get("/proxies").json == before


def test_create_on_a_busy_port_is_500_and_adds_nothing(admin: Admin, echo: EchoServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        reply = admin.post("/proxies", {"name": "clash", "upstream": echo.address,
                                        "listen": f"127.0.0.1:{port}"})
        assert reply.status == 500
        assert "address already in use" in reply.json["error"]
    assert admin.get("/proxies").json == {}


BAD_PROXY_NAMES = ("a/b", "x" * 65, "a\nb", "a b", "a?b", "../etc", "-x")


def test_proxy_names_are_bounded_and_never_break_a_url(admin: Admin, echo: EchoServer) -> None:
    for name in BAD_PROXY_NAMES:
        reply = admin.post("/proxies", {"name": name, "upstream": echo.address})
        assert reply.status == 400, (name, reply.body)
        assert reply.json["error"] == (
            "bad request body: name: a proxy name is 1-64 letters, digits, '_', '.', '-' or ':'")
        reply = admin.post("/populate", [{"name": name, "upstream": echo.address}])
        assert reply.status == 400, (name, reply.body)
    create(admin, "x" * 64, echo.address)
    assert list(admin.get("/proxies").json) == ["x" * 64]


def test_unknown_fields_are_ignored_as_toxiproxy_does(admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "typo", echo.address)
    reply = admin.request("PATCH", "/proxies/typo", {"enable": False})
    assert reply.status == 200 and reply.json["enabled"] is True   # the typo changed nothing
    reply = admin.post("/proxies", {"name": "t2", "upstream": echo.address, "lisen": "x",
                                    "listen": "127.0.0.1:0"})
    assert reply.status == 201
    reply = admin.post("/populate", [{"name": "t3", "upstream": echo.address, "up": 1,
                                      "listen": "127.0.0.1:0"}])
    assert reply.status == 201
    reply = admin.post("/proxies/typo/toxics", {"type": "latency", "atributes": {}})
    assert reply.status == 200 and reply.json["attributes"]["latency"] == 0
    assert admin.delete("/proxies/typo/toxics/latency_downstream").status == 204
    for name in ("t2", "t3"):
        assert admin.delete(f"/proxies/{name}").status == 204
    # What Toxiproxy sends back may be sent again, toxics included.
    assert admin.post("/proxies/typo", proxy).status == 200
    assert admin.get("/proxies/typo").json == proxy
    assert set(admin.get("/proxies").json) == {"typo"}


def test_show_update_delete_missing_proxy_404(admin: Admin) -> None:
    for reply in (admin.get("/proxies/ghost"), admin.post("/proxies/ghost", {"enabled": False}),
                  admin.delete("/proxies/ghost"), admin.get("/proxies/ghost/toxics"),
                  admin.post("/proxies/ghost/toxics", {"type": "latency"})):
        error(reply, 404, "proxy not found")


def test_disable_drops_connections_and_enable_returns_on_same_port(
        admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "flaky", echo.address)
    port = port_of(str(proxy["listen"]))
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(b"x")
    assert client.recv(1) == b"x"
    reply = admin.post("/proxies/flaky", {"enabled": False})
    assert reply.status == 200 and reply.json["enabled"] is False
    assert reply.json["listen"] == proxy["listen"]
    # Toxiproxy closes the proxy's connections: this one was just used, so midway
    # resets it rather than fake a clean end (docs/guarantees.md); idle, a FIN.
    try:
        assert client.recv(1) == b""
    except ConnectionResetError:
        pass
    client.close()
    assert refused(port)
    reply = admin.request("PATCH", "/proxies/flaky", {"enabled": True})
    assert reply.status == 200 and reply.json["enabled"] is True
    assert reply.json["listen"] == proxy["listen"]
    assert round_trip(port) == b"ping"


def test_changing_upstream_restarts_the_proxy(admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "mover", "127.0.0.1:1")
    port = port_of(str(proxy["listen"]))
    assert round_trip(port) == b""  # nothing listens on port 1
    reply = admin.post("/proxies/mover", {"upstream": echo.address})
    assert reply.status == 200 and reply.json["upstream"] == echo.address
    assert reply.json["listen"] == proxy["listen"]
    assert round_trip(port) == b"ping"


def test_update_with_bad_body_changes_nothing(admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "steady", echo.address)
    for bad in (b"{", b'{"enabled": 1}', b'{"upstream": "nope"}'):
        assert admin.post("/proxies/steady", raw=bad).status == 400
    assert admin.get("/proxies/steady").json == proxy


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_enabling_on_a_busy_listen_is_500_and_changes_nothing(
        admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "idle", echo.address, enabled=False)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        for method in ("PATCH", "POST"):
            reply = admin.request(method, "/proxies/idle",
                                  {"listen": f"127.0.0.1:{port}", "enabled": True})
            assert reply.status == 500, reply.body
            assert reply.json["status"] == 500
            assert f"127.0.0.1:{port}" in reply.json["error"]
            assert "address already in use" in reply.json["error"]
            assert admin.get("/proxies/idle").json == proxy
    reply = admin.request("PATCH", "/proxies/idle", {"enabled": True})
    assert reply.status == 200 and reply.json["enabled"] is True
    assert round_trip(port_of(reply.json["listen"])) == b"ping"


def test_moving_onto_a_busy_listen_is_500_and_keeps_serving(
        admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "live", echo.address)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        reply = admin.request("PATCH", "/proxies/live", {"listen": f"127.0.0.1:{port}",
                                                         "upstream": "127.0.0.1:1"})
        assert reply.status == 500 and "address already in use" in reply.json["error"]
    assert admin.get("/proxies/live").json == proxy
    assert round_trip(port_of(str(proxy["listen"]))) == b"ping"


def test_delete_proxy_stops_listening(admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "gone", echo.address)
    reply = admin.delete("/proxies/gone")
    assert (reply.status, reply.body) == (204, b"")
    assert refused(port_of(str(proxy["listen"])))
    error(admin.delete("/proxies/gone"), 404, "proxy not found")


# -- metrics -------------------------------------------------------------------

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
"""What Prometheus 2.x sends when it scrapes."""


def series(admin: Admin) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    reply = admin.get("/metrics")
    assert reply.status == 200
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples}


def test_a_deleted_proxy_and_a_replaced_upstream_leave_the_metrics(
        admin: Admin, echo: EchoServer) -> None:
    create(admin, "gone", echo.address)
    kept = create(admin, "kept", "127.0.0.1:1")
    assert round_trip(port_of(str(kept["listen"]))) == b""  # one failed connect
    before = series(admin)
    assert any(("proxy", "gone") in labels for _, labels in before)
    assert ("midway_connect_failures_total",
            (("proxy", "kept"), ("upstream", "127.0.0.1:1"))) in before
    assert admin.delete("/proxies/gone").status == 204
    reply = admin.post("/proxies/kept", {"upstream": echo.address})
    assert reply.status == 200, reply.body
    after = series(admin)
    # Gone, not frozen: a stale midway_upstream_up would keep an alert firing.
    assert not any(("proxy", "gone") in labels for _, labels in after)
    assert not any(("upstream", "127.0.0.1:1") in labels for _, labels in after)
    assert ("midway_connect_failures_total",
            (("proxy", "kept"), ("upstream", echo.address))) in after
    assert ("midway_connections_total", (("proxy", "kept"),)) in after


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason=needs("Prometheus's promtool", apt="prometheus"))
def test_a_live_scrape_passes_promtool(admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "web", echo.address)
    create(admin, "down", "127.0.0.1:1")
    for _ in range(3):
        assert round_trip(port_of(str(proxy["listen"]))) == b"ping"
    reply = admin.request("GET", "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    result = subprocess.run(["promtool", "check", "metrics"], input=reply.body,
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert result.stdout + result.stderr == b""  # no lint remark either


def test_sni_route_upstreams_are_in_the_api_and_the_metrics(tmp_path: Path,
                                                              echo: EchoServer) -> None:
    """Two workers, a route with a live and a dead upstream: GET /proxies/web
    lists the route's upstreams with their health (``route`` names it, null for
    the proxy's own), midway_route_upstream_up has them, midway_upstream_up
    keeps only the proxy's own, and the scrape passes promtool."""
    dead = f"127.0.0.1:{free_port()}"
    config = tmp_path / "midway.toml"
    config.write_text(f"""
[server]
admin = "127.0.0.1:0"
workers = 2

[proxy.web]
listen = "127.0.0.1:0"
upstreams = "{echo.address}"
{checked_route(echo.address, dead)}""")
    with proxy_process("--config", str(config)) as process:
        api = admin_of(process)

        def upstreams() -> list[tuple[object, ...]]:
            reply = api.get("/proxies/web")
            return [(u["route"], u["address"], u["state"]) for u in reply.json["upstreams"]] \
                if reply.status == 200 else []

        assert wait_until(lambda: upstreams() == [
            (None, echo.address, "up"), ("api", echo.address, "up"), ("api", dead, "down")],
            timeout=10), upstreams()
        listen = api.get("/proxies/web").json["listen"]
        hello = load("clienthello_curl")
        assert round_trip(port_of(listen), hello) == hello  # the route's live upstream
        entries = api.get("/proxies").json["web"]["upstreams"]
        assert [u["connects"] for u in entries] == [0, 1, 0]
        reply = api.request("GET", "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        text = reply.body.decode()
        assert value(text, "midway_route_upstream_up", proxy="web", route="api",
                     upstream=dead) == 0
        assert value(text, "midway_route_upstream_up", proxy="web", route="api",
                     upstream=echo.address) == 1
        assert [s.labels for s in parse(text)["midway_upstream_up"].samples] == [
            {"proxy": "web", "upstream": echo.address}]
        if shutil.which("promtool") is not None:
            result = subprocess.run(["promtool", "check", "metrics"], input=reply.body,
                                    capture_output=True, timeout=30, check=False)
            assert result.returncode == 0, (result.stdout + result.stderr).decode()
            assert result.stdout + result.stderr == b""


@pytest.mark.parametrize("workers", [1, 2])
def test_upstream_up_comes_back_when_an_ejection_ends_on_an_idle_proxy(
        tmp_path: Path, echo: EchoServer, workers: int) -> None:
    """A passively ejected upstream is up again once eject_s has run out; a
    scrape says so even when no client has come since (and GET /proxies has not
    been asked): midway_upstream_up does not keep an alert firing for it."""
    dead = f"127.0.0.1:{free_port()}"
    config = tmp_path / "midway.toml"
    config.write_text(f"""
[server]
admin = "127.0.0.1:0"
workers = {workers}

[proxy.web]
listen = "127.0.0.1:0"
upstreams = ["{dead}", "{echo.address}"]

[proxy.web.health]
eject_after = 1
eject_s = 0.5
""")
    with proxy_process("--config", str(config)) as process:
        api = admin_of(process)

        def dead_up() -> float:
            return value(api.get("/metrics").body.decode(), "midway_upstream_up",
                         proxy="web", upstream=dead)

        port = port_of(api.get("/proxies/web").json["listen"])
        for _ in range(2 * workers):  # round-robin: each worker dials the dead one first
            assert round_trip(port) == b"ping"  # retried on the live one
        assert dead_up() == 0
        assert wait_until(lambda: dead_up() == 1, timeout=5), "still 0 after eject_s"
        states = [u["state"] for u in api.get("/proxies/web").json["upstreams"]]
        assert states == ["up", "up"]


# -- toxics --------------------------------------------------------------------


def test_toxic_defaults_follow_toxiproxy(admin: Admin, echo: EchoServer) -> None:
    create(admin, "p", echo.address)
    assert admin.get("/proxies/p/toxics").json == []
    reply = admin.post("/proxies/p/toxics", {"type": "latency"})
    assert reply.status == 200
    assert reply.json == {"name": "latency_downstream", "type": "latency",
                          "stream": "downstream", "toxicity": 1.0,
                          "attributes": {"latency": 0, "jitter": 0}}
    reply = admin.post("/proxies/p/toxics", {"type": "latency", "stream": "upstream",
                                             "toxicity": 0.5, "attributes": {"latency": 7}})
    assert reply.json["name"] == "latency_upstream" and reply.json["toxicity"] == 0.5
    # Toxiproxy lists upstream toxics first.
    names = [t["name"] for t in admin.get("/proxies/p/toxics").json]
    assert names == ["latency_upstream", "latency_downstream"]
    shown = admin.get("/proxies/p/toxics/latency_upstream")
    assert shown.status == 200 and set(shown.json) == TOXIC_KEYS
    assert shown.json["attributes"] == {"latency": 7, "jitter": 0}
    assert [t["name"] for t in admin.get("/proxies/p").json["toxics"]] == names


def test_every_toxic_type_can_be_added(admin: Admin, echo: EchoServer) -> None:
    create(admin, "all", echo.address)
    for kind in ("latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer",
                 "limit_data", "noop"):
        # A slicer needs average_size >= 1 (Toxiproxy's 0 default panics on data).
        attributes = {"average_size": 100} if kind == "slicer" else {}
        reply = admin.post("/proxies/all/toxics", {"type": kind, "name": kind,
                                                   "attributes": attributes})
        assert reply.status == 200, (kind, reply.body)
        assert reply.json["type"] == kind


def test_toxic_errors_change_nothing(admin: Admin, echo: EchoServer) -> None:
    create(admin, "q", echo.address)
    assert admin.post("/proxies/q/toxics", {"type": "latency", "name": "x"}).status == 200
    before = admin.get("/proxies/q/toxics").json
    error(admin.post("/proxies/q/toxics", {"type": "slow_close", "name": "x"}),
          409, "toxic already exists")
    error(admin.post("/proxies/q/toxics", {"type": "latency", "name": "x", "stream": "upstream"}),
          409, "toxic already exists")
    error(admin.post("/proxies/q/toxics", {"type": "walrus"}), 400, "invalid toxic type")
    error(admin.post("/proxies/q/toxics", {"type": "latency", "stream": "sideways"}), 400,
          "stream was invalid, can be either upstream or downstream")
    for body in ({"type": "latency", "attributes": {"latency": "slow"}},
                 # A number is a JSON number: text is never converted, so "1_000"
                 # (which Python's int() would take) is refused like "slow".
                 {"type": "latency", "attributes": {"latency": "1_000"}},
                 {"type": "latency", "attributes": {"latency": "1000"}},
                 {"type": "latency", "toxicity": "0.5"},
                 {"type": "latency", "attributes": {"latency": 1.5}},
                 {"type": "latency", "attributes": {"latency": -1}},
                 {"type": "latency", "attributes": {"latency": 2 ** 63}},  # Go's int64
                 {"type": "latency", "attributes": {"latence": 1}},
                 {"type": "latency", "toxicity": 2},
                 {"type": "latency", "conditions": {"first_n": 0}}):
        reply = admin.post("/proxies/q/toxics", body)
        assert reply.status == 400, body
        assert reply.json["error"].startswith("bad request body"), reply.json
    assert admin.post("/proxies/q/toxics", raw=b"{oops").status == 400
    assert admin.get("/proxies/q/toxics").json == before


def test_toxic_names_are_bounded_and_never_break_a_url(admin: Admin, echo: EchoServer) -> None:
    create(admin, "n", echo.address)
    for name in ("a/b", "x" * 65, "a\nb", "a b", "a\tb", "a?b", "a#b", "a%2Fb", "\x7f"):
        reply = admin.post("/proxies/n/toxics", {"type": "latency", "name": name})
        assert reply.status == 400, (name, reply.body)
        assert reply.json["error"].startswith(
            "bad request body: name: a toxic name is 1-64 characters, without spaces, "
            "control characters, '/', '?', '#' or '%'"), reply.json
    assert admin.get("/proxies/n/toxics").json == []
    for name in ("x" * 64, "slow:replies", "Über-latenz"):
        assert admin.post("/proxies/n/toxics", {"type": "latency", "name": name}).status == 200
    assert admin.get("/proxies/n/toxics/slow:replies").status == 200


def test_update_toxic_merges_attributes(admin: Admin, echo: EchoServer) -> None:
    create(admin, "u", echo.address)
    admin.post("/proxies/u/toxics", {"type": "latency", "attributes": {"latency": 100,
                                                                       "jitter": 10}})
    reply = admin.request("PATCH", "/proxies/u/toxics/latency_downstream",
                          {"attributes": {"latency": 1000}, "toxicity": 0.5})
    assert reply.status == 200
    assert reply.json["attributes"] == {"latency": 1000, "jitter": 10}
    assert reply.json["toxicity"] == 0.5
    reply = admin.post("/proxies/u/toxics/latency_downstream", {"attributes": {"latency": 500}})
    assert reply.json["attributes"] == {"latency": 500, "jitter": 10}
    assert reply.json["toxicity"] == 0.5
    before = admin.get("/proxies/u/toxics").json
    for bad in ({"attributes": {"latency": -5}}, {"attributes": {"nope": 1}},
                {"attributes": {"latency": "1_000"}},
                {"toxicity": "all"}, {"attributes": [1]}):
        assert admin.post("/proxies/u/toxics/latency_downstream", bad).status == 400, bad
    assert admin.get("/proxies/u/toxics").json == before
    error(admin.post("/proxies/u/toxics/ghost", {"toxicity": 1}), 404, "toxic not found")


def test_show_and_delete_toxic(admin: Admin, echo: EchoServer) -> None:
    create(admin, "d", echo.address)
    admin.post("/proxies/d/toxics", {"type": "timeout", "name": "t"})
    assert admin.get("/proxies/d/toxics/t").json["type"] == "timeout"
    reply = admin.delete("/proxies/d/toxics/t")
    assert (reply.status, reply.body) == (204, b"")
    error(admin.get("/proxies/d/toxics/t"), 404, "toxic not found")
    error(admin.delete("/proxies/d/toxics/t"), 404, "toxic not found")
    error(admin.get("/proxies/ghost/toxics/t"), 404, "proxy not found")


def test_latency_toxic_through_the_api_delays_replies(admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "slow", echo.address)
    port = port_of(str(proxy["listen"]))
    admin.post("/proxies/slow/toxics", {"type": "latency", "attributes": {"latency": 200}})
    started = time.monotonic()
    assert round_trip(port) == b"ping"
    assert time.monotonic() - started >= 0.2
    admin.delete("/proxies/slow/toxics/latency_downstream")
    started = time.monotonic()
    assert round_trip(port) == b"ping"
    assert time.monotonic() - started < 0.2


def test_conditions_are_a_midway_extension(admin: Admin, echo: EchoServer) -> None:
    create(admin, "c", echo.address)
    reply = admin.post("/proxies/c/toxics", {"type": "latency",
                                             "conditions": {"first_n": 1}})
    assert reply.status == 200
    assert reply.json["conditions"] == {"first_n": 1}


# -- populate and reset ----------------------------------------------------------


def test_populate_creates_keeps_and_replaces(admin: Admin, echo: EchoServer) -> None:
    reply = admin.post("/populate", [
        {"name": "one", "listen": "127.0.0.1:0", "upstream": echo.address},
        {"name": "two", "listen": "127.0.0.1:0", "upstream": echo.address, "enabled": False},
    ])
    assert reply.status == 201, reply.body
    proxies = reply.json["proxies"]
    assert [p["name"] for p in proxies] == ["one", "two"]
    assert [p["enabled"] for p in proxies] == [True, False]
    admin.post("/proxies/one/toxics", {"type": "latency"})
    # The same again: "one" is left as it is, toxics and port included.
    again = admin.post("/populate", [{"name": "one", "listen": "127.0.0.1:0",
                                      "upstream": echo.address}]).json["proxies"]
    assert again[0]["listen"] == proxies[0]["listen"]
    assert [t["name"] for t in again[0]["toxics"]] == ["latency_downstream"]
    # A different upstream replaces it (Toxiproxy makes a new proxy: no toxics).
    replaced = admin.post("/populate", [{"name": "one", "listen": "127.0.0.1:0",
                                         "upstream": "127.0.0.1:1"}]).json["proxies"]
    assert replaced[0]["upstream"] == "127.0.0.1:1" and replaced[0]["toxics"] == []
    assert set(admin.get("/proxies").json) == {"one", "two"}


def test_populate_checks_everything_first(admin: Admin, echo: EchoServer) -> None:
    reply = admin.post("/populate", [{"name": "a", "upstream": echo.address},
                                     {"listen": "127.0.0.1:0"}])
    assert reply.status == 400
    assert reply.json["error"] == "missing required field: name at proxy 2"
    reply = admin.post("/populate", [{"name": "a", "upstream": echo.address},
                                     {"name": "b"}])
    assert reply.json["error"] == "missing required field: upstream at proxy 2"
    for bad in (b"{", b'{"name": "a"}', b'[{"name": "a", "upstream": "h:1"}, 3]',
                b'[{"name": "a", "upstream": "bad"}]'):
        assert admin.post("/populate", raw=bad).status == 400, bad
    assert admin.get("/proxies").json == {}


def test_failed_populate_puts_everything_back(admin: Admin, echo: EchoServer) -> None:
    keep = create(admin, "keep", echo.address)
    admin.post("/proxies/keep/toxics", {"type": "latency", "attributes": {"latency": 5}})
    before = admin.get("/proxies").json
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        reply = admin.post("/populate", [
            {"name": "keep", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"},
            {"name": "new", "listen": f"127.0.0.1:{port}", "upstream": echo.address},
        ])
        assert reply.status == 500
        assert reply.json["proxies"] == []
    assert admin.get("/proxies").json == before
    assert round_trip(port_of(str(keep["listen"]))) == b"ping"


def test_reset_enables_every_proxy_and_removes_every_toxic(
        admin: Admin, echo: EchoServer) -> None:
    first = create(admin, "r1", echo.address)
    create(admin, "r2", echo.address)
    admin.post("/proxies/r1/toxics", {"type": "timeout"})
    admin.post("/proxies/r2/toxics", {"type": "latency", "stream": "upstream"})
    admin.post("/proxies/r1", {"enabled": False})
    reply = admin.post("/reset")
    assert (reply.status, reply.body) == (204, b"")
    proxies = admin.get("/proxies").json
    assert all(p["enabled"] and p["toxics"] == [] for p in proxies.values())
    assert round_trip(port_of(str(first["listen"]))) == b"ping"


def test_reset_that_cannot_bind_a_proxy_changes_nothing(
        admin: Admin, echo: EchoServer) -> None:
    """Every disabled proxy must bind before anything changes: the first is not
    left enabled, no toxic is removed."""
    create(admin, "first", echo.address, enabled=False)
    port = free_port()
    create(admin, "second", echo.address, enabled=False, listen=f"127.0.0.1:{port}")
    admin.post("/proxies/first/toxics", {"type": "latency"})
    admin.post("/proxies/second/toxics", {"type": "timeout"})
    before = admin.get("/proxies").json
    with socket.create_server(("127.0.0.1", port)):
        reply = admin.post("/reset")
        after = admin.get("/proxies").json
    assert reply.status == 500, reply.body
    assert after == before
    assert reply.json["error"].startswith("second: ")
    assert "address already in use" in reply.json["error"]
    assert admin.post("/reset").status == 204
    proxies = admin.get("/proxies").json
    assert all(p["enabled"] and p["toxics"] == [] for p in proxies.values())
    assert round_trip(port) == b"ping"


def test_toxics_toggled_over_http_mid_transfer_keep_the_stream_intact(
        admin: Admin, echo: EchoServer) -> None:
    proxy = create(admin, "busy", echo.address)
    blob = random.Random(3).randbytes(16 << 20)
    client = socket.create_connection(("127.0.0.1", port_of(str(proxy["listen"]))), timeout=30)

    def send() -> None:
        view = memoryview(blob)
        for i in range(0, len(blob), 128 * 1024):
            client.sendall(view[i:i + 128 * 1024])
            time.sleep(0.005)
        client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = hashlib.sha256()
    total = 0
    toxics = [{"type": "latency", "attributes": {"latency": 2}},
              {"type": "slicer", "stream": "upstream", "attributes": {"average_size": 5000}},
              {"type": "bandwidth", "attributes": {"rate": 100_000}}]
    changes = 0
    client.settimeout(0.02)
    while True:
        try:
            chunk = client.recv(1 << 20)
        except TimeoutError:
            chunk = None
        if chunk == b"":
            break
        if chunk:
            received.update(chunk)
            total += len(chunk)
        if sender.is_alive():
            toxic = toxics[changes % len(toxics)]
            name = f"{toxic['type']}_{toxic.get('stream', 'downstream')}"
            if admin.get(f"/proxies/busy/toxics/{name}").status == 200:
                assert admin.delete(f"/proxies/busy/toxics/{name}").status == 204
            else:
                assert admin.post("/proxies/busy/toxics", toxic).status == 200
            changes += 1
        elif changes and admin.get("/proxies/busy/toxics").json:
            assert admin.post("/reset").status == 204
    client.close()
    assert changes > 20
    assert total == len(blob)
    assert received.hexdigest() == hashlib.sha256(blob).hexdigest()


def test_a_toxic_of_the_timeline_is_deleted_for_good_but_changed_only_in_the_file(
        tmp_path: Path, echo: EchoServer) -> None:
    # DELETE removes a timed toxic as Toxiproxy removes any toxic, and the rest of
    # the timeline plays on (not over); PATCH answers 409 saying why; /reset
    # removes the others.
    config = tmp_path / "midway.toml"
    config.write_text(f"""
[server]
admin = "127.0.0.1:0"

[proxy.web]
listen = "127.0.0.1:0"
upstreams = "{echo.address}"

[[proxy.web.toxics]]
type = "latency"
name = "slow"
attributes = {{ latency = 1 }}
until_s = 600

[[proxy.web.toxics]]
type = "latency"
name = "later"
at_s = 0.5
until_s = 600

[[proxy.web.toxics]]
type = "timeout"
name = "future"
at_s = 600
""")
    with proxy_process("--config", str(config)) as process:
        api = admin_of(process)

        def names() -> list[str]:
            return [t["name"] for t in api.get("/proxies/web/toxics").json]

        assert wait_until(lambda: names() == ["slow", "later"], timeout=10)
        for reply in (api.request("PATCH", "/proxies/web/toxics/slow",
                                  {"attributes": {"latency": 2}}),
                      api.post("/proxies/web/toxics/slow", {"toxicity": 0.5})):
            assert reply.status == 409
            assert reply.json["status"] == 409
            assert reply.json["error"].startswith(
                "toxic 'slow' belongs to the configuration's timeline (at_s/until_s), which "
                "adds and removes it at set times; the API does not change such a toxic"), \
                reply.json
        assert api.get("/proxies/web/toxics/slow").json["attributes"]["latency"] == 1
        assert api.delete("/proxies/web/toxics/slow").status == 204
        # Gone, and "later" stays: a timeline started over would have taken it
        # out until 0.5 s from now.
        assert names() == ["later"]
        error(api.get("/proxies/web/toxics/slow"), 404, "toxic not found")
        error(api.delete("/proxies/web/toxics/future"), 404, "toxic not found")  # not yet added
        # The name is free again, as in Toxiproxy.
        assert api.post("/proxies/web/toxics", {"type": "latency", "name": "slow"}).status == 200
        assert api.delete("/proxies/web/toxics/slow").status == 204
        assert api.post("/reset").status == 204
        assert api.get("/proxies/web/toxics").json == []
