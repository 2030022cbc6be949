"""midway's pytest plugin: the ``midway_proxy`` and ``midway_replay`` fixtures.

Installed with midway and registered through the ``pytest11`` entry point, so any
test can ask for it::

    def test_times_out(midway_proxy):
        proxy = midway_proxy("127.0.0.1:6379")         # in-process, on a free port
        with proxy.add_toxic("timeout", timeout=0):     # nothing gets through
            client = redis.Redis(*proxy.address, socket_timeout=0.5)
            with pytest.raises(redis.TimeoutError):
                client.ping()

``midway_proxy(upstream, listen="127.0.0.1:0", **options)`` starts a
:class:`~midway.BackgroundProxy` (options are those of :class:`~midway.Proxy`)
and stops it when the test ends.  A toxic can go on one connection alone::

    def test_one_client_reset(midway_proxy):
        proxy = midway_proxy("127.0.0.1:6379")                   # a redis-server
        a = socket.create_connection(proxy.address, timeout=5)
        b = socket.create_connection(proxy.address, timeout=5)
        for client in (a, b):
            client.sendall(b"PING\r\n")
            assert client.recv(100) == b"+PONG\r\n"
        first = proxy.list_connections()[0]["id"]                # a's: the oldest
        with proxy.add_connection_toxic(first, "reset_peer"):
            a.sendall(b"PING\r\n")
            with pytest.raises(ConnectionResetError):
                a.recv(100)
            b.sendall(b"PING\r\n")
            assert b.recv(100) == b"+PONG\r\n"                   # b is untouched

``midway_replay(capture, listen="127.0.0.1:0", **options)`` starts a
:class:`~midway.replay.BackgroundReplay`: a fake upstream answering from a
capture recorded with ``midway --pcap`` (options: ``loose``, ``timing``,
``wait_s``; see :mod:`midway.replay`), stopped when the test ends::

    def test_against_the_recording(midway_replay):
        replay = midway_replay("tests/data/session.pcap")
        assert fetch(*replay.address) == EXPECTED
        assert replay.failures == []          # every request matched the recording

Importing this module costs only the import of pytest; midway itself is
imported when a fixture is first used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .replay import BackgroundReplay
    from .testing import BackgroundProxy

__all__ = ["midway_proxy", "midway_replay"]

ProxyFactory = Callable[..., "BackgroundProxy"]
ReplayFactory = Callable[..., "BackgroundReplay"]


@pytest.fixture
def midway_proxy() -> Iterator[ProxyFactory]:
    """A factory of in-process proxies in front of a given upstream; every proxy
    it started is stopped at teardown."""
    from .testing import BackgroundProxy

    started: list[BackgroundProxy] = []

    def start(upstream: str | Sequence[str], listen: str | Sequence[str] = "127.0.0.1:0",
              **options: Any) -> BackgroundProxy:
        __tracebackhide__ = True  # noqa: F841 (read by pytest)
        proxy = BackgroundProxy(listen, upstream, **options).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in reversed(started):
        proxy.stop()


@pytest.fixture
def midway_replay() -> Iterator[ReplayFactory]:
    """A factory of in-process replays of recorded captures; every replay it
    started is stopped at teardown."""
    from .replay import BackgroundReplay

    started: list[BackgroundReplay] = []

    def start(capture: str | os.PathLike[str], listen: str = "127.0.0.1:0",
              **options: Any) -> BackgroundReplay:
        __tracebackhide__ = True  # noqa: F841 (read by pytest)
        replay = BackgroundReplay(capture, listen, **options).start()
        started.append(replay)
        return replay

    yield start
    for replay in reversed(started):
        replay.stop()
