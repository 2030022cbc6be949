"""midway's pytest plugin: the ``midway_proxy`` fixture.

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
and stops it when the test ends.  Importing this module costs only the import of
pytest; midway itself is imported when the fixture is first used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .testing import BackgroundProxy

__all__ = ["midway_proxy"]

ProxyFactory = Callable[..., "BackgroundProxy"]


@pytest.fixture
def midway_proxy() -> Iterator[ProxyFactory]:
    """A factory of in-process proxies in front of a given upstream; every proxy
    it started is stopped at teardown."""
    from .testing import BackgroundProxy

    started: list[BackgroundProxy] = []

    def start(upstream: str | Sequence[str], listen: str | Sequence[str] = "127.0.0.1:0",
              **options: Any) -> BackgroundProxy:
        proxy = BackgroundProxy(listen, upstream, **options).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in reversed(started):
        proxy.stop()
