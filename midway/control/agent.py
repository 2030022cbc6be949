"""The worker's side of the control plane: a :class:`WorkerAgent` owns one
process's :class:`~midway.runtime.Runtime` and its metrics, and carries out the
commands of :mod:`midway.control.commands` on them.

Theory of operation
-------------------
The agent never keeps a second copy of what runs: the target a worker runs now
is read back from the runtime (each proxy's configuration, kept up to date by
every change, and which proxies are disabled).  :class:`~.commands.Apply`
compares that with the new target (:func:`~midway.control.plan.plan`) and
carries out the difference, one proxy at a time, doing for each first what can
fail (building elements, binding a moved listener) and only then what cannot
(swapping elements, toxics, settings).  If a step fails the agent applies the
target it ran before the command, the same way, and answers the error: a change
is all or nothing, as seen from the API.

What each kind of difference does to connections is the plan's business
(:mod:`midway.control.plan`): new connections get the new settings, open ones
keep theirs, except toxics, which open connections get too.

With several workers each one writes its own capture (``PATH`` becomes
``STEM.wN.EXT``, see :func:`worker_path`), so every file stays a valid pcap.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..admin.host import ProxyView
from ..chain.dump import reopen_dump_files
from ..chain.registry import rebuild_elements
from ..chain.toxics.config import build_toxic
from ..chain.toxics.live import (
    ToxicExists,
    ToxicNotFound,
    add_toxic,
    list_toxics,
    remove_toxic,
    replace_toxic,
    toxic_json,
    update_toxic,
)
from ..config.schema import Config
from ..config.target import Target
from ..core.clock import LoopClock
from ..core.observer import Observer
from ..core.relay import Relay
from ..errors import ConfigError, ListenError, MidwayError
from ..metrics import Metrics
from ..metrics.registry import Sample
from ..runtime import Runtime
from ..service import ProxyService
from .commands import (
    AddConnectionToxic,
    Applied,
    Apply,
    CloseConnection,
    CollectMetrics,
    Command,
    CommandFailed,
    ListConnections,
    ListConnectionToxics,
    RemoveConnectionToxic,
    Views,
)
from .connections import (
    StillConnecting,
    add_connection_toxic,
    close_connection,
    connection_toxics,
    find_connection,
    list_connections,
)
from .plan import Plan, ProxyPlan, plan

__all__ = ["WorkerAgent", "worker_path", "localize"]

log = logging.getLogger("midway")


def worker_path(path: str, number: int) -> str:
    """Worker ``number``'s own file for a capture at ``path``: ``STEM.wN.EXT``
    (``capture.pcap`` → ``capture.w2.pcap``; no extension: ``PATH.wN``), so each
    file stays a valid pcap that Wireshark opens by its extension.  Merge them
    with ``mergecap -w all.pcap capture.w*.pcap``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.w{number}{ext}"


def localize(config: Config, number: int, count: int) -> Config:
    """The configuration as worker ``number`` of ``count`` runs it: with more
    than one worker, each capture goes to the worker's own file."""
    if count == 1 or not any(p.pcap for p in config.proxies):
        return config
    proxies = tuple(dataclasses.replace(p, pcap=worker_path(p.pcap, number)) if p.pcap else p
                    for p in config.proxies)
    return dataclasses.replace(config, proxies=proxies)


class WorkerAgent:
    """One worker: its runtime, its metrics, and the commands it runs.

    ``number`` of ``count`` is which worker this is; ``ids`` numbers its
    connections (see :class:`midway.workers.ConnectionIds`); ``observers``
    come after the metrics."""

    def __init__(self, target: Target, *, number: int = 1, count: int = 1,
                 ids: Iterator[int] | None = None, observers: Iterable[Observer] = ()) -> None:
        self.number, self.count = number, count
        self.metrics = Metrics()
        config = localize(target.config, number, count)
        enabled = tuple(p for p in config.proxies if p.name not in target.disabled)
        self._later = [p for p in config.proxies if p.name in target.disabled]
        self.runtime = Runtime(dataclasses.replace(config, proxies=enabled),
                               observers=[self.metrics, *observers], ids=ids, worker=number,
                               reuse_port=count > 1)
        self.metrics.add_collector(self._live_bytes)
        self._commands: dict[type[Command], Callable[[Any], Any]] = {
            Apply: self._apply,
            Views: self._views,
            CollectMetrics: self._collect,
            ListConnections: self._connections,
            CloseConnection: self._close_connection,
            AddConnectionToxic: self._add_connection_toxic,
            ListConnectionToxics: self._connection_toxics,
            RemoveConnectionToxic: self._remove_connection_toxic,
        }

    async def start(self) -> None:
        """Bind every listener and start serving (raises ListenError, ConfigError)."""
        await self.runtime.start()
        for proxy in self._later:
            self.runtime.add_proxy(proxy, enabled=False)
        self._later = []
        self._declare()

    async def execute(self, command: Command) -> Any:
        """Carry out one command; raises :class:`CommandFailed`."""
        handler = self._commands.get(type(command))
        if handler is None:
            raise CommandFailed(f"unknown command {type(command).__name__}")
        return handler(command)

    # -- what runs --------------------------------------------------------------

    def running(self) -> Target:
        """The target this worker runs now, read back from its runtime."""
        services = self.runtime.services.values()
        config = dataclasses.replace(self.runtime.config,
                                     proxies=tuple(s.config for s in services))
        return Target(config, frozenset(s.name for s in services if not s.enabled))

    def listen(self) -> dict[str, tuple[Any, ...]]:
        """Each proxy's listen addresses, with the ports bound."""
        return {name: s.config.listen for name, s in self.runtime.services.items()}

    # -- commands -----------------------------------------------------------------

    def _apply(self, command: Apply) -> Applied:
        target = Target(localize(command.target.config, self.number, self.count),
                        command.target.disabled)
        before = self.running()
        steps = plan(before, target, reset=command.reset, reload=command.reload)
        try:
            self._carry_out(steps, reload=command.reload)
        except (MidwayError, OSError) as exc:
            log.error("cannot apply the change: %s; going back to what ran before", exc)
            try:
                self._carry_out(plan(self.running(), before), reload=False)
            except (MidwayError, OSError):
                log.exception("could not go back to what ran before the failed change")
            raise CommandFailed(str(exc), 400 if isinstance(exc, ConfigError) else 500) from exc
        finally:
            self._declare()
        return Applied(self.listen(), tuple(steps.restart_needed))

    def _carry_out(self, steps: Plan, *, reload: bool) -> None:
        runtime = self.runtime
        for name in steps.remove:  # first: their addresses may be taken by the others
            if reload:
                runtime.drain_proxy(name)
            else:
                runtime.remove_proxy(name)
        for change in steps.change:
            self._change(runtime.services[change.new.name], change, reload=reload)
        for config, enabled in steps.add:
            try:
                runtime.add_proxy(config, enabled=enabled)
            except ListenError as exc:
                raise ListenError(f"{config.name}: {exc}") from exc
        reopen = reload and steps.server.access_log == runtime.server.access_log
        if steps.server != runtime.server:
            if steps.server.log_level != runtime.server.log_level:
                log.setLevel(steps.server.log_level.upper())
            runtime.set_server(steps.server)
        if reopen:  # after logrotate renamed them: write to the path, not the old file
            runtime.reopen_access_log()
        if reload:
            reopen_dump_files()

    def _change(self, service: ProxyService, change: ProxyPlan, *, reload: bool) -> None:
        """One proxy: what can fail first (elements, binding), then the rest."""
        new = change.new
        rebuilt = None
        if change.elements:
            rebuilt = rebuild_elements(service.elements, new, capture=change.capture,
                                       dump=change.dump, hooks=change.hooks, fresh=reload)
        try:
            if change.listen or change.enable is not None:
                enabled = service.enabled if change.enable is None else change.enable
                self.runtime.update_proxy(new, enabled=enabled)
        except ListenError as exc:
            if rebuilt is not None:
                chain, retired = rebuilt
                for element in chain:
                    if element not in service.elements:
                        element.close()
            raise ListenError(f"{service.name}: {exc}") from exc
        if rebuilt is not None:
            service.retire_elements(*rebuilt)
        _change_toxics(service, change)
        service.reconfigure(dataclasses.replace(new, listen=service.config.listen))
        if change.toxics.drop:
            self.runtime.drop_timed(service.name, change.toxics.drop)
        if change.toxics.timeline:
            self.runtime.restart_timeline(service.name)
        if change.reset:
            service.close_connections()

    def _views(self, command: Views) -> dict[str, ProxyView]:
        return {
            name: ProxyView(name, service.enabled, tuple(service.addresses),
                            tuple(toxic_json(t) for t in list_toxics(service)),
                            tuple(e.name for e in service.elements),
                            tuple(service.upstream_views()))
            for name, service in self.runtime.services.items()
        }

    def _collect(self, command: CollectMetrics) -> dict[str, Any]:
        for service in self.runtime.all_services():
            for _, pool in service.upstream_sets():
                pool.settle()
        self.metrics.forget(self._keep())
        return self.metrics.snapshot()

    def _keep(self) -> dict[str, set[tuple[str, ...]]]:
        """The proxies that still have series (serving or draining), and their
        upstreams' (:data:`~midway.metrics.Keep`)."""
        keep: dict[str, set[tuple[str, ...]]] = {}
        for service in self.runtime.all_services():
            kept = keep.setdefault(service.name, set())
            for route, pool in service.upstream_sets():
                kept.update((u.text,) for u in pool.upstreams)
                if route is not None:
                    kept.update((route, u.text) for u in pool.upstreams)
        return keep

    def _connections(self, command: ListConnections) -> list[dict[str, Any]]:
        return list_connections(self.runtime, self.number, command.proxy, command.id)

    def _close_connection(self, command: CloseConnection) -> bool:
        return close_connection(self.runtime, command.id, command.reset)

    def _add_connection_toxic(self, command: AddConnectionToxic) -> dict[str, Any] | None:
        found = find_connection(self.runtime, command.id)
        if found is None:
            return None
        try:
            _, toxic = add_connection_toxic(
                found, command.spec.name, lambda: build_toxic(command.spec, clock=LoopClock()))
        except StillConnecting as exc:
            raise CommandFailed(str(exc), 409) from None
        except ToxicExists:
            raise CommandFailed("toxic already exists", 409) from None  # Toxiproxy's words
        return toxic_json(toxic)

    def _connection_toxics(self, command: ListConnectionToxics) -> list[dict[str, Any]] | None:
        found = find_connection(self.runtime, command.id)
        if found is None:
            return None
        return [toxic_json(t) for t in connection_toxics(found)]

    def _remove_connection_toxic(self, command: RemoveConnectionToxic) -> bool | None:
        found = find_connection(self.runtime, command.id)
        if found is None:
            return None
        service, item = found
        if isinstance(item, Relay):  # one still connecting has none of its own yet
            toxic = next((e for e in service.live[item].own if e.name == command.name), None)
            if toxic is not None:
                service.remove_connection_element(item, toxic)
                return True
        if any(t.name == command.name for t in list_toxics(service)):
            raise CommandFailed(
                f"toxic {command.name!r} is proxy {service.name!r}'s, on all its connections: "
                f"remove it with DELETE /proxies/{service.name}/toxics/{command.name}", 409)
        raise CommandFailed("toxic not found", 404)

    # -- metrics ------------------------------------------------------------------

    def _declare(self) -> None:
        for name, service in self.runtime.services.items():
            self.metrics.declare_proxy(name, sorted(service.upstream_addresses()))

    def _live_bytes(self) -> Iterator[Sample]:
        """Bytes of the connections still open, added to the counted ones at
        each scrape (the close record then carries the same numbers)."""
        for service in self.runtime.all_services():
            up = down = 0
            for relay in service.live:
                up += relay.bytes_up
                down += relay.bytes_down
            yield ("midway_bytes_total", (service.name, "upstream"), up)
            yield ("midway_bytes_total", (service.name, "downstream"), down)


def _change_toxics(service: ProxyService, change: ProxyPlan) -> None:
    """Toxic changes, live (open connections get them).  They cannot fail: a
    name already taken (a toxic of the timeline) is skipped with a warning."""
    toxics = change.toxics
    for name in toxics.remove:
        try:
            remove_toxic(service, name)
        except ToxicNotFound:
            pass
    for spec in toxics.update:
        try:
            update_toxic(service, spec.name, toxicity=spec.toxicity,
                         attributes=dict(spec.attributes))
        except ToxicNotFound:
            toxics.add.append(spec)
    for spec in toxics.replace:
        try:
            replace_toxic(service, build_toxic(spec, clock=LoopClock()))
        except ToxicNotFound:
            toxics.add.append(spec)
    for spec in toxics.add:
        try:
            add_toxic(service, build_toxic(spec, clock=LoopClock()))
        except ToxicExists:
            log.warning("%s: a chain element named %r is already there; toxic not added",
                        service.name, spec.name)

