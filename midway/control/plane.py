"""The control plane: one target for every worker, changed one step at a time.

Theory of operation
-------------------
The :class:`ControlPlane` holds the *target* (:class:`~midway.config.target.Target`):
the configuration every worker must run, with what the admin API changed since
it was loaded.  Every change, whether an API call or a reload, is computed from
the target in force under one lock (so two requests never both start from the
same target and lose one of the changes), then sent as data to every running
worker (:class:`~midway.control.commands.Apply`) through its
:class:`~midway.control.commands.WorkerHandle`, all at once, and the call
returns when each has answered:

* every worker applied it: the new target is in force;
* every worker refused it the same way (an address in use, a hook that does
  not import): nothing changed anywhere, and the error is the answer;
* some applied it and one did not (it died, did not answer in time, or failed
  where the others did not): the new target is in force, since the workers
  that applied it serve it, the answer is an error naming that worker, and the
  fleet restarts it, so it comes back running the target in force, toxics
  included.  No call waits for ever: each worker gets
  :data:`~midway.control.commands.COMMAND_TIMEOUT_S`.

A worker that is not running when a change is made (it is being restarted)
is not waited for: it starts with the target in force.

The fleet (:class:`Fleet`) is what differs between one process and several:
for one process the only worker is this process's own agent, called directly;
for several, the supervisor (:mod:`midway.workers`) holds the ports (so a port
asked as 0 is the same for every worker) and restarts workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..admin.host import HostError, ProxyView
from ..config.schema import Config, ProxyConfig, ServerConfig, ToxicSpec
from ..config.target import Edit, Target, keep_ports
from ..errors import ConfigError, ListenError
from ..metrics import METRICS, Snapshot, cumulative, identity, merge_snapshots, render, retain
from ..upstream.state import merge_snapshots as merge_upstreams
from . import notify
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
    WorkerHandle,
    WorkerLost,
)
from .plan import live_server

__all__ = ["ControlPlane", "Fleet", "Loader", "merge_reload", "merge_views"]

log = logging.getLogger("midway")

VIEW_GRACE_S = 1.0
"""Once one worker has answered a :class:`Views`, how long the others may take
before the answer is made without them (a hung worker must not hold up every
read of the API)."""

Loader = Callable[[], Config]
"""Reads and validates the configuration file, exactly as a start and
``--check`` do; raises :class:`ConfigError` naming the key."""


class Fleet(Protocol):
    """The workers, as the control plane needs them."""

    def handles(self) -> list[WorkerHandle]:
        """The workers running now."""
        ...

    def reserve(self, target: Target) -> Target:
        """Hold every address ``target`` listens on; return it with real ports.
        Raises :class:`ListenError`."""
        ...

    def release(self, target: Target) -> None:
        """Let go of the addresses ``target`` no longer uses."""
        ...

    def lost(self, handle: WorkerHandle, why: str) -> None:
        """``handle`` did not apply what the others did: bring it back in step."""
        ...


class ControlPlane:
    """Implements :class:`~midway.admin.host.AdminHost` over a :class:`Fleet`.

    ``loader`` re-reads the configuration file for a reload (``None``: there is
    no file, midway was started from the command line)."""

    def __init__(self, target: Target, fleet: Fleet, loader: Loader | None = None) -> None:
        self._target = target
        self._loaded = target.config
        """The configuration as last read from the file (or the command line)."""
        self.fleet = fleet
        self.loader = loader
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.reloaded: list[Callable[[], None]] = []
        """Called after each successful reload (the admin API takes its new token)."""
        self._scraped: dict[tuple[int, int], Snapshot] = {}
        """Each running worker's last metrics snapshot, by (number, pid)."""
        self._ended: Snapshot = merge_snapshots([])
        """The counters and histograms of the workers that ended, as last scraped:
        a restarted worker starts from zero, and the sums must not go back."""

    @property
    def target(self) -> Target:
        return self._target

    def started(self, target: Target) -> None:
        """The target as the workers started it (ports asked as 0 now bound)."""
        self._target = target

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a change is made (a worker being started waits for it)."""
        return self._lock

    # -- changes ----------------------------------------------------------------

    async def change(self, edit: Callable[[Target], Edit]) -> Target:
        async with self._lock:
            step = edit(self._target)
            target, _ = await self._apply(step.target, step.reset, reload=False)
            return target

    async def _apply(self, target: Target, reset: frozenset[str], *,
                     reload: bool) -> tuple[Target, Applied | None]:
        # Port 0 keeps the port a proxy has (a worker's plan would too, but the
        # supervisor's reservation would first bind a new one).
        now = {p.name: p.listen for p in self._target.config.proxies}
        target = _pin(target, {p.name: keep_ports(p.listen, now[p.name])
                               for p in target.config.proxies if p.name in now})
        try:
            target = self.fleet.reserve(target)
        except ListenError as exc:
            raise HostError(str(exc), 500) from exc
        except ConfigError as exc:  # what the workers cannot share (a unix socket)
            raise HostError(str(exc), 400) from exc
        command = Apply(target, reset, reload)
        handles = self.fleet.handles()
        answers = await asyncio.gather(*(h.call(command) for h in handles),
                                       return_exceptions=True)
        applied = [a for a in answers if isinstance(a, Applied)]
        failed = [(h, a) for h, a in zip(handles, answers, strict=True)
                  if not isinstance(a, Applied)]
        for handle, answer in failed:
            if not isinstance(answer, CommandFailed | WorkerLost):
                log.error("worker %d: %s failed", handle.number, type(command).__name__,
                          exc_info=answer)
        if failed and not applied and not any(isinstance(a, WorkerLost) for _, a in failed):
            # Refused by all: nothing changed anywhere.
            self.fleet.release(self._target)
            raise _refusal(failed)
        if applied:
            target = _pin(target, applied[0].listen)
        self._target = target
        self.fleet.release(target)
        for handle, answer in failed:
            self.fleet.lost(handle, _what(answer))
        if failed:
            raise HostError("; ".join(f"worker {h.number} (pid {h.pid}): {_what(a)}"
                                      for h, a in failed)
                            + "; the others applied the change, and the worker is "
                              "restarted with it", 503)
        return target, applied[0] if applied else None

    # -- reload ----------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the file and apply it (SIGHUP, ``POST /reload``).  On any
        error the running configuration stays and :class:`HostError` says why
        (400: the file; 500/503: a worker)."""
        if self.loader is None:
            message = ("reload: midway was started without --config: there is no file to "
                       "read again; nothing changed")
            log.warning("%s", message)
            raise HostError(message, 409)
        async with self._lock:
            notify.notify(notify.RELOADING)
            try:
                return await self._reload(self.loader)
            finally:
                notify.notify(notify.READY)

    async def _reload(self, loader: Loader) -> dict[str, Any]:
        try:
            loaded = loader()
        except ConfigError as exc:
            log.error("reload: %s; still running the previous configuration", exc)
            raise HostError(f"reload: {exc}", 400) from exc
        running = self._target
        before, server = running.config.proxies, running.config.server
        target = merge_reload(running, self._loaded, loaded)
        try:
            target, _ = await self._apply(target, frozenset(), reload=True)
        except HostError as exc:
            # Refused everywhere (an address in use): nothing changed, as for a bad
            # file.  A 503: some worker missed what the others now run.
            kept = "; still running the previous configuration" \
                if self._target is running and exc.status != 503 else ""
            log.error("reload: %s%s", exc.message, kept)
            raise HostError(f"reload: {exc.message}", exc.status) from exc
        self._loaded = loaded
        self.reloads += 1
        for callback in self.reloaded:
            callback()
        _, restart = live_server(target.config.server, loaded.server)
        for key in restart:
            log.warning("reload: server.%s changed from %r to %r: restart midway to apply it "
                        "(%r stays in force meanwhile)", key, getattr(target.config.server, key),
                        getattr(loaded.server, key), getattr(target.config.server, key))
        names = [p.name for p in target.config.proxies]
        log.info("reload: done (%s)", reload_summary(before, target.config.proxies,
                                                          server, target.config.server))
        return {"reloaded": True, "proxies": names, "restart_needed": restart}

    # -- state -------------------------------------------------------------------

    async def views(self, *, merged: bool = False) -> dict[str, ProxyView]:
        """Every proxy as one worker runs it; ``merged``: with each proxy's
        ``upstreams`` merged over the workers that answered within
        :data:`VIEW_GRACE_S` of the first (their connections added up, down where
        any has it down: :func:`merge_views`), as the API shows them and as
        ``/metrics`` sums them.  Changes read only one worker's (toxics, bound
        addresses), so a hung worker delays only what shows the upstreams, and
        that by at most the grace."""
        handles = self.fleet.handles()
        if not merged or len(handles) <= 1:
            answer: dict[str, ProxyView] = await self.ask(Views())
            return answer
        calls = [asyncio.ensure_future(h.call(Views())) for h in handles]
        pending: set[asyncio.Future[Any]] = set(calls)
        loop = asyncio.get_running_loop()
        grace_until: float | None = None
        while pending:
            timeout = None if grace_until is None else max(0.0, grace_until - loop.time())
            done, pending = await asyncio.wait(pending, timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            if grace_until is None and any(f.exception() is None for f in done):
                grace_until = loop.time() + VIEW_GRACE_S
        for late in pending:  # answered later, to no one
            late.add_done_callback(_retrieve)
        # A worker that fails to answer (it died: it is being restarted) is left
        # out rather than failing the call, as ask() does with one worker.
        answers = [f.result() for f in calls if f.done() and f.exception() is None]
        if not answers:
            problems = [f"worker {h.number}: {_what(f.exception())}"
                        for h, f in zip(handles, calls, strict=True)
                        if f.done() and f.exception() is not None]
            raise HostError("; ".join(problems) or "no worker is running (restarting)", 503)
        return merge_views(answers)

    async def ask(self, command: Command) -> Any:
        """``command``'s answer from one running worker (the next if it fails)."""
        problems = []
        for handle in self.fleet.handles():
            try:
                return await handle.call(command)
            except (CommandFailed, WorkerLost) as exc:
                problems.append(f"worker {handle.number}: {exc}")
        raise HostError("; ".join(problems) or "no worker is running (restarting)", 503)

    async def gather(self, command: Command) -> list[tuple[int, Any]]:
        """``command``'s answer from every running worker, as ``(worker number,
        answer)``; raises :class:`HostError` naming any worker that did not answer."""
        return [(h.number, a) for h, a in await self._gather(command)]

    async def _gather(self, command: Command) -> list[tuple[WorkerHandle, Any]]:
        handles = self.fleet.handles()
        answers = await asyncio.gather(*(h.call(command) for h in handles),
                                       return_exceptions=True)
        failed = [(h, a) for h, a in zip(handles, answers, strict=True)
                  if isinstance(a, BaseException)]
        if failed:
            raise HostError("; ".join(f"worker {h.number} (pid {h.pid}): {_what(a)}"
                                      for h, a in failed), 503)
        return list(zip(handles, answers, strict=True))

    async def metrics(self) -> str:
        """Every running worker's metrics, summed, in Prometheus's text format.
        A worker that does not answer fails the scrape (503) rather than making
        the totals drop.  A worker that ended (and was restarted from zero)
        still counts with what it had counted at the last scrape, so no counter
        goes back; the series of proxies and upstreams no running worker has
        any more are left out."""
        scraped = {(h.number, h.pid): snapshot
                   for h, snapshot in await self._gather(CollectMetrics())}
        ended = [cumulative(s) for key, s in self._scraped.items() if key not in scraped]
        self._scraped = scraped
        live = merge_snapshots(list(scraped.values()))
        keep: dict[str, set[tuple[str, ...]]] = {}
        for spec in METRICS:
            for labels, _ in live["metrics"].get(spec.name, ()):
                keep.setdefault(labels[0], set()).add(identity(spec, labels))
        self._ended = retain(merge_snapshots([self._ended, *ended]), keep)
        return render(merge_snapshots([live, self._ended]))


    # -- connections ---------------------------------------------------------------

    async def connections(self, proxy: str = "") -> list[dict[str, Any]]:
        """Every worker's open connections (of ``proxy`` only, if given), by id."""
        found = [c for _, answer in await self.gather(ListConnections(proxy)) for c in answer]
        return sorted(found, key=lambda c: c["id"])

    async def connection(self, id: int) -> dict[str, Any] | None:
        """Connection ``id`` (None: no worker has it)."""
        for _, answer in await self.gather(ListConnections(id=id)):
            if answer:
                found: dict[str, Any] = answer[0]
                return found
        return None

    async def close_connection(self, id: int, reset: bool) -> bool:
        """Close connection ``id`` on the worker that has it (False: none has)."""
        return any(answer for _, answer in await self.gather(CloseConnection(id, reset)))

    async def add_connection_toxic(self, id: int, spec: ToxicSpec) -> dict[str, Any] | None:
        """Attach a toxic to connection ``id`` alone; its JSON, or None (no
        worker has it).  Raises :class:`HostError` (409: a name it has)."""
        answer: dict[str, Any] | None = await self._on_connection(AddConnectionToxic(id, spec))
        return answer

    async def connection_toxics(self, id: int) -> list[dict[str, Any]] | None:
        """Connection ``id``'s own toxics; None (no worker has it)."""
        answer: list[dict[str, Any]] | None = await self._on_connection(ListConnectionToxics(id))
        return answer

    async def remove_connection_toxic(self, id: int, name: str) -> bool:
        """Remove the toxic ``name`` of connection ``id``'s own; False (no
        worker has it).  Raises :class:`HostError` (404: no such toxic of its
        own, 409: the proxy's)."""
        return bool(await self._on_connection(RemoveConnectionToxic(id, name)))

    async def _on_connection(self, command: Command) -> Any:
        """``command`` (about one connection) sent to every worker: the answer
        of the one that has the connection (not None), else None.  Raises
        :class:`HostError`: that worker's refusal, or 503 naming a worker that
        did not answer while none had it."""
        handles = self.fleet.handles()
        answers = await asyncio.gather(*(h.call(command) for h in handles),
                                       return_exceptions=True)
        for answer in answers:
            if isinstance(answer, CommandFailed):  # the worker that has it refused
                raise HostError(answer.message, answer.status)
        for answer in answers:
            if answer is not None and not isinstance(answer, BaseException):
                return answer
        failed = [(h, a) for h, a in zip(handles, answers, strict=True)
                  if isinstance(a, BaseException)]
        if failed:
            raise HostError("; ".join(f"worker {h.number} (pid {h.pid}): {_what(a)}"
                                      for h, a in failed), 503)
        return None


def merge_views(per_worker: list[dict[str, ProxyView]]) -> dict[str, ProxyView]:
    """The first worker's views, each proxy's ``upstreams`` merged over every
    worker that runs the proxy (:func:`~midway.upstream.state.merge_snapshots`).
    Pure."""
    first = per_worker[0] if per_worker else {}
    return {name: dataclasses.replace(view, upstreams=tuple(merge_upstreams(
                [views[name].upstreams for views in per_worker if name in views])))
            for name, view in first.items()}


def reload_summary(old: Iterable[ProxyConfig], new: Iterable[ProxyConfig],
                   old_server: ServerConfig | None = None,
                   new_server: ServerConfig | None = None) -> str:
    """What a reload changed, for its log line: ``2 proxies: db, web; added db;
    removed cache; changed [server] (max_connections), web (upstreams,
    idle_timeout_s)`` (``configuration unchanged`` when the file said what was
    running), then the kept proxies whose files were read again: ``TLS files
    read again (web)``, ``hooks imported anew (api)``.  ``[server]`` keys are
    compared as applied (one that needs a restart keeps its value).  Pure."""
    before = {p.name: p for p in old}
    after = {p.name: p for p in new}
    count = len(after)
    parts = [f"{count} {'proxy' if count == 1 else 'proxies'}: {', '.join(sorted(after)) or 'none'}"]
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    pairs: list[tuple[str, Any, Any]] = [(name, before[name], after[name])
                                         for name in sorted(after.keys() & before.keys())]
    if old_server is not None and new_server is not None:
        pairs.insert(0, ("[server]", old_server, new_server))
    changed = [f"{name} ({', '.join(keys)})" for name, was, now in pairs
               if (keys := [f.name for f in dataclasses.fields(was)
                            if getattr(was, f.name) != getattr(now, f.name)])]
    if added:
        parts.append(f"added {', '.join(added)}")
    if removed:
        parts.append(f"removed {', '.join(removed)}")
    if changed:
        parts.append(f"changed {', '.join(changed)}")
    if not (added or removed or changed):
        parts.append("configuration unchanged")
    # Every reload reads certificates and CAs from their files and imports hooks
    # again, changed or not: a file renewed or edited in place is applied.
    kept = sorted(after.keys() & before.keys())
    renewed = [name for name in kept if any(getattr(after[name], key) for key in _TLS_FILES)]
    if renewed:
        parts.append(f"TLS files read again ({', '.join(renewed)})")
    hooked = [name for name in kept if after[name].hooks]
    if hooked:
        parts.append(f"hooks imported anew ({', '.join(hooked)})")
    return "; ".join(parts)


_TLS_FILES = ("tls_cert", "tls_client_ca", "upstream_tls_ca", "upstream_tls_cert")
"""The options naming files a reload reads again (a key goes with its certificate)."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take the outcome of a call no one waits for any more (it is not logged)."""
    if not future.cancelled():
        future.exception()


def merge_reload(current: Target, loaded_before: Config, loaded: Config) -> Target:
    """The target after a reload: the file's proxies as it says them now, each
    with the toxics the admin API added to it (those not in the file before nor
    now), the proxies the API created (not in the file before nor now) kept as
    they are, and API-disabled proxies still disabled.  What the file says wins
    over what the API changed in a proxy of the file.  Server settings that need
    a restart keep their running values (:func:`~midway.control.plan.live_server`)."""
    running = {p.name: p for p in current.config.proxies}
    before = {p.name: p for p in loaded_before.proxies}
    proxies: list[ProxyConfig] = []
    for proxy in loaded.proxies:
        now = running.get(proxy.name)
        if now is not None:
            old_names = {t.name for t in before[proxy.name].toxics} if proxy.name in before \
                else set()
            names = {t.name for t in proxy.toxics}
            added = tuple(t for t in now.toxics
                          if t.name not in old_names and t.name not in names)
            proxy = dataclasses.replace(proxy, toxics=proxy.toxics + added,
                                        listen=keep_ports(proxy.listen, now.listen))
        proxies.append(proxy)
    file_names = {p.name for p in loaded.proxies}
    proxies.extend(p for name, p in running.items()
                   if name not in before and name not in file_names)
    server, _ = live_server(current.config.server, loaded.server)
    names = {p.name for p in proxies}
    return Target(Config(server=server, proxies=tuple(proxies)), current.disabled & names)


def _pin(target: Target, listen: dict[str, tuple[Any, ...]]) -> Target:
    proxies = tuple(dataclasses.replace(p, listen=listen[p.name]) if p.name in listen else p
                    for p in target.config.proxies)
    return dataclasses.replace(target, config=dataclasses.replace(target.config,
                                                                  proxies=proxies))


def _what(answer: object) -> str:
    if isinstance(answer, CommandFailed | WorkerLost):
        return str(answer)
    return f"{type(answer).__name__}: {answer}"


def _refusal(failed: list[tuple[WorkerHandle, BaseException]]) -> HostError:
    """Every worker refused: one error if they agree (the usual case), else each."""
    first = failed[0][1]
    if isinstance(first, CommandFailed) and all(
            isinstance(a, CommandFailed) and (a.message, a.status) == (first.message, first.status)
            for _, a in failed):
        return HostError(first.message, first.status)
    return HostError("; ".join(f"worker {h.number} (pid {h.pid}): {_what(a)}"
                               for h, a in failed), 500)
