"""The one dialer over real loopback sockets: each failure gets its DialFailure
(refused, timed out, resolve failed, reset, unreachable), every resolved address of
a name is tried (each within its share of the connect timeout, on a clock moved by
hand), and the IP-literal path runs with no task."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

import pytest

from midway.config.addresses import Address
from midway.errors import UpstreamError
from midway.upstream.dial import Dialer, DialFailure, dial, loop_resolver

from ..helpers import black_hole

_LINGER_RESET = struct.pack("ii", 1, 0)


class _Upstream:
    __slots__ = ("address",)

    def __init__(self, address: Address) -> None:
        self.address = address


class Recorder(Dialer):
    """A dialer that records what it is told, and a future for the end."""

    __slots__ = ("events", "done")

    def __init__(self, candidates: list[Address], timeout_s: float = 5.0,
                 resolve: Any = None) -> None:
        loop = asyncio.get_running_loop()
        self.events: list[tuple[str, str, str]] = []
        self.done: asyncio.Future[socket.socket | None] = loop.create_future()
        self.init_dial(loop, [_Upstream(a) for a in candidates], timeout_s,
                       resolve or loop_resolver)

    def dial_connected(self, sock: socket.socket, target: Any) -> None:
        self.events.append(("connected", str(target.address), ""))
        self.poller.forget(sock.fileno())
        self.done.set_result(sock)

    def dial_failed(self, target: Any, failure: DialFailure, detail: str) -> None:
        self.events.append((failure.value, str(target.address), detail))

    def dial_given_up(self, failure: DialFailure) -> None:
        self.events.append(("given_up", failure.value, ""))
        self.done.set_result(None)

    async def result(self) -> socket.socket | None:
        self.dial_next()
        async with asyncio.timeout(10):
            return await self.done


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class _HandClock:
    """The loop, but its time moved by hand; and the dialer's deadlines recorded,
    to be passed by calling ``deadline_passed`` (no real timer fires)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 100.0
        self.deadline: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def time(self) -> float:
        return self.now

    def schedule(self, when: float, owner: Any) -> None:
        owner.deadline_token, self.deadline = 1, when

    def cancel(self, owner: Any) -> None:
        owner.deadline_token, self.deadline = 0, None

    def pass_deadline(self, owner: Any) -> None:
        """Move the clock to the deadline and pass it, as the real heap would."""
        assert self.deadline is not None
        self.now = self.deadline
        self.cancel(owner)
        owner.deadline_passed()


def _on_hand_clock(d: Dialer) -> _HandClock:
    clock = _HandClock(d.loop)
    d.loop = clock  # type: ignore[assignment]
    d.deadlines = clock  # type: ignore[assignment]
    return clock


def _resolving_to(addrs: list[tuple[str, int]]) -> Any:
    """A resolver that answers every name with ``addrs`` (IPv4)."""
    async def resolve(host: str, port: int) -> list[tuple[int, Any]]:
        return [(socket.AF_INET, a) for a in addrs]
    return resolve


async def _connecting(d: Dialer) -> None:
    """Let the lookup task run until the first address is being connected to."""
    async with asyncio.timeout(10):
        while d.task is not None or d.sock is None:
            await asyncio.sleep(0)


def test_refused_then_the_next_upstream_connects_with_no_task() -> None:
    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        live = Address("127.0.0.1", server.getsockname()[1])
        dead = Address("127.0.0.1", _closed_port())
        tasks_before = len(asyncio.all_tasks())
        d = Recorder([dead, live])
        d.dial_next()
        assert len(asyncio.all_tasks()) == tasks_before  # IP literals: callbacks only
        async with asyncio.timeout(10):
            sock = await d.done
        assert sock is not None
        sock.close()
        server.close()
        assert d.events == [("refused", str(dead), "connection refused"),
                            ("connected", str(live), "")]
    run(main())


def test_every_upstream_refused_gives_up_with_the_last_failure() -> None:
    async def main() -> None:
        a, b = Address("127.0.0.1", _closed_port()), Address("127.0.0.1", _closed_port())
        d = Recorder([a, b])
        assert await d.result() is None
        assert [e[0] for e in d.events] == ["refused", "refused", "given_up"]
        assert d.events[-1][1] == "refused"
    run(main())


def test_timed_out_when_the_upstream_never_answers_the_handshake() -> None:
    async def main() -> None:
        # A listener whose accept queue is full drops further SYNs (Linux): the
        # connect neither succeeds nor fails, so only the timeout ends it.
        with black_hole() as holed:
            address = Address(*holed)
            d = Recorder([address], timeout_s=0.3)
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await d.result() is None
            elapsed = loop.time() - started
        assert d.events[0] == ("timed_out", str(address), "connect timed out after 0.3 s")
        assert 0.25 <= elapsed < 2.0
    run(main())


def test_resolve_failed_then_every_resolved_address_is_tried() -> None:
    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        dead = _closed_port()

        async def resolve(host: str, p: int) -> list[tuple[int, Any]]:
            if host == "nosuch.invalid":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            # Two addresses: the first refuses, the second is the live server.
            return [(socket.AF_INET, ("127.0.0.1", dead)), (socket.AF_INET, ("127.0.0.1", port))]

        bad = Address("nosuch.invalid", 80)
        good = Address("multi.test", port)
        d = Recorder([bad, good], resolve=resolve)
        sock = await d.result()
        assert sock is not None and sock.getpeername()[1] == port
        sock.close()
        server.close()
        assert d.events == [
            ("resolve_failed", "nosuch.invalid:80",
             "cannot resolve 'nosuch.invalid' (Name or service not known)"),
            ("connected", f"multi.test:{port}", ""),
        ]
    run(main())


def test_a_name_whose_addresses_all_fail_names_each_failure() -> None:
    async def main() -> None:
        dead1, dead2 = _closed_port(), _closed_port()

        async def resolve(host: str, p: int) -> list[tuple[int, Any]]:
            return [(socket.AF_INET, ("127.0.0.1", dead1)), (socket.AF_INET, ("127.0.0.1", dead2))]

        d = Recorder([Address("two.test", 80)], resolve=resolve)
        assert await d.result() is None
        assert d.events[0] == ("refused", "two.test:80",
                               f"127.0.0.1:{dead1}: connection refused; "
                               f"127.0.0.1:{dead2}: connection refused")
    run(main())


def test_a_loopback_upstream_is_connected_when_connect_returns() -> None:
    """A non-blocking connect to a loopback listener says "in progress" but the
    handshake is done: the dial ends inside ``dial_next``, before the loop runs,
    with no writer registered and no connect deadline left scheduled."""
    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        d = Recorder([Address("127.0.0.1", server.getsockname()[1])])
        d.dial_next()
        assert d.events == [("connected", str(Address("127.0.0.1",
                                                       server.getsockname()[1])), "")]
        assert len(d.poller) == 0 and len(d.deadlines) == 0
        sock = d.done.result()
        assert sock is not None
        conn, _ = server.accept()
        sock.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        for s in (sock, conn, server):
            s.close()
    run(main())


def test_an_address_that_keeps_missing_is_asked_only_now_and_then(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream whose handshake takes a round trip (here: one that never
    answers) is asked ``TCP_INFO`` only until it has missed a few times; the
    dial then waits for the writer as before, and still times out."""
    from midway.upstream import dial as dial_module
    asked: list[int] = []
    real = socket.socket.getsockopt

    def counting(sock: socket.socket, *args: Any) -> Any:
        if args[:2] == (socket.IPPROTO_TCP, socket.TCP_INFO):
            asked.append(1)
        return real(sock, *args)

    monkeypatch.setattr(socket.socket, "getsockopt", counting)
    monkeypatch.setattr(dial_module, "_MISSES", {})

    async def main() -> None:
        with black_hole() as (host, port):
            for _ in range(dial_module._MISS_LIMIT + 4):
                d = Recorder([Address(host, port)], timeout_s=0.05)
                assert await d.result() is None
                assert d.events[0][0] == "timed_out"
    run(main())
    assert len(asked) == dial_module._MISS_LIMIT


def test_reset_right_after_accept_stops_the_dial(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream that accepts and resets before the relay begins: RESET, and the
    next upstream is not tried (it would replay a connection the first one took).
    (A remote upstream's case: its handshake completes after ``connect`` returns,
    which here the dialer is made to believe by not asking.)"""
    from midway.upstream import dial as dial_module
    monkeypatch.setattr(dial_module, "_TCP_INFO", None)

    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        other = socket.create_server(("127.0.0.1", 0))
        first = Address("127.0.0.1", server.getsockname()[1])
        second = Address("127.0.0.1", other.getsockname()[1])
        d = Recorder([first, second])
        d.dial_next()  # the connect is under way; the loop has not run yet
        conn, _ = server.accept()  # the handshake completed in the kernel
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        conn.close()
        async with asyncio.timeout(10):
            assert await d.done is None
        server.close()
        other.close()
        assert d.events == [("reset", str(first), "upstream: connection reset by peer"),
                            ("given_up", "reset", "")]
    run(main())


def test_missing_unix_socket_is_unreachable(tmp_path: Any) -> None:
    async def main() -> None:
        d = Recorder([Address(path=str(tmp_path / "nothing.sock"))])
        assert await d.result() is None
        assert d.events[0][0] == "unreachable"
    run(main())


def test_dial_coroutine_raises_with_the_failure() -> None:
    async def main() -> None:
        with pytest.raises(UpstreamError) as info:
            await dial(Address("127.0.0.1", _closed_port()), 5)
        assert info.value.failure is DialFailure.REFUSED  # type: ignore[attr-defined]
        assert str(info.value).endswith(": connection refused")
    run(main())


def test_a_name_whose_first_address_never_answers_reaches_the_next() -> None:
    """An AAAA record where IPv6 is black-holed: the first address gets its share
    of the connect timeout (5 s over 2 addresses), then the next one connects."""
    async def main() -> None:
        with black_hole() as holed, socket.create_server(("127.0.0.1", 0)) as server:
            live = server.getsockname()
            d = Recorder([Address("both.test", 80)], timeout_s=5,
                         resolve=_resolving_to([holed, live]))
            clock = _on_hand_clock(d)
            d.dial_next()
            assert clock.deadline == 105.0  # the name's connect timeout, lookup included
            await _connecting(d)
            assert clock.deadline == 102.5  # the first address's share
            clock.pass_deadline(d)
            async with asyncio.timeout(10):
                sock = await d.done
            assert sock is not None and sock.getpeername() == live
            sock.close()
        assert d.events == [("connected", "both.test:80", "")]
    run(main())


def test_a_name_whose_addresses_never_answer_names_each_in_the_timeout() -> None:
    async def main() -> None:
        with black_hole() as a, black_hole() as b, black_hole() as c:
            d = Recorder([Address("dark.test", 80)], timeout_s=5,
                         resolve=_resolving_to([a, b, c]))
            clock = _on_hand_clock(d)
            d.dial_next()
            await _connecting(d)
            # 5 s over 3 addresses is under the 2 s minimum: 2 s, 2 s, then what is left.
            seen = []
            while clock.deadline is not None:
                seen.append(clock.deadline)
                clock.pass_deadline(d)
            assert seen == [102.0, 104.0, 105.0]
            assert await d.done is None
        notes = "; ".join(f"127.0.0.1:{h[1]}: no answer" for h in (a, b, c))
        assert d.events == [("timed_out", "dark.test:80", f"connect timed out after 5 s ({notes})"),
                            ("given_up", "timed_out", "")]
    run(main())


def test_a_lookup_that_never_answers_times_out_naming_the_lookup() -> None:
    async def main() -> None:
        async def resolve(host: str, p: int) -> list[tuple[int, Any]]:
            await asyncio.sleep(3600)
            return []

        d = Recorder([Address("slow.test", 80)], timeout_s=5, resolve=resolve)
        clock = _on_hand_clock(d)
        d.dial_next()
        await asyncio.sleep(0)
        clock.pass_deadline(d)
        assert await d.done is None
        assert d.events[0] == ("timed_out", "slow.test:80",
                               "connect timed out after 5 s (looking up 'slow.test')")
    run(main())


class _GatedDns:
    """``socket.getaddrinfo`` for the loop's executor: every name is 127.0.0.1,
    and a lookup of ``slow.test`` blocks until :attr:`release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        self.asked.append(host)
        if host == "slow.test":
            self.release.wait(30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


def test_connections_asking_for_one_name_share_its_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty connections to a name whose lookup hangs hold one thread, not forty
    (the executor has at most 32): a lookup of another name still answers."""
    dns = _GatedDns()
    monkeypatch.setattr(socket, "getaddrinfo", dns)

    async def main() -> None:
        waiters = [asyncio.ensure_future(loop_resolver("slow.test", 80)) for _ in range(40)]
        try:
            async with asyncio.timeout(10):
                while not dns.asked:
                    await asyncio.sleep(0.01)
            async with asyncio.timeout(10):
                assert await loop_resolver("fast.test", 80) == [
                    (socket.AF_INET, ("127.0.0.1", 80))]
            assert dns.asked == ["slow.test", "fast.test"]
            for w in waiters[1:]:
                w.cancel()  # their connect timeouts: the lookup goes on for the first
        finally:
            dns.release.set()
        async with asyncio.timeout(10):
            assert await waiters[0] == [(socket.AF_INET, ("127.0.0.1", 80))]
        # The next connection asks again: DNS changes are followed.
        await loop_resolver("slow.test", 80)
        assert dns.asked == ["slow.test", "fast.test", "slow.test"]
    run(main())
