"""Multi-core: a supervisor and N worker processes sharing each listener, with
one control plane for all of them.

Theory of operation
-------------------
Every worker is a whole midway data plane (its own event loop and runtime,
:mod:`midway.control.worker`) that binds each TCP listener itself with
``SO_REUSEPORT``; the kernel spreads new connections across the workers'
sockets, so there is no shared accept queue and no lock.  The supervisor (the
parent) first binds each listener once *without listening*
(:class:`Reservations`): that checks the address up front (one clear error,
exit 1, before any worker starts; bound without SO_REUSEPORT first, so that a
port another program shares with SO_REUSEPORT is refused too), turns port 0
into one real port that every worker then shares, and holds the port while
workers come and go.  A socket that does not listen receives no connection.  A change that adds or moves a
listener (the API, a reload) reserves the new address first, and one no longer
used is let go once every worker has moved.

The supervisor runs an event loop (the standard library's) for what it owns:
the control plane (:class:`~midway.control.plane.ControlPlane`: the target
every worker runs, changed one step at a time), the admin API, the signals and
readiness.  It talks to each worker over a channel of its own
(:mod:`midway.control.channel`), made before the worker starts.  Workers are
started as new programs (``python -m midway.control.worker``; see that module
for why not a bare fork) with their own process group, so a terminal's Ctrl-C
reaches the supervisor alone, which forwards it.

Signals: the first SIGTERM or SIGINT is forwarded to every worker (as SIGTERM,
which a worker still starting dies of quietly where a SIGINT would interrupt its
imports with a traceback), and each drains as a single process would; a second
one is forwarded too, and they close everything at once.  SIGHUP reloads: the supervisor reads and validates the
file once (as ``--check`` would) and sends the new target to every worker.

A worker that exits unexpectedly is started again with the target in force
(its toxics included), with a back-off that grows while it keeps dying young;
a worker that could not start at all at the first start stops the supervisor
(exit 1: it logged why).  A worker that did not apply what the others did, or
did not answer in time, is killed and started again, so every worker runs the
same target.

A supervisor that dies without forwarding anything (SIGKILL, the OOM killer) must
not leave its workers serving on their own: each worker watches the read end of a
pipe whose only write end the supervisor holds, and the kernel closes that end
when the supervisor dies, however it dies.  The worker sees end-of-file and drains
as if it had been sent SIGTERM.  A pipe rather than Linux's ``PR_SET_PDEATHSIG``:
it works on every Unix, it cannot race with a parent that dies before the worker
has set it up (the end-of-file is already waiting), and it lets the worker drain
instead of being killed by a signal.

Each worker knows its number (1 to N, kept when it is restarted) and makes
connection ids unique across the whole process (see
:class:`~midway.control.worker.ConnectionIds`), from counters in memory shared
with the supervisor (an unlinked temporary file, mapped by both).

The one limit left: unix-socket listeners need ``workers = 1``
(:func:`~midway.config.load.check_workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .config.addresses import Address
from .config.load import check_workers, listeners_conflict
from .config.schema import Config, ProxyConfig
from .config.target import Target
from .control import notify
from .control.channel import Begin, Channel
from .control.commands import COMMAND_TIMEOUT_S, Command, CommandFailed, WorkerHandle, WorkerLost
from .control.plane import ControlPlane, Loader
from .control.process import EXIT_START_FAILED, Admin, Reloads, StopSignals, setup_logging
from .control.worker import COUNTER_BYTES
from .core.listener import bind_tcp
from .errors import ListenError

__all__ = ["run_supervisor", "worker_count", "Reservations", "Supervisor"]

log = logging.getLogger("midway")

_YOUNG_S = 2.0
"""A worker that dies younger than this counts as a crash loop and backs off."""
_MAX_BACKOFF_S = 5.0
_START_TIMEOUT_S = 30.0
"""How long a new worker may take to start (a new interpreter, imports, hooks,
binding every listener) before it is killed: generous, for a loaded machine."""


def worker_count(configured: int) -> int:
    """0 (or 'auto') means one worker per CPU this process may run on."""
    if configured:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Reservations:
    """The supervisor's hold on every TCP address a target listens on: a socket
    bound with SO_REUSEPORT that never listens, per address."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], socket.socket] = {}
        self._serving: dict[str, tuple[Address, ...]] = {}
        """The enabled proxies' addresses of the target last in force."""

    def reserve(self, target: Target, *, start: bool = False) -> Target:
        """Hold every address of ``target`` (those held already are kept);
        returns it with port 0 replaced by the real port.  All or nothing:
        raises :class:`ListenError` naming the proxy and the address as one
        process does (``proxy NAME: ...`` at the ``start``, ``NAME: ...`` for a
        change), or :class:`~midway.errors.ConfigError` for a unix-socket listener."""
        check_workers(dataclasses.replace(target.config.server, workers=0),
                      target.config.proxies)
        new: dict[tuple[str, int], socket.socket] = {}
        proxies = []
        try:
            for proxy in target.config.proxies:
                listen: list[Address] = []
                for address in proxy.listen:
                    sock = self._held.get((address.host, address.port)) if address.port else None
                    if sock is None:
                        try:
                            sock = self._bind(address)
                        except ListenError as exc:
                            named = f"proxy {proxy.name}" if start else proxy.name
                            raise ListenError(f"{named}: {exc}") from exc
                        new[(address.host, sock.getsockname()[1])] = sock
                    listen.append(dataclasses.replace(address, port=sock.getsockname()[1]))
                proxies.append(dataclasses.replace(proxy, listen=tuple(listen)))
            _refuse_shared([p for p in proxies if p.name not in target.disabled],
                           self._serving, start)
        except BaseException:
            for sock in new.values():
                sock.close()
            raise
        self._held.update(new)
        return dataclasses.replace(target, config=dataclasses.replace(target.config,
                                                                      proxies=tuple(proxies)))

    def _bind(self, address: Address) -> socket.socket:
        """A reservation for a new address.  SO_REUSEPORT would also let it join
        a port another program of the same user listens on with SO_REUSEPORT
        (HAProxy, nginx's ``reuseport``, another midway's workers), and the
        kernel would then split that port's clients between the two: so the port
        is first bound without it, which fails as a single process does
        (address already in use).  Not when a reservation held here shares the
        port (a listener moving from ``127.0.0.1:8080`` to ``:8080``): that
        conflict is midway's own workers."""
        if address.port == 0 or all(port != address.port for _, port in self._held):
            probe = bind_tcp(address, backlog=None)
            address = dataclasses.replace(address, port=probe.getsockname()[1])
            probe.close()
        return bind_tcp(address, backlog=None, reuse_port=True)

    def release(self, target: Target) -> None:
        """Let go of every address ``target`` (the target now in force) does not
        listen on."""
        self._serving = {p.name: p.listen for p in target.config.proxies
                         if p.name not in target.disabled}
        used = {(a.host, a.port) for p in target.config.proxies for a in p.listen}
        for key in [k for k in self._held if k not in used]:
            self._held.pop(key).close()

    def close(self) -> None:
        for sock in self._held.values():
            sock.close()
        self._held.clear()


def _refuse_shared(proxies: list[ProxyConfig], serving: dict[str, tuple[Address, ...]],
                   start: bool) -> None:
    """Two proxies on one address (or overlapping ones, ``:8080`` and
    ``127.0.0.1:8080``) would share it through the reservations' SO_REUSEPORT,
    the kernel splitting their clients: refused as one process's bind refuses
    it, naming the proxy that asks for an address it is not ``serving`` yet.
    ``proxies`` are the enabled ones (a disabled proxy listens nowhere, as in
    one process)."""
    seen: list[tuple[ProxyConfig, Address]] = []
    for proxy in proxies:
        for address in proxy.listen:
            for other_proxy, other in seen:
                if other_proxy is not proxy and listeners_conflict(address, other):
                    newer, asked = (other_proxy, other) \
                        if address in serving.get(proxy.name, ()) \
                        and other not in serving.get(other_proxy.name, ()) else (proxy, address)
                    named = f"proxy {newer.name}" if start else newer.name
                    raise ListenError(f"{named}: cannot listen on {asked}: address already in use")
            seen.append((proxy, address))


@dataclass(eq=False)
class WorkerProcess:
    """One running worker process, a :class:`~midway.control.commands.WorkerHandle`."""

    number: int
    process: asyncio.subprocess.Process
    channel: Channel
    born: float = field(default_factory=time.monotonic)
    ready: bool = False
    """It has started with the target in force: changes are sent to it."""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def call(self, command: Command, timeout_s: float = COMMAND_TIMEOUT_S) -> object:
        return await self.channel.call(command, timeout_s)

    def signal(self, signum: int) -> None:
        # os.kill, not Process.send_signal: that polls (waitpid) first, and would
        # reap an exited worker under the child watcher, which then reports 255.
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class Supervisor:
    """``count`` workers running ``config``; the :class:`~midway.control.plane.Fleet`
    of the control plane.  :meth:`run` returns the exit code."""

    def __init__(self, config: Config, count: int, loader: Loader | None = None) -> None:
        self.config = config
        self.count = count
        self.loader = loader
        self.reservations = Reservations()
        self.workers: dict[int, WorkerProcess] = {}
        self.stopping = False
        self.exit_code = 0
        self._started: set[int] = set()
        self._all_started = asyncio.Event()
        self._wake = asyncio.Event()
        """Set when stopping: ends a restart back-off at once."""
        self.plane: ControlPlane | None = None

    # -- the fleet, for the control plane -----------------------------------------

    def handles(self) -> list[WorkerHandle]:
        return [w for _, w in sorted(self.workers.items()) if w.ready]

    def reserve(self, target: Target) -> Target:
        return self.reservations.reserve(target)

    def release(self, target: Target) -> None:
        self.reservations.release(target)

    def lost(self, handle: WorkerHandle, why: str) -> None:
        worker = self.workers.get(handle.number)
        if worker is None or worker.pid != handle.pid:
            return
        log.error("worker %d (pid %d): %s; restarting it with the configuration in force",
                  worker.number, worker.pid, why)
        worker.ready = False
        worker.signal(signal.SIGKILL)

    # -- running ------------------------------------------------------------------

    async def run(self) -> int:
        # Raises: nothing started.
        target = self.reservations.reserve(Target(self.config), start=True)
        # Not inheritable (os.pipe's default): only the supervisor holds the
        # write end, and a worker inherits the read end alone (pass_fds).
        self._alive_read, self._alive_write = os.pipe()
        self._counters = tempfile.TemporaryFile()
        os.ftruncate(self._counters.fileno(), COUNTER_BYTES * self.count)
        plane = self.plane = ControlPlane(target, self, self.loader)
        plane.reloaded.append(self._reloaded)
        reloads = Reloads()
        signals = StopSignals(self._forward, reloads.hangup)
        keepers: list[asyncio.Task[None]] = []
        admin = Admin(plane, self.config.server.admin) if self.config.server.admin else None
        try:
            if admin is not None:
                admin.bind()  # before any worker starts: a port in use starts none
            keepers = [asyncio.get_running_loop().create_task(self._keep(n),
                                                              name=f"midway worker {n}")
                       for n in range(1, self.count + 1)]
            stop = asyncio.get_running_loop().create_task(signals.stop.wait())
            await asyncio.wait([stop, asyncio.ensure_future(self._all_started.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if self._all_started.is_set() and not self.stopping and not stop.done():
                if admin is not None:
                    admin.start()
                reloads.plane = plane
                log.info("supervisor %d: started %d workers", os.getpid(), self.count)
                notify.notify(notify.READY)
                await stop
            reloads.stopping = True
            notify.notify(notify.STOPPING)
            self._stop()
            if admin is not None:  # as one process: no change while draining
                await admin.stop()
            await asyncio.gather(*keepers, return_exceptions=True)
        except ListenError as exc:  # the admin API could not bind
            log.error("%s", exc)
            self.exit_code = 1
            self._stop()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            if admin is not None:
                await admin.stop()
            self.reservations.close()
            os.close(self._alive_write)
            os.close(self._alive_read)
            self._counters.close()
        return self.exit_code

    def _stop(self) -> None:
        """Drain: SIGTERM to every worker, whichever signal stopped the supervisor.
        A worker takes SIGINT as SIGTERM once it serves, but one still starting
        (importing) would die of a SIGINT with a traceback; a SIGTERM stops it quietly."""
        if not self.stopping:
            self.stopping = True
            self._wake.set()
            for worker in self.workers.values():
                worker.signal(signal.SIGTERM)

    def _forward(self, signame: str) -> None:
        """A second SIGTERM/SIGINT: forwarded (as SIGTERM), every worker closes everything."""
        for worker in self.workers.values():
            worker.signal(signal.SIGTERM)

    def _reloaded(self) -> None:
        if self.plane is not None:
            log.setLevel(self.plane.target.config.server.log_level.upper())

    async def _keep(self, number: int) -> None:
        """Keep worker ``number`` running until the supervisor stops."""
        failures = 0
        while not self.stopping:
            worker = await self._spawn(number)
            started = await self._begin(worker)
            code = await worker.process.wait()
            worker.ready = False
            worker.channel.close(f"it exited ({_status(code)})")
            if self.workers.get(number) is worker:
                del self.workers[number]
            if self.stopping:
                return
            if not started and code == EXIT_START_FAILED and number not in self._started:
                # It could not even start (it logged why): give up rather than loop.
                log.error("worker %d could not start; stopping", number)
                self.exit_code = 1
                self._stop()
                self._all_started.set()
                return
            age = time.monotonic() - worker.born
            failures = failures + 1 if age < _YOUNG_S else 0
            backoff = min(_MAX_BACKOFF_S, 0.1 * 2 ** failures) if failures else 0.0
            log.warning("worker %d (pid %d) exited (%s); restarting%s", number, worker.pid,
                        _status(code), f" in {backoff:.1f} s" if backoff else "")
            if backoff:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)

    async def _spawn(self, number: int) -> WorkerProcess:
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k != notify.ENVIRONMENT}
        server = self.plane.target.config.server if self.plane else self.config.server
        command = [sys.executable, "-m", "midway.control.worker",
                   "--number", str(number), "--count", str(self.count),
                   "--channel", str(theirs.fileno()), "--alive", str(self._alive_read),
                   "--counters", str(self._counters.fileno()), "--log-level", server.log_level]
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=subprocess.DEVNULL, env=env, process_group=0,
                pass_fds=(theirs.fileno(), self._alive_read, self._counters.fileno()))
        finally:
            theirs.close()
        worker = WorkerProcess(number, process, await Channel.open(ours, f"worker {number}"))
        self.workers[number] = worker
        return worker

    async def _begin(self, worker: WorkerProcess) -> bool:
        """Start ``worker`` with the target in force; under the plane's lock, so
        that no change is made between what it starts with and its first
        change.  Returns whether it started (else it is killed, or exits)."""
        assert self.plane is not None
        try:
            await worker.channel.receive(_START_TIMEOUT_S)
            async with self.plane.lock:
                if self.stopping:
                    return False
                await worker.call(Begin(self.plane.target), _START_TIMEOUT_S)
                worker.ready = True
        except (WorkerLost, CommandFailed, TimeoutError) as exc:
            if not isinstance(exc, CommandFailed) and not self.stopping:  # else it said why
                log.error("worker %d (pid %d) did not start: %s", worker.number, worker.pid,
                          exc or "no answer in time")
            worker.signal(signal.SIGKILL)
            return False
        self._started.add(worker.number)
        if len(self._started) == self.count:
            self._all_started.set()
        return True


def _status(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def run_supervisor(config: Config, count: int, loader: Loader | None = None) -> int:
    """Run ``count`` workers under a supervisor until SIGTERM/SIGINT; returns the
    exit code.  Raises :class:`ListenError` (nothing started) when an address
    cannot be held."""
    setup_logging(config.server.log_level, f"midway[supervisor, pid {os.getpid()}]")
    return asyncio.run(Supervisor(config, count, loader).run())
