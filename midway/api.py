"""The library API: run a proxy inside your own asyncio program or test.

Example::

    import asyncio, midway

    async def main():
        async with midway.Proxy("127.0.0.1:0", "127.0.0.1:6379") as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            ...

For plain (synchronous) tests, :class:`midway.BackgroundProxy` runs the same proxy
on an event loop in a background thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from .chain.base import Element
from .chain.toxics import Toxic, make_toxic
from .chain.toxics.live import ToxicHandle, add_toxic, list_toxics, reset_toxics
from .config.load import config_from_dict
from .config.schema import ProxyConfig
from .control.connections import (
    ConnectionNotFound,
    ConnectionToxicHandle,
    Found,
    add_connection_toxic,
    connection_toxics,
    find_connection,
    list_connections,
)
from .core.clock import LoopClock
from .core.observer import Observer
from .errors import MidwayError, at_callers_line
from .runtime import Runtime
from .service import ProxyService

__all__ = ["Proxy", "proxy_config"]


def proxy_config(listen: str | Sequence[str], upstreams: str | Sequence[str],
                 name: str = "default", **options: Any) -> ProxyConfig:
    """Build and validate one :class:`ProxyConfig` from Python values, with the
    same checks (and messages) as the TOML file.  ``options`` are the fields of
    :class:`~midway.config.schema.ProxyConfig`, e.g. ``idle_timeout_s=30``."""
    table: dict[str, Any] = {
        "listen": [listen] if isinstance(listen, str) else list(listen),
        "upstreams": [upstreams] if isinstance(upstreams, str) else list(upstreams),
        **options,
    }
    config = config_from_dict({"proxy": {name: table}})
    return config.proxies[0]


class Proxy:
    """One proxy, started by ``async with`` and stopped (connections closed) on exit.

    ``listen`` may use port 0; the bound address is :attr:`address`.  Keyword
    options are :class:`~midway.config.schema.ProxyConfig` fields."""

    @at_callers_line
    def __init__(
        self,
        listen: str | Sequence[str] = "127.0.0.1:0",
        upstreams: str | Sequence[str] = (),
        *,
        name: str = "default",
        elements: Iterable[Element] = (),
        observers: Iterable[Observer] = (),
        **options: Any,
    ) -> None:
        self.config = proxy_config(listen, upstreams, name, **options)
        self._elements = list(elements)
        self._observers = list(observers)
        self.runtime: Runtime | None = None

    @at_callers_line
    async def start(self) -> None:
        from .config.schema import Config

        self.runtime = Runtime(Config(proxies=(self.config,)), observers=self._observers,
                               elements={self.config.name: self._elements})
        await self.runtime.start()

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting, wait up to ``drain_timeout_s`` for connections to end,
        then close them."""
        if self.runtime is not None:
            await self.runtime.shutdown(drain_timeout_s)
            self.runtime = None

    async def __aenter__(self) -> Proxy:
        __tracebackhide__ = True  # noqa: F841 (read by pytest)
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def service(self) -> ProxyService:
        if self.runtime is None:
            raise MidwayError("the proxy is not running")
        return self.runtime.services[self.config.name]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the first listener, with the real port (also while
        disabled: it comes back on the same port)."""
        service = self.service
        if not service.listeners:
            first = service.config.listen[0]
            return first.host, first.port
        host, port = service.listeners[0].sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def connections(self) -> int:
        """How many connections are open right now (connecting or relaying);
        :meth:`list_connections` lists them."""
        return self.service.active

    def add_element(self, element: Element, index: int | None = None) -> None:
        """Attach a chain element, to open connections too."""
        self.service.add_element(element, index)

    def remove_element(self, element: Element) -> None:
        self.service.remove_element(element)

    # -- fault injection (Toxiproxy's toxics; see docs/faults.md) ---------------

    @at_callers_line
    def add_toxic(self, type: str, *, name: str | None = None, stream: str = "downstream",
                  toxicity: float = 1.0, conditions: dict[str, Any] | None = None,
                  seed: int | None = None, **attributes: Any) -> ToxicHandle:
        """Add a toxic, live: open connections get it too.  ``attributes`` are the
        toxic's (``latency=200``, ``rate=100``...), with Toxiproxy's names, units
        and defaults; ``name`` defaults to ``TYPE_STREAM``.  ``seed`` makes its
        random draws repeat (see docs/faults.md); ``None``: the proxy's ``seed``
        option, else one drawn and logged.  Returns a handle to
        remove or update it, usable as a context manager::

            with proxy.add_toxic("latency", latency=200, stream="downstream"):
                ...

        Raises :class:`~midway.chain.toxics.ToxicError` (a ``ValueError``) for a
        bad setting and :class:`~midway.chain.toxics.live.ToxicExists` when the
        name is taken."""
        toxic = make_toxic(type, name=name, stream=stream, toxicity=toxicity,
                           attributes=attributes, conditions=conditions, clock=LoopClock(),
                           seed=seed if seed is not None else self.config.seed or None)
        return ToxicHandle(self.service, add_toxic(self.service, toxic))

    @property
    def toxics(self) -> list[Toxic[Any]]:
        """The proxy's toxics, in Toxiproxy's order (upstream ones first)."""
        return list_toxics(self.service)

    # -- one connection (the admin API's /connections; see docs/faults.md) ------

    @at_callers_line
    def list_connections(self) -> list[dict[str, Any]]:
        """The proxy's open connections (those still connecting too), oldest
        first, each as ``GET /connections`` shows it: ``{"id": 7, "client":
        "127.0.0.1:50312", "upstream": ..., "state": "open", "toxics": [...],
        ...}``.  :attr:`connections` is how many there are."""
        return list_connections(self._runtime, self._runtime.worker, self.config.name)

    @at_callers_line
    def add_connection_toxic(self, connection: int, type: str, *, name: str | None = None,
                             stream: str = "downstream", toxicity: float = 1.0,
                             conditions: dict[str, Any] | None = None, seed: int | None = None,
                             **attributes: Any) -> ConnectionToxicHandle:
        """Add a toxic to the open connection of id ``connection`` alone, live
        (``POST /connections/ID/toxics``): no other connection gets it, and it
        goes with the connection.  Arguments as for :meth:`add_toxic`, whose
        errors it raises too; also :class:`ConnectionNotFound` (no such open
        connection of this proxy) and
        :class:`~midway.control.connections.StillConnecting`.  The handle's
        :meth:`~ConnectionToxicHandle.remove` does nothing once the connection
        has ended::

            first = proxy.list_connections()[0]["id"]
            with proxy.add_connection_toxic(first, "latency", latency=200):
                ...                     # that connection's replies 200 ms late
        """
        found = self._connection(connection)
        toxic_name = name if name is not None else f"{type}_{stream}"
        relay, toxic = add_connection_toxic(found, toxic_name, lambda: make_toxic(
            type, name=name, stream=stream, toxicity=toxicity, attributes=attributes,
            conditions=conditions, clock=LoopClock(),
            seed=seed if seed is not None else self.config.seed or None))
        return ConnectionToxicHandle(found[0], relay, toxic)

    @at_callers_line
    def connection_toxics(self, connection: int) -> list[Toxic[Any]]:
        """The toxics of connection ``connection``'s own (the proxy's are
        :attr:`toxics`).  Raises :class:`ConnectionNotFound`."""
        return connection_toxics(self._connection(connection))

    def _connection(self, connection: int) -> Found:
        if isinstance(connection, bool) or not isinstance(connection, int):
            raise MidwayError(f"connection: expected a connection id (an int, the 'id' of "
                              f"list_connections()), got {connection!r}")
        found = find_connection(self._runtime, connection)
        if found is None or found[0].name != self.config.name:
            raise ConnectionNotFound(connection, self.config.name)
        return found

    @property
    def enabled(self) -> bool:
        return self.service.enabled

    @at_callers_line
    def disable(self) -> None:
        """Take the proxy down: stop listening and close its connections (Toxiproxy's
        ``enabled = false``).  :meth:`enable` brings it back on the same address."""
        self._runtime.enable_proxy(self.config.name, False)

    @at_callers_line
    def enable(self) -> None:
        self._runtime.enable_proxy(self.config.name, True)

    @at_callers_line
    def reset(self) -> None:
        """Enable the proxy and remove every toxic (Toxiproxy's ``POST /reset``)."""
        self.enable()
        reset_toxics(self.service)

    @property
    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise MidwayError("the proxy is not running")
        return self.runtime
