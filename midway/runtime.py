"""The runtime: every proxy of a process, the process-wide limits, the observers,
and the lifecycle (start → serve → drain → stop).  This is the data plane of one
process; it knows nothing of the admin API, signals or other workers (the control
plane, :mod:`midway.control`, drives it).

Proxies can be added, changed, drained and removed while the runtime serves;
that is what the control plane's changes and reloads are made of.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import resource
from collections.abc import Iterable, Iterator, Sequence

from .chain.base import Element
from .chain.registry import build_elements
from .chain.toxics.config import build_toxic
from .config.schema import Config, ProxyConfig, ServerConfig, ToxicSpec
from .config.target import keep_ports
from .core.accesslog import AccessLog
from .core.clock import LoopClock
from .core.deadlines import deadlines_for
from .core.listener import Listener
from .core.observer import CloseReason, Observer, Observers
from .errors import ConfigError, ListenError
from .service import ProxyService
from .timeline import Timeline

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
    ``worker`` is the worker number each record names (1 for a single process);
    ``reuse_port``: this is one of several worker processes sharing the listeners."""

    def __init__(
        self,
        config: Config,
        *,
        observers: Iterable[Observer] = (),
        elements: dict[str, list[Element]] | None = None,
        ids: Iterator[int] | None = None,
        worker: int = 1,
        reuse_port: bool = False,
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
        self.reuse_port = reuse_port
        """Bind with SO_REUSEPORT: other worker processes share the listeners
        (set by a worker of several, never from ``[server] workers``: a
        single process, ``workers = auto`` on one CPU or a library's runtime,
        shares its ports with no one)."""
        self._timelines: dict[str, asyncio.Task[None]] = {}
        self._timeline_of: dict[str, Timeline] = {}
        self._draining: dict[ProxyService, asyncio.Event] = {}
        """Proxies removed by a reload whose connections may still finish."""
        self._drain_tasks: set[asyncio.Task[None]] = set()

    @property
    def server(self) -> ServerConfig:
        return self.config.server

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener, then start accepting.  All or nothing: on a
        :class:`ListenError` nothing is left bound."""
        self._set_limit()
        self._open_access_log()
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
        for task in [*self._timelines.values(), *self._drain_tasks]:
            task.cancel()
        self._timelines.clear()
        self._drain_tasks.clear()
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
        for service in [*self.services.values(), *self._draining]:
            _close_elements(service)
        self._draining.clear()
        deadlines_for(asyncio.get_running_loop()).release()  # its timer holds the loop

    def close_all(self, detail: str = "proxy stopping") -> None:
        """End every open connection of every proxy now, with the reason
        ``shutdown``: a connection with nothing in flight gets a FIN, one cut in
        the middle of a transfer a reset (see :meth:`Relay.close
        <midway.core.relay.Relay.close>` and docs/guarantees.md)."""
        for service in [*self.services.values(), *self._draining]:
            service.close_connections(CloseReason.SHUTDOWN, detail)

    def all_services(self) -> list[ProxyService]:
        """Every proxy that may have connections: those serving and those draining."""
        return [*self.services.values(), *self._draining]

    # -- server settings, live ---------------------------------------------------

    def set_server(self, server: ServerConfig) -> None:
        """Take new server settings while serving (a reload): the connection
        limit and the access log change now; the drain timeout applies to the
        next drain.  ``workers`` and ``loop`` cannot change in a running process
        (the control plane keeps their running values).  Raises
        :class:`ConfigError` if a new access log cannot be opened (the old one
        is kept)."""
        previous = self.server
        self.config = dataclasses.replace(self.config, server=server)
        if server.access_log != previous.access_log:
            old = self._access_log
            try:
                self._open_access_log()
            except ConfigError:
                self.config = dataclasses.replace(self.config, server=previous)
                self._access_log = old  # still written, and closed at the stop
                raise
            if old is not None:
                old.close()
                self.observers.remove(old)
        if server.max_connections != previous.max_connections:
            self._set_limit()
            for service in self.services.values():
                service.room_changed()

    def reopen_access_log(self) -> None:
        """Open the access log's path again, as a reload does, so that lines go
        to the file now at the path (logrotate renamed the old one) rather than
        to the renamed one.  Raises :class:`ConfigError` if it cannot be opened
        (the old one is kept)."""
        old = self._access_log
        if old is None or self.server.access_log == "-":
            return
        try:
            self._open_access_log()
        except ConfigError:
            self._access_log = old
            raise
        old.close()
        self.observers.remove(old)

    def _set_limit(self) -> None:
        # Raised whatever the limit, as HAProxy raises ulimit-n for its maxconn:
        # a limit of 1000 under a shell's soft 1024 would fail clients past ~480.
        open_files = raise_open_file_limit()
        wanted = self.server.max_connections
        if not wanted:
            self.max_connections = auto_max_connections(open_files)
            return
        self.max_connections = wanted
        if (needed := 2 * wanted + _FD_RESERVE) > open_files:
            log.warning("server.max_connections = %d needs about %d open files (two a "
                        "connection, %d kept back), and the open-file limit is %d: clients "
                        "will be closed for want of descriptors before the limit is reached; "
                        "raise the hard limit (ulimit -Hn, systemd's LimitNOFILE)",
                        wanted, needed, _FD_RESERVE, open_files)

    def _open_access_log(self) -> None:
        """Open ``server.access_log`` (if set) as an observer; raises ConfigError."""
        self._access_log = None
        if not self.server.access_log:
            return
        try:
            self._access_log = AccessLog(self.server.access_log)
        except OSError as exc:
            raise ConfigError("server.access_log",
                              f"cannot open {self.server.access_log}: {exc.strerror}") from exc
        self.observers.append(self._access_log)

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

    def remove_proxy(self, name: str) -> None:
        """Stop a proxy's listeners and close its connections now."""
        service = self.services.pop(name)
        self.stop_timeline(name)
        service.close_listeners()
        service.close_connections(CloseReason.SHUTDOWN)
        _close_elements(service)

    def drain_proxy(self, name: str, drain_timeout_s: float | None = None) -> None:
        """Remove a proxy as a reload does: it stops accepting now, and its open
        connections may finish for up to ``drain_timeout_s`` (default: the
        configured one); then those left are closed, as at shutdown.  Its name
        is free at once for a new proxy."""
        if drain_timeout_s is None:
            drain_timeout_s = self.server.drain_timeout_s
        service = self.services.pop(name)
        self.stop_timeline(name)
        service.close_listeners()
        if service.active == 0 or drain_timeout_s <= 0:
            service.close_connections(CloseReason.SHUTDOWN, "proxy removed")
            _close_elements(service)
            return
        log.info("%s: removed; draining %d connection(s) for up to %g s", name,
                 service.active, drain_timeout_s)
        done = self._draining[service] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._drain(service, done, drain_timeout_s), name=f"midway drain {name}")
        self._drain_tasks.add(task)
        task.add_done_callback(self._drain_tasks.discard)

    async def _drain(self, service: ProxyService, done: asyncio.Event, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await done.wait()
        except TimeoutError:
            log.info("%s: drain timeout: closing %d connection(s)", service.name, service.active)
        if self._draining.pop(service, None) is not None:
            service.close_connections(CloseReason.SHUTDOWN, "drain timeout")
            _close_elements(service)

    def update_proxy(self, config: ProxyConfig, *, enabled: bool | None = None) -> ProxyService:
        """Change a live proxy, and (with ``enabled``) start or stop its listening
        in the same step.  Open connections keep going; new ones use the new
        settings.  Only the listen addresses added are bound (the ones that stay
        keep their sockets, see :meth:`ProxyService.relisten`), all of them if
        the proxy is being enabled.  All or nothing: on a :class:`ListenError`
        the proxy is as it was (listening where it was, if it was)."""
        service = self.services[config.name]
        config = dataclasses.replace(
            config, listen=keep_ports(config.listen, service.config.listen))
        enable = service.enabled if enabled is None else enabled
        if not enable:
            self.enable_proxy(config.name, False)
        elif not service.enabled:
            previous = service.config
            service.config = config
            try:
                service.bind()
            except ListenError:
                service.config = previous
                raise
            _pin_ports(service)
            service.enabled = True
            config = dataclasses.replace(config, listen=service.config.listen)
            try:
                service.reconfigure(config)
            finally:  # accepting, and saying where it forwards, with the new upstreams
                if not self.stopping:
                    service.start_accepting()
            return service
        opened: list[Listener] = []
        if config.listen != service.config.listen:
            opened = service.relisten(config.listen)  # the addresses that stay keep their sockets
            _pin_ports(service)
            config = dataclasses.replace(config, listen=service.config.listen)
        try:
            service.reconfigure(config)
        finally:
            service.announce(opened)
        return service

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

    def stop_timeline(self, name: str) -> None:
        timeline = self._timelines.pop(name, None)
        self._timeline_of.pop(name, None)
        if timeline is not None:
            timeline.cancel()

    def restart_timeline(self, name: str) -> None:
        """Play the proxy's timed toxics from the start (a change made them
        different): the toxics the old timeline put in place are removed first."""
        played = self._timeline_of.get(name)
        self.stop_timeline(name)
        service = self.services[name]
        if played is not None:
            for toxic in played.active.values():
                if any(e is toxic for e in service.elements):
                    service.remove_element(toxic)
        for spec in service.config.toxics:
            if spec.at_s == 0 and spec.until_s is not None:  # there from the start
                service.add_element(build_toxic(spec, clock=LoopClock()))
        self._start_timeline(service)

    def drop_timed(self, name: str, specs: Sequence[ToxicSpec]) -> None:
        """Take timed toxics out of the proxy's timeline (:meth:`Timeline.drop`):
        removed now if present, never added or removed by it again."""
        timeline = self._timeline_of.get(name)
        if timeline is not None:
            for spec in specs:
                timeline.drop(spec)

    def _start_timeline(self, service: ProxyService) -> None:
        """Play the proxy's timed toxics (``at_s``/``until_s``), if it has any."""
        specs = service.config.toxics
        if not any(spec.at_s > 0 or spec.until_s is not None for spec in specs):
            return
        timeline = Timeline(service, specs, proxy=service.name)
        self._timeline_of[service.name] = timeline
        self._timelines[service.name] = asyncio.get_running_loop().create_task(
            timeline.run(), name=f"midway timeline {service.name}")

    # -- accounting, called by services ---------------------------------------

    def next_connection_id(self) -> int:
        return next(self._ids)

    def has_room(self) -> bool:
        return self.active < self.max_connections

    def connection_opened(self) -> None:
        self.active += 1
        if self.active == 1:  # only the first: Event.clear is a Python call
            self._idle.clear()

    def connection_closed(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()
        if self._draining:
            for service, done in self._draining.items():
                if service.active == 0:
                    done.set()
        if not self.stopping:
            for service in self.services.values():
                if service.gated:  # room_changed's own test, without its call
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
