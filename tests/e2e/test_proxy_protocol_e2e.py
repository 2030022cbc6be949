"""The PROXY protocol through a real midway, both ways, over loopback: a header
received (split across segments too) gives the access log, the hooks' connection
info, the balancer's key and the capture the real client; the header sent upstream carries it;
LOCAL is served; an untrusted peer, a missing header and a late one are closed with
their reasons; a reconfigure rebuilds the layers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
from typing import Any

import pytest

import midway
from midway.chain.base import Attachment, ConnectionInfo, Element
from midway.core.observer import Observer
from midway.layers.proxy_protocol import ProxyProtocolParser, build_v1, build_v2, build_v2_local

from ..helpers import fd_count, read_to_eof, run, serve

CLIENT = ("203.0.113.5", 1234)
SERVICE = ("192.0.2.1", 443)
TRUST_LOOPBACK = {"proxy_protocol_trusted": ["127.0.0.0/8"]}


class Records(Observer):
    def __init__(self) -> None:
        self.records: list[midway.CloseRecord] = []

    def connection_closed(self, record: midway.CloseRecord) -> None:
        self.records.append(record)

    async def one(self, timeout: float = 5.0) -> midway.CloseRecord:
        async with asyncio.timeout(timeout):
            while not self.records:
                await asyncio.sleep(0.01)
        return self.records[-1]


class SeenByHooks(Element):
    """What an element (a hook, the capture) sees of the connection at open."""

    name = "seen"

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def attach(self, info: ConnectionInfo) -> Attachment | None:
        self.seen.append((info.client_addr, info.local_addr))
        return None


class KeyRecorder:
    """Wraps a pool's balancer and records the key of every order it gives."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.keys: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def order(self, upstreams: Any, key: str) -> Any:
        self.keys.append(key)
        return self.inner.order(upstreams, key)


def recording_backend(got: list[bytes]) -> Any:
    """Reads to EOF, keeps what came, answers ``ok`` and closes."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await read_to_eof(reader))
        writer.write(b"ok")
        await writer.drain()
        writer.close()
    return handler


async def exchange(port: int, *pieces: bytes, pause_s: float = 0.0) -> bytes:
    """Send the pieces (pausing between them, so they are separate segments),
    half-close, and read the answer to EOF (b"" when midway closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        writer.write_eof()
        return await read_to_eof(reader)
    except (OSError, RuntimeError):  # closed by midway before all was sent: reset or not
        return b""  # connected (uvloop's write_eof on a transport a reset closed: RuntimeError)
    finally:
        writer.close()


def test_a_received_v2_header_is_the_client_everywhere_and_is_sent_on_as_v1() -> None:
    async def main() -> None:
        got: list[bytes] = []
        records, seen = Records(), SeenByHooks()
        header = build_v2(CLIENT, SERVICE)
        async with serve(recording_backend(got)) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", elements=[seen],
                             observers=[records], proxy_protocol_in="v2",
                             proxy_protocol_out="v1", **TRUST_LOOPBACK) as proxy:
            # The header split in three segments, the payload in the last one.
            answer = await exchange(proxy.port, header[:7], header[7:20],
                                    header[20:] + b"payload", pause_s=0.05)
            record = await records.one()
        assert answer == b"ok"
        assert got == [build_v1(CLIENT, SERVICE) + b"payload"]
        assert (record.client, record.listener, record.reason) == ("203.0.113.5:1234",
                                                                   "192.0.2.1:443", "eof")
        assert seen.seen == [(CLIENT, SERVICE)]
    run(main())


def test_the_balancer_is_keyed_by_the_real_client() -> None:
    """hash_source reads the key at choose time: it must be the header's client."""
    async def main() -> None:
        got: list[bytes] = []
        async with serve(recording_backend(got)) as a, serve(recording_backend(got)) as b, \
                midway.Proxy("127.0.0.1:0", [f"127.0.0.1:{a}", f"127.0.0.1:{b}"],
                             proxy_protocol_in="v1", **TRUST_LOOPBACK) as proxy:
            recorder = KeyRecorder(proxy.service.pool.balancer)
            proxy.service.pool.balancer = recorder  # type: ignore[assignment]
            assert await exchange(proxy.port, build_v1(("198.51.100.77", 9), SERVICE)) == b"ok"
        assert recorder.keys == ["198.51.100.77"]
    run(main())


def test_local_is_served_with_the_peer_s_own_address() -> None:
    async def main() -> None:
        got: list[bytes] = []
        records = Records()
        async with serve(recording_backend(got)) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", observers=[records],
                             proxy_protocol_in="any", **TRUST_LOOPBACK) as proxy:
            assert await exchange(proxy.port, build_v2_local() + b"health?") == b"ok"
            record = await records.one()
        assert got == [b"health?"]
        assert record.client.startswith("127.0.0.1:") and record.reason == "eof"
    run(main())


async def _cut_short(port: int, data: bytes) -> None:
    """Connect, send ``data``, then reset the connection (unless midway closed
    it first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.001)
    writer.transport.abort()


def test_connections_cut_short_at_any_stage_give_back_their_source_s_slot() -> None:
    """A soak in small: clients of one source reset during the header, right after
    it, mid-stream, or let the header time out; each gives back its
    max_connections_per_source slot and its descriptors, so the source is still
    served afterwards (a slot kept would refuse it for good)."""
    async def main() -> None:
        header = build_v1(("198.51.100.9", 2), SERVICE)
        async with serve() as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", proxy_protocol_in="v1",
                             proxy_protocol_timeout_s=0.05, max_connections_per_source=1,
                             **TRUST_LOOPBACK) as proxy:
            await asyncio.sleep(0.1)
            before = fd_count()
            for _ in range(40):
                await asyncio.gather(_cut_short(proxy.port, header[:9]),
                                     _cut_short(proxy.port, header),
                                     _cut_short(proxy.port, header + b"x" * 5000),
                                     exchange(proxy.port, header[:9], pause_s=0.1))
            async with asyncio.timeout(5):
                while proxy.connections:
                    await asyncio.sleep(0.02)
            assert len(proxy.service.sources) == 0, "a source's slot was kept"
            assert fd_count() <= before + 2, "descriptors left behind"
            assert await exchange(proxy.port, header, b"still served") == b"still served"
    run(main(), timeout=60)


def test_allow_deny_and_the_per_source_limit_judge_the_real_client() -> None:
    """The balancer (127.0.0.1) is never denied; the clients its headers name are."""
    async def main() -> None:
        got: list[bytes] = []
        records = Records()
        async with serve(recording_backend(got)) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", observers=[records],
                             proxy_protocol_in="v1", deny=["192.0.2.0/24"],
                             max_connections_per_source=1, **TRUST_LOOPBACK) as proxy:
            assert await exchange(proxy.port, build_v1(("192.0.2.7", 1), SERVICE)) == b""
            denied = await records.one()
            records.records.clear()
            # One connection of 198.51.100.9 held open: its second is refused.
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(build_v1(("198.51.100.9", 2), SERVICE))
            await writer.drain()
            async with asyncio.timeout(5):
                while not proxy.service.live:
                    await asyncio.sleep(0.01)
            assert await exchange(proxy.port, build_v1(("198.51.100.9", 3), SERVICE)) == b""
            limited = await records.one()
            assert await exchange(proxy.port, build_v1(("198.51.100.10", 4), SERVICE)) == b"ok"
            writer.write_eof()
            assert await read_to_eof(reader) == b"ok"
            writer.close()
        assert (denied.client, denied.reason, denied.upstream) == ("192.0.2.7:1", "denied", None)
        assert (limited.client, limited.reason) == ("198.51.100.9:3", "source_limit")
        assert got == [b"", b""]  # the two admitted, nothing of the refused ones
    run(main())


def test_refusals_close_with_their_reason_and_dial_nothing() -> None:
    async def main() -> None:
        got: list[bytes] = []
        records = Records()
        async with serve(recording_backend(got)) as port:
            upstream = f"127.0.0.1:{port}"
            async with midway.Proxy("127.0.0.1:0", upstream, observers=[records],
                                    proxy_protocol_in="v2",
                                    proxy_protocol_trusted=["10.0.0.0/8"]) as proxy:
                assert await exchange(proxy.port, build_v2(CLIENT, SERVICE)) == b""
                untrusted = await records.one()
            async with midway.Proxy("127.0.0.1:0", upstream, observers=[records],
                                    proxy_protocol_in="v2", proxy_protocol_timeout_s=0.2,
                                    **TRUST_LOOPBACK) as proxy:
                records.records.clear()
                assert await exchange(proxy.port, b"GET / HTTP/1.1\r\n\r\n") == b""
                missing = await records.one()
                records.records.clear()
                reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                writer.write(build_v2(CLIENT, SERVICE)[:10])  # then nothing
                assert await read_to_eof(reader, timeout=5) == b""
                writer.close()
                late = await records.one()
        assert got == []
        assert (untrusted.reason, untrusted.detail) == (
            "untrusted_peer", "peer 127.0.0.1 is not in proxy_protocol_trusted")
        assert missing.reason == "bad_proxy_header" and "first byte 0x47" in missing.detail
        assert late.reason == "bad_proxy_header"
        assert late.detail == "no complete PROXY header within 0.2 s (10 bytes came)"
        # Wall clock against the loop's timer: uvloop's whole-millisecond clock
        # may fire a hair early by time.time().
        assert 0.19 <= late.duration_s < 3
    run(main())


def test_a_reconfigure_rebuilds_the_layers() -> None:
    async def main() -> None:
        got: list[bytes] = []
        async with serve(recording_backend(got)) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            assert await exchange(proxy.port, b"one") == b"ok"
            runtime = proxy.runtime
            assert runtime is not None
            runtime.update_proxy(dataclasses.replace(proxy.service.config,
                                                     proxy_protocol_out="v2"))
            assert await exchange(proxy.port, b"two") == b"ok"
        assert got[0] == b"one"
        parser = ProxyProtocolParser("v2")
        header = parser.feed(got[1])
        assert header is not None and header.source is not None and parser.rest == b"two"
    run(main())


@pytest.mark.per_loop
def test_the_capture_records_the_client_leg_between_the_real_client_and_its_service(
        tmp_path: Any) -> None:
    from midway.chain.pcapread import read_connections

    async def main() -> None:
        got: list[bytes] = []
        path = tmp_path / "pp.pcap"
        async with serve(recording_backend(got)) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", pcap=str(path),
                             proxy_protocol_in="v2", **TRUST_LOOPBACK) as proxy:
            assert await exchange(proxy.port, build_v2(CLIENT, SERVICE) + b"hi") == b"ok"
        with open(path, "rb") as f:
            legs = read_connections(f)
        assert got == [b"hi"]
        assert [(leg.client, leg.server) for leg in legs][0] == (CLIENT, SERVICE)
    run(main())


class SeenAlpn(Element):
    """The ALPN protocol a hook sees at open (``info.alpn``)."""

    name = "seen_alpn"

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def attach(self, info: ConnectionInfo) -> Attachment | None:
        self.seen.append(info.alpn)
        return None


@pytest.mark.per_loop
def test_hooks_see_the_alpn_a_v2_header_names() -> None:
    """A balancer that terminated TLS says in the ALPN TLV what it agreed."""
    async def main() -> None:
        got: list[bytes] = []
        seen = SeenAlpn()
        async with serve(recording_backend(got)) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", elements=[seen],
                             proxy_protocol_in="v2", **TRUST_LOOPBACK) as proxy:
            assert await exchange(proxy.port, build_v2(CLIENT, SERVICE, alpn=b"h2") + b"a") == b"ok"
            assert await exchange(proxy.port, build_v2(CLIENT, SERVICE) + b"b") == b"ok"
        assert seen.seen == ["h2", None]
        assert got == [b"a", b"b"]
    run(main())


@pytest.mark.per_loop
def test_with_tls_terminated_by_midway_its_own_handshake_s_alpn_wins(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    import ssl

    from ..tlspki import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))

    async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    async def over_tls(port: int, offer: list[str]) -> tuple[str | None, bytes]:
        context = ssl.create_default_context(cafile=str(pki.ca))
        if offer:
            context.set_alpn_protocols(offer)
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(build_v2(CLIENT, SERVICE, alpn=b"h2"))
                await writer.drain()
                await writer.start_tls(context, server_hostname="localhost")
                agreed = writer.get_extra_info("ssl_object").selected_alpn_protocol()
                writer.write(b"x")
                await writer.drain()
                return agreed, await reader.read()
            finally:
                writer.close()

    async def main() -> None:
        seen = SeenAlpn()
        async with serve(answer_ok) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", elements=[seen],
                             proxy_protocol_in="v2", tls_cert=str(pki.server_chain),
                             tls_key=str(pki.server_key), tls_alpn=["http/1.1"],
                             **TRUST_LOOPBACK) as proxy:
            assert await over_tls(proxy.port, ["http/1.1"]) == ("http/1.1", b"ok")
            assert await over_tls(proxy.port, []) == (None, b"ok")
        # The header said h2 both times: midway's handshake agreed http/1.1, then none.
        assert seen.seen == ["http/1.1", None]
    run(main())
