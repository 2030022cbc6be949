"""Helpers for tests: a proxy on a background thread, for synchronous code.

Example (plain pytest, no asyncio)::

    from midway import BackgroundProxy

    def test_through_proxy(redis_port):
        with BackgroundProxy("127.0.0.1:0", f"127.0.0.1:{redis_port}") as proxy:
            client = redis.Redis(*proxy.address)
            assert client.ping()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from .api import Proxy
from .chain.base import Element
from .chain.toxics import Toxic
from .chain.toxics.live import ToxicHandle
from .control.connections import ConnectionToxicHandle
from .errors import MidwayError, at_callers_line

__all__ = ["Background", "BackgroundProxy"]

T = TypeVar("T")

_START_TIMEOUT_S = 10.0


class Service(Protocol):
    """What :class:`Background` runs: started and stopped on its loop, with an address."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def address(self) -> tuple[str, int]: ...


S = TypeVar("S", bound=Service)


class Background(Generic[S]):
    """Runs ``service`` (a :class:`~midway.api.Proxy`, a
    :class:`~midway.replay.Replay`) on its own event loop in a daemon thread.
    :meth:`start` returns once it listens (or raises what starting raised);
    :meth:`stop` stops it and joins the thread."""

    def __init__(self, service: S) -> None:
        self.service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @at_callers_line
    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.service.start())
            except BaseException as exc:  # handed to the caller of start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.service.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"midway-{type(self.service).__name__}",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(_START_TIMEOUT_S):
            raise MidwayError(f"the background {type(self.service).__name__} did not start in time")
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    @at_callers_line
    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the service's loop and return its result (thread-safe)."""
        async def wrapper() -> T:
            return fn()
        return self.run(wrapper())

    @at_callers_line
    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the service's loop and wait for its result."""
        if self._loop is None:
            coro.close()
            raise MidwayError(f"the background {type(self.service).__name__} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_START_TIMEOUT_S)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_START_TIMEOUT_S)
            self._loop = None
            self._thread = None

    @at_callers_line
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.call(lambda: self.service.address)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]


class BackgroundProxy(Background[Proxy]):
    """Runs a :class:`~midway.api.Proxy` on its own event loop in a daemon thread.

    Arguments are those of :class:`~midway.api.Proxy`.  :meth:`start` returns once
    the proxy listens (or raises what starting raised); :meth:`stop` closes every
    connection and joins the thread."""

    def __init__(self, listen: str | Sequence[str] = "127.0.0.1:0",
                 upstreams: str | Sequence[str] = (), **kwargs: Any) -> None:
        __tracebackhide__ = True  # noqa: F841 (read by pytest)
        super().__init__(Proxy(listen, upstreams, **kwargs))

    @property
    def proxy(self) -> Proxy:
        return self.service

    # -- chain elements: Proxy's methods, run on the proxy's loop ----------------

    @at_callers_line
    def add_element(self, element: Element, index: int | None = None) -> None:
        """:meth:`Proxy.add_element <midway.Proxy.add_element>`, thread-safe: open
        connections get the element too."""
        self.call(lambda: self.proxy.add_element(element, index))

    @at_callers_line
    def remove_element(self, element: Element) -> None:
        """:meth:`Proxy.remove_element <midway.Proxy.remove_element>`, thread-safe."""
        self.call(lambda: self.proxy.remove_element(element))

    # -- fault injection: Proxy's methods, run on the proxy's loop ---------------

    @at_callers_line
    def add_toxic(self, type: str, **kwargs: Any) -> ToxicHandle:
        """:meth:`Proxy.add_toxic <midway.Proxy.add_toxic>`, thread-safe; the
        handle's ``remove``/``update`` are thread-safe too::

            with proxy.add_toxic("timeout", timeout=0):
                ...                          # nothing gets through
        """
        handle = self.call(lambda: self.proxy.add_toxic(type, **kwargs))
        handle.runner = self._for_handles
        return handle

    def _for_handles(self, fn: Callable[[], T]) -> T:
        """A handle's runner: on the proxy's loop while it runs; once stopped, right
        here (no loop touches the proxy any more), so that removing a toxic after
        its proxy stopped does nothing, as with :class:`~midway.Proxy`."""
        if self._loop is None:
            return fn()
        return self.call(fn)

    @property
    def toxics(self) -> list[Toxic[Any]]:
        return self.call(lambda: self.proxy.toxics)

    def list_connections(self) -> list[dict[str, Any]]:
        """:meth:`Proxy.list_connections <midway.Proxy.list_connections>`, thread-safe."""
        return self.call(self.proxy.list_connections)

    @at_callers_line
    def add_connection_toxic(self, connection: int, type: str,
                             **kwargs: Any) -> ConnectionToxicHandle:
        """:meth:`Proxy.add_connection_toxic <midway.Proxy.add_connection_toxic>`,
        thread-safe; so is the handle's ``remove``::

            first = proxy.list_connections()[0]["id"]
            with proxy.add_connection_toxic(first, "reset_peer", timeout=0):
                ...                          # that connection is reset, no other
        """
        handle = self.call(lambda: self.proxy.add_connection_toxic(connection, type, **kwargs))
        handle.runner = self._for_handles
        return handle

    @at_callers_line
    def connection_toxics(self, connection: int) -> list[Toxic[Any]]:
        return self.call(lambda: self.proxy.connection_toxics(connection))

    @at_callers_line
    def disable(self) -> None:
        self.call(self.proxy.disable)

    @at_callers_line
    def enable(self) -> None:
        self.call(self.proxy.enable)

    @at_callers_line
    def reset(self) -> None:
        self.call(self.proxy.reset)
