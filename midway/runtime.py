"""The runtime: every proxy of a process, the process-wide limits, the observers,
and the lifecycle (start → serve → drain → stop).

Proxies can be added, changed and removed while the runtime serves; that is what
the admin API and a configuration reload build on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import resource
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .chain.base import Element
from .chain.registry import build_elements
from .config.addresses import Address
from .config.schema import Config, ProxyConfig, ServerConfig
from .core.observer import AccessLog, CloseReason, Observer, Observers
from .errors import ConfigError, ListenError
from .service import ProxyService

if TYPE_CHECKING:
    from .admin.server import AdminServer

__all__ = ["Runtime", "auto_max_connections"]

log = logging.getLogger("midway")

_FD_RESERVE = 64
"""Descriptors kept back from the automatic connection limit for listeners, logs,
pipes and the event loop itself."""
_MIN_AUTO_CONNECTIONS = 16


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as HAProxy does at start);
    returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def auto_max_connections(open_files: int) -> int:
    """Each relayed connection holds two descriptors (client and upstream)."""
    return max(_MIN_AUTO_CONNECTIONS, (open_files - _FD_RESERVE) // 2)


class Runtime:
    """Runs the proxies of a :class:`~midway.config.schema.Config`.

    ``elements`` maps a proxy name to its initial chain elements.  Observers get a
    :class:`~midway.core.observer.CloseRecord` for every finished connection.
    ``ids`` numbers the connections (1, 2, 3, ... by default; a worker's come from
    :class:`midway.workers.ConnectionIds`, unique across the workers) and
    ``worker`` is the worker number each record names (1 for a single process)."""

    def __init__(
        self,
        config: Config,
        *,
        observers: Iterable[Observer] = (),
        elements: dict[str, list[Element]] | None = None,
        ids: Iterator[int] | None = None,
        worker: int = 1,
    ) -> None:
        self.config = config
        self.services: dict[str, ProxyService] = {}
        self.observers = Observers(observers)
        self._initial_elements = elements or {}
        self._ids = ids if ids is not None else itertools.count(1)
        self.worker = worker
        self.pid = os.getpid()
        self.active = 0
        self.max_connections = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._access_log: AccessLog | None = None
        self.started = False
        self.stopping = False
        self.reuse_port = config.server.workers != 1
        """Bind with SO_REUSEPORT: other worker processes share the listeners."""
        self.admin: AdminServer | None = None
        """The admin HTTP API, when ``server.admin`` is set (see :mod:`midway.admin`)."""
        self._timelines: dict[str, asyncio.Task[None]] = {}

    @property
    def server(self) -> ServerConfig:
        return self.config.server

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener, then start accepting.  All or nothing: on a
        :class:`ListenError` nothing is left bound."""
        if self.server.max_connections:
            self.max_connections = self.server.max_connections
        else:
            self.max_connections = auto_max_connections(raise_open_file_limit())
        if self.server.access_log:
            try:
                self._access_log = AccessLog(self.server.access_log)
            except OSError as exc:
                raise ConfigError("server.access_log",
                                  f"cannot open {self.server.access_log}: {exc.strerror}") from exc
            self.observers.append(self._access_log)
        services = [
            ProxyService(p, self, [*build_elements(p), *self._initial_elements.get(p.name, ())])
            for p in self.config.proxies
        ]
        try:
            for service in services:
                try:
                    service.bind()
                except ListenError as exc:  # name the proxy as well as the address
                    raise ListenError(f"proxy {service.name}: {exc}") from exc
                _pin_ports(service)
                self.services[service.name] = service
            if self.server.admin:
                from .admin.server import AdminServer

                admin = AdminServer(self, self.server.admin)
                admin.start()
                self.admin = admin
        except ListenError:
            for service in services:
                service.close_listeners()
                _close_elements(service)
            self.services.clear()
            raise
        for service in services:
            service.start_accepting()
            self._start_timeline(service)
        self.started = True

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, let open connections finish for up to
        ``drain_timeout_s`` (default: the configured one), then end the rest
        (:meth:`close_all`: a reset for any still moving data)."""
        if drain_timeout_s is None:
            drain_timeout_s = self.server.drain_timeout_s
        self.stopping = True
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        for task in self._timelines.values():
            task.cancel()
        self._timelines.clear()
        for service in self.services.values():
            service.close_listeners()
        if self.active and drain_timeout_s > 0:
            log.info("draining %d connection(s) for up to %g s", self.active, drain_timeout_s)
            try:
                async with asyncio.timeout(drain_timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                log.info("drain timeout: closing %d connection(s)", self.active)
        self.close_all("drain timeout" if self.active and drain_timeout_s > 0 else "proxy stopping")
        # Connections still dialing finish their cancellation on the next turns.
        for _ in range(3):
            await asyncio.sleep(0)
        if self._access_log is not None:
            self._access_log.close()
            self.observers.remove(self._access_log)
            self._access_log = None
        for service in self.services.values():
            _close_elements(service)

    def close_all(self, detail: str = "proxy stopping") -> None:
        """End every open connection of every proxy now, with the reason
        ``shutdown``: a connection with nothing in flight gets a FIN, one cut in
        the middle of a transfer a reset (see :meth:`Relay.close
        <midway.core.relay.Relay.close>` and docs/guarantees.md)."""
        for service in self.services.values():
            service.close_connections(CloseReason.SHUTDOWN, detail)

    # -- proxies, live -------------------------------------------------------

    def add_proxy(self, config: ProxyConfig, elements: Iterable[Element] = (), *,
                  enabled: bool = True) -> ProxyService:
        """Bind and start a new proxy (or, with ``enabled=False``, only register it:
        see :meth:`enable_proxy`).  Raises :class:`ConfigError` for a duplicate
        name, :class:`ListenError` if it cannot bind."""
        if config.name in self.services:
            raise ConfigError(f"proxy.{config.name}", "a proxy with this name already exists")
        service = ProxyService(config, self, [*build_elements(config), *elements])
        if enabled:
            service.bind()
            _pin_ports(service)
        else:
            service.enabled = False
        self.services[config.name] = service
        if enabled and not self.stopping:
            service.start_accepting()
        self._start_timeline(service)
        return service

    def remove_proxy(self, name: str, *, close_connections: bool = True) -> None:
        """Stop a proxy's listeners and (by default) close its connections."""
        service = self.services.pop(name)
        timeline = self._timelines.pop(name, None)
        if timeline is not None:
            timeline.cancel()
        service.close_listeners()
        if close_connections:
            service.close_connections(CloseReason.SHUTDOWN)
            _close_elements(service)

    def update_proxy(self, config: ProxyConfig, *, enabled: bool | None = None) -> ProxyService:
        """Change a live proxy, and (with ``enabled``) start or stop its listening
        in the same step.  Open connections keep going; new ones use the new
        settings.  Listeners are rebound only if the listen addresses changed or
        the proxy is being enabled.  All or nothing: on a :class:`ListenError`
        the proxy is as it was (listening where it was, if it was)."""
        service = self.services[config.name]
        config = dataclasses.replace(
            config, listen=_keep_ports(config.listen, service.config.listen))
        enable = service.enabled if enabled is None else enabled
        if not enable:
            self.enable_proxy(config.name, False)
        elif not service.enabled or config.listen != service.config.listen:
            was_listening = service.enabled
            previous = service.config
            service.close_listeners()
            service.config = config
            try:
                service.bind()
            except ListenError:
                service.config = previous
                if was_listening:
                    self._listen_again(service)
                raise
            _pin_ports(service)
            service.enabled = True
            if not self.stopping:
                service.start_accepting()
            config = dataclasses.replace(config, listen=service.config.listen)
        service.reconfigure(config)
        return service

    def _listen_again(self, service: ProxyService) -> None:
        """Rebind a proxy's previous listeners after a failed move; should even
        that fail (another process took the port meanwhile), it ends disabled."""
        try:
            service.bind()
        except ListenError as exc:
            service.enabled = False
            log.error("%s: disabled: cannot listen again where it was: %s", service.name, exc)
            return
        service.start_accepting()

    def enable_proxy(self, name: str, enabled: bool) -> None:
        """Start or stop a proxy's listening (Toxiproxy's ``enabled``); disabling
        also closes its connections, as Toxiproxy does.  Raises
        :class:`ListenError` (nothing changed) if it cannot bind."""
        service = self.services[name]
        if enabled == service.enabled:
            return
        if enabled:
            service.bind()
            _pin_ports(service)
            service.enabled = True
            if not self.stopping:
                service.start_accepting()
        else:
            service.enabled = False
            service.close_listeners()
            service.close_connections(CloseReason.SHUTDOWN)

    def enable_proxies(self, names: Iterable[str]) -> None:
        """Enable several proxies, all or nothing (Toxiproxy's reset): if one
        cannot bind, those enabled here are disabled again, as they were, and a
        :class:`ListenError` naming the proxy is raised."""
        done: list[tuple[ProxyService, ProxyConfig]] = []
        try:
            for name in names:
                service = self.services[name]
                if not service.enabled:
                    previous = service.config
                    try:
                        self.enable_proxy(name, True)
                    except ListenError as exc:
                        raise ListenError(f"{name}: {exc}") from exc
                    done.append((service, previous))
        except ListenError:
            # Nothing was accepted meanwhile: this runs on the loop, in one step.
            for service, previous in done:
                service.enabled = False
                service.close_listeners()
                service.config = previous
            raise

    def _start_timeline(self, service: ProxyService) -> None:
        """Play the proxy's timed toxics (``at_s``/``until_s``), if it has any."""
        specs = service.config.toxics
        if not any(spec.at_s > 0 or spec.until_s is not None for spec in specs):
            return
        from .timeline import Timeline

        timeline = Timeline(service, specs, proxy=service.name)
        self._timelines[service.name] = asyncio.get_running_loop().create_task(
            timeline.run(), name=f"midway timeline {service.name}")

    # -- accounting, called by services ---------------------------------------

    def next_connection_id(self) -> int:
        return next(self._ids)

    def has_room(self) -> bool:
        return self.active < self.max_connections

    def connection_opened(self) -> None:
        self.active += 1
        self._idle.clear()

    def connection_closed(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()
        if not self.stopping:
            for service in self.services.values():
                service.room_changed()


def _close_elements(service: ProxyService) -> None:
    """Let the proxy's elements release their files and threads (dump, pcap)."""
    for element in service.elements:
        try:
            element.close()
        except Exception:
            log.exception("%s: chain element %s failed to close", service.name, element.name)


def _pin_ports(service: ProxyService) -> None:
    """Write the real port of each listener asked on port 0 into the proxy's
    configuration, so that a proxy disabled and enabled again comes back on the
    same port (as Toxiproxy's does) and reports where it listens."""
    listen = tuple(
        dataclasses.replace(address, port=listener.port)
        if address.port == 0 and not address.is_unix else address
        for address, listener in zip(service.config.listen, service.listeners, strict=False)
    )
    if listen != service.config.listen:
        service.config = dataclasses.replace(service.config, listen=listen)


def _keep_ports(new: tuple[Address, ...], current: tuple[Address, ...]) -> tuple[Address, ...]:
    """Port 0 ("any port") in a changed configuration keeps the port already in use."""
    if len(new) != len(current):
        return new
    return tuple(
        old if address.port == 0 and not address.is_unix and address.host == old.host else address
        for address, old in zip(new, current, strict=True)
    )
