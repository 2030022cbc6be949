"""Multi-core: a supervisor and N worker processes sharing each listener.

Theory of operation
-------------------
Every worker is a whole midway (its own event loop and runtime) that binds each TCP
listener itself with ``SO_REUSEPORT``; the kernel spreads new connections across
the workers' sockets, so there is no shared accept queue and no lock.  The
supervisor (the parent) first binds each listener once *without listening*: that
checks the address up front (one clear error, exit 1, before any worker starts),
turns port 0 into one real port that every worker then shares, and holds the port
while workers come and go.  A socket that does not listen receives no connection.

The supervisor forks the workers before any event loop exists, forwards SIGTERM /
SIGINT to them (each drains as a single process would; a second signal makes them
close everything at once), restarts a worker that dies unexpectedly (with a
back-off that grows while it keeps dying young), and exits when all have exited.

A supervisor that dies without forwarding anything (SIGKILL, the OOM killer) must
not leave its workers serving on their own: each worker watches the read end of a
pipe whose only write end the supervisor holds, and the kernel closes that end
when the supervisor dies, however it dies.  The worker sees end-of-file and drains
as if it had been sent SIGTERM.  A pipe rather than Linux's ``PR_SET_PDEATHSIG``:
it works on every Unix, it cannot race with a parent that dies before the worker
has set it up (the end-of-file is already waiting), and it lets the worker drain
instead of being killed by a signal.

Each worker knows its number (1 to N, kept when it is restarted) and makes
connection ids unique across the whole process: worker ``w`` of ``N`` numbers its
connections ``w, w + N, w + 2N, ...`` (so ``id mod N`` names the worker, ``N``
giving 0), and a restarted worker carries on where the one it replaces stopped,
from a count per worker kept in memory shared with the supervisor.  Ids stay
small integers, as in a single process (where they are 1, 2, 3, ...).

Limits, for now: unix-socket listeners, the admin API and toxics configured at run
time live in one process, so they need ``workers = 1``.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

from .config.addresses import Address
from .config.schema import Config
from .errors import ConfigError, ListenError, describe_oserror

__all__ = ["run_supervisor", "worker_count", "reserve_ports", "Worker", "ConnectionIds"]

log = logging.getLogger("midway")

_YOUNG_S = 2.0
"""A worker that dies younger than this counts as a crash loop and backs off."""
_MAX_BACKOFF_S = 5.0


class ConnectionIds(Iterator[int]):
    """The connection ids of worker ``number`` of ``count``: ``number``,
    ``number + count``, ... , unique across the workers.  ``counters`` (one
    64-bit slot per worker, shared with the supervisor) holds how many this
    worker number has used, so a restarted worker goes on from there."""

    def __init__(self, number: int, count: int, counters: memoryview) -> None:
        self.number = number
        self.count = count
        self._counters = counters

    def __next__(self) -> int:
        used = self._counters[self.number - 1]
        self._counters[self.number - 1] = used + 1
        return used * self.count + self.number


@dataclass(frozen=True)
class Worker:
    """Who a worker process is, as the supervisor forked it."""

    number: int
    """1 to N; a restarted worker keeps the number of the one it replaces."""
    count: int
    parent_fd: int
    """Read end of the supervisor's pipe: readable (end-of-file) once the
    supervisor is gone.  The worker then drains and exits."""
    ids: ConnectionIds

    @property
    def pid(self) -> int:
        return os.getpid()


def worker_count(configured: int) -> int:
    """0 (or 'auto') means one worker per CPU this process may run on."""
    if configured:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def reserve_ports(config: Config) -> tuple[Config, list[socket.socket]]:
    """Bind every TCP listener once with SO_REUSEPORT (no listen).  Returns the
    config with port 0 replaced by the real port, and the reservation sockets to
    keep open.  Raises ListenError naming the address."""
    held: list[socket.socket] = []
    proxies = []
    try:
        for proxy in config.proxies:
            listen = []
            for address in proxy.listen:
                if address.is_unix:
                    raise ConfigError(f"proxy.{proxy.name}.listen",
                                      f"{address}: unix-socket listeners need workers = 1")
                try:
                    sock = _reserve(address)
                except ListenError as exc:
                    raise ListenError(f"proxy {proxy.name}: {exc}") from exc
                held.append(sock)
                listen.append(dataclasses.replace(address, port=sock.getsockname()[1]))
            proxies.append(dataclasses.replace(proxy, listen=tuple(listen)))
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return dataclasses.replace(config, proxies=tuple(proxies)), held


def _reserve(address: Address) -> socket.socket:
    host = address.host or "::"
    try:
        infos = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address}: cannot resolve {address.host!r} "
                          f"({exc.strerror})") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and not address.host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {describe_oserror(exc)}") from exc
    return sock


def run_supervisor(config: Config, count: int, serve: Callable[[Config, Worker], int]) -> int:
    """Run ``count`` workers, each calling ``serve(config, worker)`` in a forked
    child."""
    config, held = reserve_ports(config)
    children: dict[int, int] = {}  # pid -> worker number
    born: dict[int, float] = {}
    stopping = [0]
    # Not inheritable (os.pipe's default): a program a hook runs cannot keep the
    # write end open, and only the supervisor holds it.
    parent_fd, alive_fd = os.pipe()
    shared = mmap.mmap(-1, 8 * count)  # anonymous and MAP_SHARED: survives fork
    counters = memoryview(shared).cast("Q")

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(alive_fd)
                for sock in held:
                    sock.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = serve(config, Worker(number, count, parent_fd,
                                            ConnectionIds(number, count, counters)))
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                os._exit(code)
        children[pid] = number
        born[pid] = time.monotonic()

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping[0] += 1
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for number in range(1, count + 1):
        spawn(number)
    log.info("supervisor %d: started %d workers", os.getpid(), count)
    failures = 0
    exit_code = 0
    try:
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            number = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if stopping[0]:
                continue
            age = time.monotonic() - born.pop(pid, 0.0)
            if code == 1 and age < _YOUNG_S and failures == 0 and len(children) + 1 == count:
                # It could not even start (it logged why): give up rather than loop.
                log.error("worker %d could not start; stopping", number)
                exit_code = 1
                forward(signal.SIGTERM, None)
                continue
            failures = failures + 1 if age < _YOUNG_S else 0
            backoff = min(_MAX_BACKOFF_S, 0.1 * 2 ** failures) if failures else 0.0
            log.warning("worker %d (pid %d) exited with %s; restarting%s", number, pid, code,
                        f" in {backoff:.1f} s" if backoff else "")
            if backoff:
                time.sleep(backoff)
            if not stopping[0]:
                spawn(number)
    finally:
        for sock in held:
            sock.close()
        os.close(alive_fd)
        os.close(parent_fd)
        counters.release()
        shared.close()
    return exit_code
