"""midway as one process: the runtime, the admin API, the signals, reload and
readiness, composed.

Signals (the same in a supervisor, see :mod:`midway.workers`, and documented in
docs/guarantees.md): the first SIGTERM or SIGINT stops accepting and lets open
connections finish for up to ``drain_timeout_s``; a second one closes them at
once.  SIGHUP re-reads the configuration file (:meth:`ControlPlane.reload
<midway.control.plane.ControlPlane.reload>`); a bad file changes nothing and
is logged, naming the key.  The handlers are installed before anything binds,
so a signal that arrives as soon as midway listens is honoured.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable

from ..admin.host import HostError
from ..admin.routes import ToxiproxyAPI
from ..admin.server import AdminServer
from ..config.addresses import parse_address
from ..config.load import admin_token
from ..config.schema import Config
from ..config.target import Target
from ..errors import ConfigError, ListenError
from . import notify
from .agent import WorkerAgent
from .commands import LocalHandle, WorkerHandle
from .plane import ControlPlane, Loader

__all__ = ["serve", "setup_logging", "loop_factory", "StopSignals", "Admin", "Reloads", "SingleFleet", "EXIT_OK",
           "EXIT_START_FAILED"]

log = logging.getLogger("midway")

EXIT_OK, EXIT_START_FAILED = 0, 1


def setup_logging(level: str, who: str = "midway") -> None:
    """Log lines on standard error: ``TIME WHO LEVEL MESSAGE``; a worker's name
    it: ``TIME midway[worker 2, pid 4242] LEVEL ...``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {who} %(levelname)s %(message)s",
                                           "%Y-%m-%dT%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on: ``None`` means the standard library's.
    Raises :class:`ConfigError` when uvloop is asked for and not installed."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError("", "--loop uvloop: uvloop is not installed "
                                  "(pip install 'midway[fast]')") from None
        return None
    return uvloop.new_event_loop


class StopSignals:
    """SIGTERM/SIGINT: the first sets :attr:`stop` (drain) and is remembered in
    :attr:`first`; each later one calls ``cut(signal name)`` (close every
    connection now).  SIGHUP calls ``reload`` (or is ignored without one,
    rather than killing the process, its default action)."""

    def __init__(self, cut: Callable[[str], None],
                 reload: Callable[[], None] | None = None) -> None:
        self.stop = asyncio.Event()
        self.first = ""
        self._cut = cut
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig.name)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload)
        else:
            loop.add_signal_handler(signal.SIGHUP, lambda: None)

    def _on_stop(self, signame: str) -> None:
        if not self.stop.is_set():
            log.info("%s: stopping (send it again to close every connection at once)", signame)
            self.first = signame
            self.stop.set()
        else:
            log.info("%s again: closing every connection now", signame)
            self._cut(signame)


class SingleFleet:
    """The one worker of a single process: this process's agent."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle

    def handles(self) -> list[WorkerHandle]:
        return [self.handle]

    def reserve(self, target: Target) -> Target:
        return target  # the runtime binds (and picks port 0) itself

    def release(self, target: Target) -> None:
        pass

    def lost(self, handle: WorkerHandle, why: str) -> None:
        log.error("this process could not apply a change: %s", why)


class Admin:
    """The admin API of a control plane: its HTTP server, and the token in force
    (read again after each reload)."""

    def __init__(self, plane: ControlPlane, address: str) -> None:
        self.plane = plane
        self._token = admin_token(plane.target.config.server)
        _warn_if_others_read(plane.target.config.server.admin_token_file)
        # The name admin listens on (a bound address is an IP, allowed anyway).
        own = parse_address(address, listen=True).host
        self.server = AdminServer(
            ToxiproxyAPI(plane), address, token=lambda: self._token,
            hosts=lambda: (own, *plane.target.config.server.admin_hosts))
        plane.reloaded.append(self.refresh)

    def bind(self) -> None:
        """Take the address before serving it (see :meth:`AdminServer.bind`)."""
        self.server.bind()

    def start(self) -> None:
        self.server.start()

    def refresh(self) -> None:
        """Take the token of the target in force."""
        try:
            self._token = admin_token(self.plane.target.config.server)
        except ConfigError as exc:  # checked by the reload; the file went since
            log.error("admin API: %s; keeping the previous token", exc)
        _warn_if_others_read(self.plane.target.config.server.admin_token_file)

    async def stop(self) -> None:
        await self.server.stop()


def _warn_if_others_read(path: str) -> None:
    """A token file that other users may read gives them the admin API: say so
    (as ssh does of a key file), at start and at each reload."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) if path else 0
    except OSError:
        return  # admin_token said why
    if mode & 0o044:
        log.warning("admin_token_file %s can be read by other users (mode %o): chmod 600 it",
                    path, mode)


class Reloads:
    """SIGHUP's handler: a reload in a task (one after the other: the plane's
    lock orders them); the reload logs its own errors.  A SIGHUP before the
    control plane exists (still starting) is logged and ignored, and so is one
    once midway is stopping (:attr:`stopping`): a reload then would bind the
    ports of proxies it adds, whose clients nothing would ever serve."""

    def __init__(self) -> None:
        self.plane: ControlPlane | None = None
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    def hangup(self) -> None:
        if self.stopping:
            log.warning("SIGHUP while stopping: ignored")
            return
        if self.plane is None:
            log.warning("SIGHUP while starting: ignored (send it again once listening)")
            return
        log.info("SIGHUP: reloading the configuration")
        task = asyncio.get_running_loop().create_task(self._reload(self.plane),
                                                      name="midway reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self, plane: ControlPlane) -> None:
        try:
            await plane.reload()
        except HostError as exc:
            log.debug("reload refused: %s", exc.message)


async def serve(config: Config, loader: Loader | None = None,
                typed: Callable[[ConfigError], ConfigError] | None = None) -> int:
    """Run ``config`` in this process until SIGTERM/SIGINT; drain; return an exit
    code.  ``loader`` re-reads the configuration file on SIGHUP and ``POST
    /reload`` (``None``: started from the command line, nothing to re-read).
    ``typed`` words a start's :class:`ConfigError` as the user gave the value
    (the flag rather than the key)."""
    agent = WorkerAgent(Target(config))
    runtime = agent.runtime
    reloads = Reloads()
    signals = StopSignals(lambda name: runtime.close_all(f"second {name}"), reloads.hangup)
    admin = None
    plane = ControlPlane(Target(config), SingleFleet(LocalHandle(agent, pid=os.getpid())),
                         loader)
    try:
        if config.server.admin:
            admin = Admin(plane, config.server.admin)
            admin.start()
        # No request is answered before the start is done: nothing in it waits.
        await agent.start()
        plane.started(agent.running())
    except (ListenError, ConfigError) as exc:
        log.error("%s", typed(exc) if typed and isinstance(exc, ConfigError) else exc)
        if admin is not None:
            await admin.stop()
        await runtime.shutdown(0)
        return EXIT_START_FAILED
    reloads.plane = plane
    notify.notify(notify.READY)
    await signals.stop.wait()
    reloads.stopping = True
    notify.notify(notify.STOPPING)
    if admin is not None:
        await admin.stop()
    await runtime.shutdown()
    log.info("stopped")
    return EXIT_OK
