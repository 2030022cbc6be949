"""SNI routes through a real midway, over loopback, with captured ClientHellos (curl,
openssl, one split over three TLS records): each reaches its route's backend with
every byte unchanged; a name no route matches, no name and a plain-text client go to
the proxy's own upstreams, or are closed with no_route when it has none; a late
ClientHello is closed with peek_timeout; the access log has the route and the SNI;
behind a PROXY header the SNI goes on as the sent header's AUTHORITY; route upstream
sets survive a reconfigure by name."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import midway
from midway.config.addresses import parse_address
from midway.layers.proxy_protocol import ProxyProtocolParser, build_v1, build_v2
from tests.layers.fixtures import load

from ..helpers import read_to_eof, run, serve
from .test_failover import _closed_port
from .test_proxy_protocol_e2e import Records, exchange

AFTER = b"\x17\x03\x03\x00\x04data"
"""Bytes a client sends after its ClientHello: they must follow it unchanged."""


def named_backend(name: bytes, got: list[tuple[bytes, bytes]]) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append((name, await read_to_eof(reader)))
        writer.write(name)
        await writer.drain()
        writer.close()
    return handler


def routes(a: int, b: int) -> list[dict[str, Any]]:
    return [{"name": "api", "sni": "api.example.test", "upstreams": f"127.0.0.1:{a}"},
            {"sni": ["*.example.com", "split.example.net"], "upstreams": f"127.0.0.1:{b}"}]


def test_each_name_reaches_its_route_unchanged_and_the_rest_the_default() -> None:
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        records = Records()
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"B", got)) as b, \
                serve(named_backend(b"D", got)) as d, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{d}", observers=[records],
                             routes=routes(a, b)) as proxy:
            cases = [("clienthello_curl", b"A", "api", "api.example.test"),
                     ("clienthello_openssl", b"B", "*.example.com", "www.example.com"),
                     ("clienthello_openssl_split", b"B", "*.example.com", "split.example.net"),
                     ("clienthello_curl_tls12", b"D", None, "legacy.example.test"),
                     ("clienthello_openssl_nosni", b"D", None, None)]
            for fixture, backend, route, sni in cases:
                got.clear()
                records.records.clear()
                hello = load(fixture)
                # In pieces, as a slow network would deliver it.
                answer = await exchange(proxy.port, hello[:3], hello[3:100], hello[100:] + AFTER,
                                        pause_s=0.02)
                record = await records.one()
                assert answer == backend, fixture
                assert got == [(backend, hello + AFTER)], fixture
                assert (record.route, record.sni, record.reason) == (route, sni, "eof"), fixture
            got.clear()
            assert await exchange(proxy.port, b"GET / HTTP/1.0\r\n\r\n") == b"D"
            assert got == [(b"D", b"GET / HTTP/1.0\r\n\r\n")]
    run(main())


def test_without_a_default_an_unrouted_client_is_closed_with_no_route() -> None:
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        records = Records()
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"B", got)) as b, \
                midway.Proxy("127.0.0.1:0", observers=[records], routes=routes(a, b)) as proxy:
            assert await exchange(proxy.port, load("clienthello_curl_tls12")) == b""
            unmatched = await records.one()
            records.records.clear()
            assert await exchange(proxy.port, load("clienthello_openssl_nosni")) == b""
            nameless = await records.one()
            assert await exchange(proxy.port, load("clienthello_curl")) == b"A"
        assert (unmatched.reason, unmatched.detail, unmatched.sni) == (
            "no_route", "no route for legacy.example.test", "legacy.example.test")
        assert (nameless.reason, nameless.detail) == ("no_route", "the client named no server")
        assert [name for name, _ in got] == [b"A"]
    run(main())


def test_a_connection_is_listed_in_the_phase_it_is_in_then_with_its_route() -> None:
    """``GET /connections`` (here ``list_connections``) named every connection not
    relaying yet ``connecting``, even one midway was reading a PROXY header or a
    ClientHello from; ``midway connections`` shows the SNI and the route."""
    from midway.connections import format_table

    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"B", got)) as b, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{a}", routes=routes(a, b),
                             proxy_protocol_in="v1",
                             proxy_protocol_trusted=["127.0.0.1"]) as proxy:
            async def listed(state: str) -> dict[str, Any]:
                async with asyncio.timeout(5):
                    while not (rows := proxy.list_connections()) or rows[0]["state"] != state:
                        await asyncio.sleep(0.01)
                return rows[0]

            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            first = await listed("reading PROXY header")
            assert (first["phase"], first["sni"], first["route"]) == ("inbound", None, None)
            writer.write(build_v1(("192.0.2.7", 5000), ("192.0.2.1", 443)))
            assert (await listed("reading ClientHello"))["phase"] == "inbound"
            writer.write(load("clienthello_curl"))
            relaying = await listed("open")
            assert (relaying["phase"], relaying["sni"], relaying["route"]) == (
                "relay", "api.example.test", "api")
            head, line = format_table([relaying]).splitlines()
            assert head.split()[3:6] == ["CLIENT", "SNI", "ROUTE"]
            assert line.split()[3:6] == ["192.0.2.7:5000", "api.example.test", "api"]
            writer.close()
    run(main())


def test_a_clienthello_that_does_not_come_in_time_is_closed() -> None:
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        records = Records()
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"B", got)) as b, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{a}", observers=[records],
                             routes=routes(a, b), sni_peek_timeout_s=0.2) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(load("clienthello_curl")[:40])
            assert await read_to_eof(reader, timeout=5) == b""
            writer.close()
            record = await records.one()
        assert record.reason == "peek_timeout" and got == []
        assert record.detail == "no complete TLS ClientHello within 0.2 s (40 bytes came)"
    run(main())


def test_behind_a_proxy_header_the_sni_is_sent_on_as_the_authority() -> None:
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"B", got)) as b, \
                midway.Proxy("127.0.0.1:0", observers=[Records()], routes=routes(a, b),
                             proxy_protocol_in="v1", proxy_protocol_trusted=["127.0.0.1"],
                             proxy_protocol_out="v2") as proxy:
            hello = load("clienthello_curl")
            # One write: the v1 layer reads past its line into the ClientHello.
            header = build_v1(("203.0.113.5", 1234), ("192.0.2.1", 443))
            assert await exchange(proxy.port, header + hello) == b"A"
        [(_, data)] = got
        parser = ProxyProtocolParser("v2")
        sent = parser.feed(data)
        assert sent is not None
        assert (sent.source, sent.authority) == (("203.0.113.5", 1234), "api.example.test")
        assert parser.rest == hello
    run(main())


def test_an_authority_is_the_sni_in_the_clienthello_s_form() -> None:
    """A received v2 AUTHORITY (what HAProxy saw, as the client typed it) is the
    access log's ``sni`` lower-cased and without its trailing dot, as a name read
    from a ClientHello is: one service, one ``sni``, whichever way it came."""
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        records = Records()
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"B", got)) as b, \
                midway.Proxy("127.0.0.1:0", observers=[records], routes=routes(a, b),
                             proxy_protocol_in="v2", proxy_protocol_trusted=["127.0.0.1"],
                             proxy_protocol_out="v2") as proxy:
            header = build_v2(("203.0.113.5", 1234), ("192.0.2.1", 443),
                              authority="API.Example.TEST.")
            assert await exchange(proxy.port, header + b"plain") == b"A"
            record = await records.one()
        assert (record.route, record.sni) == ("api", "api.example.test")
        [(_, data)] = got
        sent = ProxyProtocolParser("v2").feed(data)
        assert sent is not None and sent.authority == "api.example.test"
    run(main())


def test_route_upstream_sets_survive_a_reconfigure_by_name() -> None:
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"B", got)) as b, \
                midway.Proxy("127.0.0.1:0", routes=routes(a, b)) as proxy:
            service = proxy.service
            before = dict(service._route_sets)
            config = dataclasses.replace(service.config, routes=service.config.routes[:1])
            assert proxy.runtime is not None
            proxy.runtime.update_proxy(config)
            assert list(service._route_sets) == ["api"]
            assert service._route_sets["api"] is before["api"]
            assert await exchange(proxy.port, load("clienthello_curl")) == b"A"
            # The removed route's names now match nothing, and there is no default.
            assert await exchange(proxy.port, load("clienthello_openssl")) == b""
    run(main())


def test_a_route_upstream_passive_health_ejected_is_brought_back_by_active_checks() -> None:
    """With active checks on, a passively ejected upstream waits for its checks
    (docs/balancing.md: "checks will bring it back").  A route's upstreams were
    never checked, so a route whose server was down for three clients stayed
    closed (no_upstream) for good once the server was back."""
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        port = _closed_port()
        hello = load("clienthello_curl")
        route = [{"name": "api", "sni": "api.example.test", "upstreams": f"127.0.0.1:{port}"}]
        async with midway.Proxy("127.0.0.1:0", routes=route,
                                health={"interval_s": 0.1, "rise": 1}) as proxy:
            [pool] = proxy.service._route_sets.values()
            for _ in range(3):  # eject_after: 3 refused connects
                assert await exchange(proxy.port, hello) == b""
            assert not pool.upstreams[0].up
            server = await asyncio.start_server(named_backend(b"A", got), "127.0.0.1", port)
            async with server:
                async with asyncio.timeout(5):
                    while not pool.upstreams[0].up:
                        await asyncio.sleep(0.05)
                assert await exchange(proxy.port, hello) == b"A"
    run(main())


class Health:
    """An observer of the health of the proxy's own upstreams (route None) and of
    its routes' (``route_upstream_health``)."""

    def __init__(self) -> None:
        self.events: list[tuple[str | None, str, bool]] = []

    def upstream_health(self, proxy: str, upstream: str, up: bool) -> None:
        self.events.append((None, upstream, up))

    def route_upstream_health(self, proxy: str, route: str, upstream: str, up: bool) -> None:
        self.events.append((route, upstream, up))

    def connection_closed(self, record: midway.CloseRecord) -> None:
        pass


def test_a_route_upstream_health_is_told_to_observers_as_the_route_s() -> None:
    """At start, on each change and for an upstream a reconfigure adds, as the
    proxy's own upstreams are told (midway_route_upstream_up): a route whose
    server went down was invisible to the metrics and the admin API."""
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        dead = f"127.0.0.1:{_closed_port()}"
        health = Health()
        async with serve(named_backend(b"A", got)) as a, serve(named_backend(b"D", got)) as d:
            route = [{"name": "api", "sni": "api.example.test",
                      "upstreams": [f"127.0.0.1:{a}", dead]}]
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{d}", routes=route,
                                    observers=[health],
                                    health={"interval_s": 0.05, "fall": 1}) as proxy:
                assert health.events[:3] == [(None, f"127.0.0.1:{d}", True),
                                             ("api", f"127.0.0.1:{a}", True), ("api", dead, True)]
                async with asyncio.timeout(5):
                    while ("api", dead, False) not in health.events:
                        await asyncio.sleep(0.02)
                for _ in range(3):  # the checks took the dead one out of the route
                    assert await exchange(proxy.port, load("clienthello_curl")) == b"A"
                views = proxy.service.upstream_views()
                assert [(v["route"], v["address"], v["state"]) for v in views] == [
                    (None, f"127.0.0.1:{d}", "up"), ("api", f"127.0.0.1:{a}", "up"),
                    ("api", dead, "down")]
                assert views[1]["connects"] == 3
                told = len(health.events)
                config = proxy.service.config
                added = dataclasses.replace(config.routes[0], upstreams=(
                    *config.routes[0].upstreams, parse_address(f"127.0.0.1:{d}", listen=False)))
                assert proxy.runtime is not None
                proxy.runtime.update_proxy(dataclasses.replace(config, routes=(added,)))
                assert ("api", f"127.0.0.1:{d}", True) in health.events[told:]
        assert all(route == "api" for route, upstream, _ in health.events if upstream == dead)
    run(main())
