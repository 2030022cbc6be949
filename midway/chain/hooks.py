"""Python hooks: a few lines of user code that see and change every connection.

A hook is named ``module:attr`` (``--hook examples.rewrite:rewrite``, or
``hooks = [...]`` in TOML; ``path/to/file.py:attr`` loads a file).  The
attribute is one of:

- a **class**: instantiated (no arguments) once per connection, so ``self`` is
  that connection's state;
- an **object or module** with the methods below, shared by all connections
  (per-connection state goes in ``ctx.state``);
- a plain **function**, used as ``on_data``.

Every method is optional and may be a plain function or a coroutine function::

    class Hook:
        framing = "line"            # optional: whole messages, see below
        max_frame_size = 1 << 20    # optional: bytes, framing included

        def on_connect(self, ctx):                  # raise midway.Rejected to refuse
            ...
        def on_data(self, direction, data, ctx):    # -> bytes | None | iterable of bytes
            return data.replace(b"foo", b"bar")
        def on_close(self, ctx, reason):
            ...

``direction`` is ``"upstream"`` (client → server) or ``"downstream"``.
``on_data`` returns what to send on in that direction: ``None`` for ``data``
unchanged, bytes for a replacement, ``b""`` (or an empty list) to drop it, or
an iterable of byte strings sent in order.  ``ctx`` (:class:`HookContext`)
describes the connection (``ctx.client``, ``ctx.upstream``, ``ctx.proxy``,
``ctx.id``...), holds ``ctx.state`` and acts: ``ctx.send_to_client(b)``,
``ctx.send_to_server(b)``, ``ctx.close(reason)``, ``ctx.reset(reason)``.

Theory of operation
-------------------
A :class:`HookElement` puts one :class:`~midway.chain.base.Stage` in each
direction (none if the hook has no ``on_data``: then its connections keep the
relay's fast path).  Each stage runs the relay's chunks through a framer when
the hook declares one (``framing``: ``"line"``, ``"line:\\r\\n"``,
``"length:4:big"``, ``"fixed:16"``, see :func:`~midway.chain.framing.make_framer`,
or a dict with one spec per direction), so a message cut into many TCP
segments reaches ``on_data`` once, whole, and several messages in one segment
reach it one by one.  At the end of a stream an incomplete last message is
passed on unchanged: the hook never sees a partial message.  A message larger
than ``max_frame_size`` resets the connection with one log line.

Order is kept: a direction's stage handles one message at a time, awaiting an
async ``on_data`` before the next, while the relay stops reading that socket
once its bounded queue is full, so a slow hook slows its sender and memory
stays bounded.  Injected bytes (``send_to_*``) travel through the rest of the
chain in their direction like any other output of this hook, so dumps and
captures after it show them.  They are sent in call order, by a small task, as
soon as their direction is free; bytes injected into a message's own direction
during ``on_data`` go out before what it returns.  A callback waits for the
other direction only when more than :data:`HOOK_PENDING_MAX` injected bytes
are waiting there.

A hook that raises closes its connection only: the error and traceback are
logged once, with the hook's name, and the proxy goes on serving the others.
That holds for every exception, ``SystemExit``, ``KeyboardInterrupt`` and a
``CancelledError`` the hook raised itself included (the relay cancelling a call,
when the connection closes, is told apart by ``Task.cancelling()``).  Import
errors and bad ``framing`` are :class:`~midway.errors.ConfigError` at startup,
naming the hook.

What a hook may cost
--------------------
Every connection of a process shares one event loop.  A plain (sync) callback
runs on it: it must be fast, because while it runs no other connection moves.
Each sync call is timed (two clock reads) and one that holds the loop for more
than :data:`HOOK_SLOW_CALL_S` gets a warning naming the hook (at most one per
hook per :data:`HOOK_SLOW_WARNING_INTERVAL_S`).  A hook that declares
``blocking = True`` has its sync callbacks run in a thread pool of
:data:`HOOK_THREADS` threads shared by the process: the connection's direction
waits for the call (order is kept, and the two directions of one connection
never call it at once), the others go on.  Its actions (``ctx.send_to_*``,
``ctx.close``, ``ctx.reset``) may be called from that thread.  Async callbacks
always run on the loop and must not block.  ``on_connect`` and an async
``on_close`` are bounded by :data:`HOOK_CALLBACK_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from ..core.cooperate import cooperate
from ..core.observer import CloseReason
from ..errors import ConfigError, ElementError, Rejected, traceback_of
from .base import (
    DIRECTIONS,
    DOWNSTREAM,
    UPSTREAM,
    Attachment,
    ConnectionInfo,
    Direction,
    Element,
    Output,
    Stage,
)
from .framing import DEFAULT_MAX_SIZE, Framer, FramingError, make_framer

__all__ = [
    "HOOK_CALLBACK_TIMEOUT_S",
    "HOOK_CLOSE_TIMEOUT_S",
    "HOOK_PENDING_MAX",
    "HOOK_SLOW_CALL_S",
    "HOOK_SLOW_WARNING_INTERVAL_S",
    "HOOK_THREADS",
    "HookContext",
    "HookElement",
    "HookError",
    "load_hook",
]

log = logging.getLogger("midway")

HOOK_PENDING_MAX = 1 << 20
"""Injected bytes that may wait for one direction before the injecting callback
waits too (1 MiB, the relay's read-ahead bound per chained direction)."""

HOOK_CALLBACK_TIMEOUT_S = 10.0
"""How long ``on_connect`` and an async ``on_close`` may run.  An ``on_connect``
still running after it closes its connection (reason ``error``, logged); an
``on_close`` is cancelled after it, or when the proxy stops, whichever is first.
10 s: HAProxy's ``timeout connect`` in its documentation's examples; a
connection-time check taking longer has failed in all but name."""
HOOK_CLOSE_TIMEOUT_S = HOOK_CALLBACK_TIMEOUT_S

HOOK_CLOSE_SEND_S = HOOK_CALLBACK_TIMEOUT_S
"""How long ``ctx.close()`` waits for what the hook injected and returned before
it to be passed on, before closing anyway (a peer that reads nothing): the same
bound as a hook's ``on_connect``."""
"""The same bound, under its earlier name."""

HOOK_SLOW_CALL_S = 0.1
"""A sync callback holding the event loop longer than this (100 ms) is reported:
asyncio's debug mode calls a callback slow at the same mark
(``loop.slow_callback_duration``)."""

HOOK_SLOW_WARNING_INTERVAL_S = 60.0
"""At most one slow-callback warning per hook per minute: a hook slow on every
message would otherwise log on every message."""

HOOK_THREADS = min(32, (os.cpu_count() or 1) + 4)
"""Threads running the sync callbacks of hooks marked ``blocking = True``, shared
by every such hook of the process: the standard library's default for an I/O-bound
``ThreadPoolExecutor`` (Python 3.8+).  Calls beyond it wait their turn; each
waiting call holds back only its own connection's direction."""

_METHODS = ("on_connect", "on_data", "on_close")

_pool_lock = threading.Lock()
_pool_instance: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The thread pool of blocking hooks, made on first use (so after a fork)."""
    global _pool_instance
    with _pool_lock:
        if _pool_instance is None:
            _pool_instance = concurrent.futures.ThreadPoolExecutor(
                HOOK_THREADS, thread_name_prefix="midway-hook")
        return _pool_instance


_CALLERS = tuple(os.path.dirname(path) + os.sep for path in (
    os.path.dirname(__file__), asyncio.__file__, concurrent.futures.__file__))


def _from_the_hook(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` from the hook's first frame on: without the frames of midway
    (:meth:`_HookStage._call`), asyncio or the thread pool that called it, which
    come first and would only bury the hook's own.  Unchanged if no frame is
    the hook's."""
    start = tb
    while start is not None and start.tb_frame.f_code.co_filename.startswith(_CALLERS):
        start = start.tb_next
    return start if start is not None else tb


def _log_callback_error(spec: str, what: str, exc: BaseException) -> None:
    """A callback run as a task of its own failed: one line, the hook's frames only."""
    exc.__traceback__ = _from_the_hook(exc.__traceback__)
    log.error("hook %s raised in %s", spec, what, exc_info=exc)


def _cancelled_by_us() -> bool:
    """In an ``except CancelledError``: was the running task itself cancelled (the
    relay closing), rather than user code raising ``CancelledError``?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class HookError(ElementError):
    """A hook failed (raised, or returned something that is not bytes); the
    message names the hook and the callback, the hook's exception (if any) is
    chained as the cause, and only its traceback is logged."""


# --- loading ----------------------------------------------------------------


def _import_target(spec: str, path: str, fresh: bool = False) -> object:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(path, f"hook {spec!r}: expected MODULE:ATTR, e.g. 'examples.rewrite:rewrite'")
    if "/" in module_name and not module_name.endswith(".py"):  # a path, yet no hook file
        raise ConfigError(path, f"hook {spec!r}: {module_name!r} is neither a module name nor "
                                "a file ending in .py")
    try:
        if module_name.endswith(".py"):
            module = _import_file(module_name)
        elif fresh:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            module = _import_fresh(module_name)
        else:
            # Like uvicorn and gunicorn: modules next to where midway is run are
            # found even when it runs as an installed script.
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name
                                     or module_name.startswith(exc.name + ".")):
            raise ConfigError(path, f"hook {spec!r}: no module named {exc.name!r} "
                                    f"(searched from {os.getcwd()})") from exc
        raise ConfigError(path, f"hook {spec!r}: importing {module_name!r} failed: "
                                f"{_describe(exc)}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(path, f"hook {spec!r}: no file {module_name!r}") from exc
    except (Exception, SystemExit) as exc:  # the module's own code failed: say where
        # (a sys.exit() in it included, which would end midway, mid-reload too)
        raise ConfigError(path, f"hook {spec!r}: importing {module_name!r} failed: "
                                f"{_describe(exc)}") from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigError(path, f"hook {spec!r}: {module_name!r} has no attribute "
                                    f"{attr!r}") from exc
    return target


def _import_file(filename: str) -> types.ModuleType:
    """A hook file, run anew each time (so a reload sees it as it is now)."""
    if not os.path.isfile(filename):
        raise FileNotFoundError(filename)
    name = "midway_hook_" + os.path.splitext(os.path.basename(filename))[0]
    loader_spec = importlib.util.spec_from_file_location(name, filename)
    if loader_spec is None or loader_spec.loader is None:
        raise FileNotFoundError(filename)
    return _execute(loader_spec)


def _import_fresh(name: str) -> types.ModuleType:
    """Import module ``name`` anew, as a reload asks: a new module object under
    the same name (connections still running the old hook keep the old module and
    its globals, which ``importlib.reload`` would change under them).  Only this
    module is imported again; its parent packages and what it imports are not."""
    previous = sys.modules.pop(name, None)
    importlib.invalidate_caches()  # a module file created since the last import
    try:
        loader_spec = importlib.util.find_spec(name)
        if loader_spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return _execute(loader_spec)
    except BaseException:
        if previous is not None:
            sys.modules[name] = previous
        raise


def _execute(loader_spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    """Run a module's source into a new module registered under its name.  A
    source file is compiled from what is on disk now, not from ``__pycache__``:
    bytecode is trusted by the source's modification time in whole seconds and
    its size, so an edit within the same second that keeps the size would run
    the old code."""
    assert loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[loader_spec.name] = module
    try:
        origin = loader_spec.origin
        if origin and origin.endswith(".py") and os.path.isfile(origin):
            with open(origin, "rb") as source:
                code = compile(source.read(), origin, "exec", dont_inherit=True)
            exec(code, module.__dict__)
        else:
            loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(loader_spec.name, None)
        raise
    return module


def _describe(exc: BaseException) -> str:
    """``Kind: message (file:line)`` for the innermost frame of ``exc``."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            where = f" ({frames[-1].filename}:{frames[-1].lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _framers(target: object, spec: str, path: str) -> tuple[dict[Direction, str | None], int]:
    """The framing specs per direction, checked now so that a typo fails at startup."""
    framing = getattr(target, "framing", None)
    max_size = getattr(target, "max_frame_size", DEFAULT_MAX_SIZE)
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ConfigError(path, f"hook {spec!r}: max_frame_size must be a positive number "
                                f"of bytes, not {max_size!r}")
    specs: dict[Direction, str | None]
    if framing is None or isinstance(framing, str):
        specs = {UPSTREAM: framing, DOWNSTREAM: framing}
    elif isinstance(framing, Mapping):
        unknown = set(framing) - set(DIRECTIONS)
        if unknown:
            raise ConfigError(path, f"hook {spec!r}: framing keys are 'upstream' and "
                                    f"'downstream', not {sorted(unknown)!r}")
        specs = {d: framing.get(d) for d in DIRECTIONS}
    else:
        raise ConfigError(path, f"hook {spec!r}: framing must be a string, None or a dict "
                                f"per direction, not {framing!r}")
    for direction, text in specs.items():
        if text is None:
            continue
        if not isinstance(text, str):
            raise ConfigError(path, f"hook {spec!r}: {direction} framing must be a string, "
                                    f"not {text!r}")
        try:
            make_framer(text, max_size=max_size)
        except ValueError as exc:
            raise ConfigError(path, f"hook {spec!r}: {exc}") from exc
    return specs, max_size


def load_hook(spec: str, path: str = "hooks", *, fresh: bool = False) -> HookElement:
    """Import the hook ``spec`` (``module:attr`` or ``file.py:attr``) and check
    it; ``fresh`` imports the module anew even if it was imported before (a
    reload; a ``file.py`` is always read anew).  Raises
    :class:`~midway.errors.ConfigError` at ``path`` naming the hook when it
    cannot be imported, has no hook method, or declares a bad framing."""
    target = _import_target(spec, path, fresh)
    return HookElement(target, spec, path=path)


# --- the element ------------------------------------------------------------


class HookElement(Element):
    """One hook in a proxy's chain.  ``target`` is the class, object, module or
    function the spec named (see the module doc); build it with
    :func:`load_hook`, or directly from Python objects."""

    def __init__(self, target: object, spec: str = "", *, path: str = "hooks") -> None:
        self.spec = spec or getattr(target, "__qualname__", None) or type(target).__name__
        self.name = f"hook:{self.spec}"
        self.target = target
        self.per_connection = inspect.isclass(target)
        has = {m for m in _METHODS if callable(getattr(target, m, None))}
        if not has:
            if callable(target) and not self.per_connection:
                has = {"on_data"}
                self.function: Callable[..., Any] | None = target
            else:
                raise ConfigError(path, f"hook {self.spec!r}: defines none of "
                                        f"{', '.join(_METHODS)}")
        else:
            self.function = None
        self.has = frozenset(has)
        self.framing, self.max_frame_size = _framers(target, self.spec, path)
        blocking = getattr(target, "blocking", False)
        if not isinstance(blocking, bool):
            raise ConfigError(path, f"hook {self.spec!r}: blocking must be True or False, "
                                    f"not {blocking!r}")
        self.blocking = blocking
        """Run sync callbacks in the thread pool (see the module doc)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._slow_warned_at = -HOOK_SLOW_WARNING_INTERVAL_S

    def attach(self, info: ConnectionInfo) -> Attachment:
        ctx = HookContext(self, info)
        if "on_data" in self.has:
            ctx._stages = {d: _HookStage(ctx, d) for d in DIRECTIONS}
        return Attachment(
            upstream=ctx._stages.get(UPSTREAM),
            downstream=ctx._stages.get(DOWNSTREAM),
            on_open=ctx._on_open if "on_connect" in self.has else None,
            on_close=ctx._on_close,
        )

    def _slow(self, name: str, seconds: float) -> None:
        now = time.monotonic()
        if now - self._slow_warned_at < HOOK_SLOW_WARNING_INTERVAL_S:
            return
        self._slow_warned_at = now
        log.warning("hook %s: a call to %s held the event loop for %.2f s, and every "
                    "connection of this process waited; make it async, or mark the hook "
                    "blocking = True to run its sync callbacks in a thread pool (this "
                    "warning: at most once a minute per hook)", self.spec, name, seconds)

    def _spawn(self, coro: Awaitable[object], what: str) -> None:
        async def bounded() -> None:
            timeout = HOOK_CALLBACK_TIMEOUT_S
            try:
                async with asyncio.timeout(timeout):
                    await coro
            except TimeoutError:
                log.error("hook %s: %s still running after %g s; cancelled",
                          self.spec, what, timeout)
            except asyncio.CancelledError as exc:
                if _cancelled_by_us():
                    raise
                _log_callback_error(self.spec, what, exc)
            except BaseException as exc:  # SystemExit too: one callback, not the process
                _log_callback_error(self.spec, what, exc)

        task = asyncio.get_running_loop().create_task(bounded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class HookContext:
    """One connection as a hook sees it: facts, ``state``, and actions.

    The facts are those of :class:`~midway.chain.base.ConnectionInfo` (also
    whole, as :attr:`info`).  The actions may be called from any callback of
    this connection, sync or async, or from a task the hook started."""

    def __init__(self, element: HookElement, info: ConnectionInfo) -> None:
        self.info = info
        self.state = types.SimpleNamespace()
        """Free per-connection space for the hook (a fresh namespace per connection)."""
        self._element = element
        self._impl: object | None = None if element.per_connection else element.target
        self._stages: dict[Direction, _HookStage] = {}
        self._ended = False
        self._refusal: str | None = None
        self._closer: asyncio.Task[None] | None = None
        """The graceful close under way (``close``), once asked for."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop, for actions called from a pool thread (blocking hooks)."""
        self._loop_thread = 0
        self._pool_turn: asyncio.Lock | None = None
        """One pool call of this connection at a time (blocking hooks)."""

    # -- facts -------------------------------------------------------------

    @property
    def id(self) -> int:
        """Process-unique connection number."""
        return self.info.id

    @property
    def proxy(self) -> str:
        """Name of the proxy that accepted the connection."""
        return self.info.proxy

    @property
    def client(self) -> str:
        """The client's address, ``host:port``."""
        return self.info.client

    @property
    def client_addr(self) -> tuple[str, int] | None:
        return self.info.client_addr

    @property
    def listener(self) -> str:
        """The local address that accepted the client."""
        return self.info.listener

    @property
    def upstream(self) -> str | None:
        """The upstream connected to, ``host:port`` as configured."""
        return self.info.upstream

    @property
    def upstream_addr(self) -> tuple[str, int] | None:
        return self.info.upstream_addr

    def __repr__(self) -> str:
        return f"<HookContext #{self.id} {self.client} -> {self.upstream} ({self.proxy})>"

    # -- actions -------------------------------------------------------------

    def send_to_server(self, data: bytes) -> None:
        """Send ``data`` towards the upstream server, through the rest of the chain."""
        self.send(UPSTREAM, data)

    def send_to_client(self, data: bytes) -> None:
        """Send ``data`` back to the client, through the rest of the chain."""
        self.send(DOWNSTREAM, data)

    def send(self, direction: Direction, data: bytes) -> None:
        """Inject ``data`` into ``direction`` (``"upstream"``: to the server).
        Sent in call order; dropped if that direction has already ended.
        Raises ``RuntimeError`` if the hook has no ``on_data`` (then it has no
        place in the data path)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"send() takes bytes, not {type(data).__name__}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'upstream' or 'downstream', not {direction!r}")
        stage = self._stages.get(direction)
        if stage is None:
            raise RuntimeError(f"hook {self._element.spec} has no on_data, so it cannot "
                               "send data; define on_data to get a place in the data path")
        # bytes is kept as it is (no copy); a mutable buffer is copied once, since
        # the hook may change it after this call.
        data = bytes(data)
        if not self._from_pool(self._inject, stage, data):
            self._inject(stage, data)

    @staticmethod
    def _inject(stage: _HookStage, data: bytes) -> None:
        stage.inject(data)
        stage.kick()

    def _from_pool(self, action: Callable[..., None], *args: object) -> bool:
        """Called from a blocking hook's pool thread: hand ``action`` to the loop
        (in call order, before the call's own result is handled) and say so."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            return False
        self._loop.call_soon_threadsafe(action, *args)
        return True

    def close(self, reason: str = "closed by hook") -> None:
        """Close the connection gracefully: what was already sent on, what the
        hook injected before this call and what the callback making it returns
        are delivered, then FIN both ways; nothing read after it is passed on.
        In ``on_connect``: refuse it."""
        self._end(reason, reset=False)

    def reset(self, reason: str = "reset by hook") -> None:
        """Abort the connection: both sockets get a TCP RST.  In ``on_connect``:
        refuse it."""
        self._end(reason, reset=True)

    async def drain(self) -> None:
        """Wait until everything injected so far has been passed on (for a
        background task that injects a lot)."""
        for stage in self._stages.values():
            await stage.drained()

    def _end(self, reason: str, *, reset: bool) -> None:
        if self._from_pool(functools.partial(self._end, reason, reset=reset)):
            return
        out = next((s.out for s in self._stages.values() if s.out is not None), None)
        if out is None:
            self._refusal = reason
        elif reset:
            out.reset(f"hook {self._element.spec}: {reason}")
        elif self._closer is None:
            # The relay's close sends the FINs at once: injections still queued in
            # a stage (a reply to QUIT) and what the current on_data returns would
            # be lost.  So stop taking data, let those through, then close.
            for stage in self._stages.values():
                stage.closing = True
            self._closer = asyncio.get_running_loop().create_task(
                self._close_when_sent(out, f"hook {self._element.spec}: {reason}"))

    async def _close_when_sent(self, out: Output, detail: str) -> None:
        try:
            async with asyncio.timeout(HOOK_CLOSE_SEND_S):
                for stage in self._stages.values():
                    await stage.drained()
                    async with stage.lock:  # a batch of sends under way ends first
                        pass
        except TimeoutError:
            log.warning("conn %d (%s): %s: what the hook sent was not passed on within "
                        "%g s; closing anyway", self.id, self.proxy, detail, HOOK_CLOSE_SEND_S)
        out.close(detail)

    # -- calling the hook --------------------------------------------------------

    def _method(self, name: str) -> Callable[..., Any] | None:
        element = self._element
        if name == "on_data" and element.function is not None:
            return element.function
        if name not in element.has:
            return None
        if self._impl is None:
            try:
                self._impl = element.target()  # type: ignore[operator]
            except BaseException as exc:  # SystemExit too, as in _call: this connection only
                exc.__traceback__ = _from_the_hook(exc.__traceback__)
                raise HookError(f"hook {element.spec}: creating its per-connection object "
                                f"failed: {type(exc).__name__}: {exc}") from exc
        method: Callable[..., Any] = getattr(self._impl, name)
        return method

    async def _call(self, name: str, *args: object) -> object:
        method = self._method(name)
        if method is None:
            return None
        element = self._element
        try:
            if element.blocking and not inspect.iscoroutinefunction(method):
                result = await self._in_pool(method, args)
            else:
                started = time.perf_counter()
                result = method(*args)
                held = time.perf_counter() - started
                if held > HOOK_SLOW_CALL_S:
                    element._slow(name, held)
            if inspect.isawaitable(result):
                result = await result
            return result
        except (HookError, Rejected):
            raise
        except asyncio.CancelledError as exc:
            if _cancelled_by_us():
                raise
            raise self._failure(name, exc) from exc
        except BaseException as exc:  # SystemExit too: this connection, not the process
            raise self._failure(name, exc) from exc

    def _failure(self, name: str, exc: BaseException) -> HookError:
        exc.__traceback__ = _from_the_hook(exc.__traceback__)
        return HookError(f"hook {self._element.spec} raised in {name}: "
                         f"{type(exc).__name__}: {exc}")

    async def _in_pool(self, method: Callable[..., Any], args: tuple[object, ...]) -> object:
        """Run a blocking hook's sync callback in the pool; wait for it here."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._pool_turn = asyncio.Lock()
        assert self._pool_turn is not None
        async with self._pool_turn:
            return await self._loop.run_in_executor(_pool(), functools.partial(method, *args))

    async def _on_open(self, info: ConnectionInfo) -> None:
        timeout = HOOK_CALLBACK_TIMEOUT_S
        try:
            async with asyncio.timeout(timeout):
                await self._call("on_connect", self)
        except TimeoutError:  # ours: the hook's own errors arrive as HookError
            # The service's log line says the connection is closed: not twice.
            raise HookError(f"hook {self._element.spec}: on_connect still running after "
                            f"{timeout:g} s") from None
        if self._refusal is not None:
            raise Rejected(f"hook {self._element.spec}: {self._refusal}")

    def _on_close(self, info: ConnectionInfo, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        for stage in self._stages.values():
            stage.close()
        if "on_close" not in self._element.has or reason == CloseReason.REJECTED:
            # An on_connect (this hook's or another's) refused the connection: it
            # never opened, so there is nothing for on_close to end (docs/inspection.md).
            return
        element = self._element
        try:
            method = self._method("on_close")
            assert method is not None
            if element.blocking and not inspect.iscoroutinefunction(method):
                element._spawn(self._in_pool(method, (self, reason)),
                               f"on_close of conn {info.id}")
                return
            started = time.perf_counter()
            result = method(self, reason)
            held = time.perf_counter() - started
            if held > HOOK_SLOW_CALL_S:
                element._slow("on_close", held)
        except BaseException as exc:  # SystemExit too: one callback, not the process
            exc.__traceback__ = _from_the_hook(exc.__traceback__)
            log.error("conn %d (%s): hook %s raised in on_close", info.id, info.proxy,
                      element.spec, exc_info=exc)
            return
        if inspect.isawaitable(result):
            element._spawn(result, f"on_close of conn {info.id}")


def _chunks(result: object, original: bytes, spec: str) -> list[bytes]:
    """What ``on_data`` returned, as the byte strings to send on."""
    if result is None:
        return [original]
    if isinstance(result, bytes):
        return [result]
    if isinstance(result, bytearray | memoryview):
        return [bytes(result)]
    if isinstance(result, str):
        raise HookError(f"hook {spec}: on_data returned str; return bytes (encode it)")
    if isinstance(result, Iterable):
        items = []
        for item in result:
            if not isinstance(item, bytes | bytearray | memoryview):
                raise HookError(f"hook {spec}: on_data returned an iterable holding "
                                f"{type(item).__name__}; each item must be bytes")
            items.append(bytes(item))
        return items
    raise HookError(f"hook {spec}: on_data must return bytes, None or an iterable of "
                    f"bytes, not {type(result).__name__}")


class _HookStage(Stage):
    """One direction of one connection through one hook.

    The stage's output can be used by two tasks: the relay's pump for this
    direction (``data``/``eof``), and injections from the other direction or
    from the hook's own tasks.  ``lock`` makes each batch of sends atomic, and
    no code path ever holds two stages' locks, so the two directions cannot
    deadlock each other."""

    def __init__(self, ctx: HookContext, direction: Direction) -> None:
        self.ctx = ctx
        self.direction = direction
        element = ctx._element
        spec = element.framing[direction]
        self.framer: Framer | None = (
            make_framer(spec, max_size=element.max_frame_size) if spec is not None else None)
        self.out: Output | None = None
        self.lock = asyncio.Lock()
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.ended = False
        self.closing = False
        """The hook closed the connection (``ctx.close``): data arriving since is
        dropped, not handed to the hook."""
        self.dropped = 0
        self._drainer: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None

    # -- the relay's calls ---------------------------------------------------

    def start(self, out: Output) -> None:
        self.out = out
        if self.pending:
            self.kick()

    async def data(self, data: bytes, out: Output) -> None:
        self.out = out
        if self.framer is None:
            await self._deliver(data, out)
            return
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            for message in exc.complete:
                await self._deliver(message, out)
            self._framing_failed(exc, out)
            return
        for message in messages:
            await self._deliver(message, out)
            await cooperate()  # many small messages in one chunk: let others run

    async def eof(self, out: Output) -> None:
        self.out = out
        async with self.lock:
            await self._send_pending(out)
            if self.framer is not None and (tail := self.framer.pending()):
                await out.send(tail)  # an incomplete last message goes on as it is
            self.ended = True
            await out.send_eof()
        self._wake_drained()

    async def flush(self, out: Output) -> None:
        self.out = out
        async with self.lock:
            await self._send_pending(out)
            if self.framer is not None and (tail := self.framer.pending()):
                await out.send(tail)
            self.ended = True
        self._wake_drained()

    def close(self) -> None:
        self.ended = True
        self.pending.clear()
        self.pending_bytes = 0
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        self._wake_drained()

    # -- hook calls and injections -------------------------------------------------

    async def _deliver(self, message: bytes, out: Output) -> None:
        ctx = self.ctx
        if self.closing:
            self.dropped += len(message)
            return
        try:
            result = await ctx._call("on_data", self.direction, message, ctx)
        except Rejected as exc:  # as in on_connect: this connection is refused
            log.info("conn %d (%s): hook %s closed the connection: %s", ctx.id, ctx.proxy,
                     ctx._element.spec, exc)
            ctx._end(str(exc), reset=False)  # as ctx.close(): its injections go first
            return
        chunks = _chunks(result, message, ctx._element.spec)
        other = ctx._stages[DOWNSTREAM if self.direction == UPSTREAM else UPSTREAM]
        if other.pending:
            other.kick()
        async with self.lock:
            await self._send_pending(out)
            for chunk in chunks:
                if chunk and not self.ended:
                    await out.send(chunk)
        if other.pending_bytes > HOOK_PENDING_MAX:
            await other.drained()

    def inject(self, data: bytes) -> None:
        if self.ended:
            self.dropped += len(data)
            log.debug("hook %s: conn %d: %d injected %s bytes dropped: that direction has "
                      "ended", self.ctx._element.spec, self.ctx.id, len(data), self.direction)
            return
        if data:
            self.pending.append(data)
            self.pending_bytes += len(data)

    def kick(self) -> None:
        """Send pending injections from a task of their own, once the stage has
        an output (before that, ``start`` kicks)."""
        if self.out is None or self.ended or (self._drainer is not None
                                              and not self._drainer.done()):
            return
        self._drainer = asyncio.get_running_loop().create_task(self._drain_task())

    async def _drain_task(self) -> None:
        try:
            async with self.lock:
                if self.out is not None:
                    await self._send_pending(self.out)
        except asyncio.CancelledError as exc:
            if _cancelled_by_us():
                raise
            self._injection_failed(exc)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            self._injection_failed(exc)  # a later element failed: this connection only
        finally:
            self._wake_drained()

    def _injection_failed(self, exc: BaseException) -> None:
        log.error("conn %d (%s): sending data injected by hook %s failed (%s); resetting",
                  self.ctx.id, self.ctx.proxy, self.ctx._element.spec, exc,
                  exc_info=traceback_of(exc))
        if self.out is not None:
            self.out.reset(f"hook {self.ctx._element.spec}: injection failed")

    async def _send_pending(self, out: Output) -> None:
        """Send what was injected, in order (the caller holds ``lock``)."""
        while self.pending:
            chunk = self.pending.popleft()
            self.pending_bytes -= len(chunk)
            if self.ended:
                self.dropped += len(chunk)
                continue
            await out.send(chunk)
        self._wake_drained()

    async def drained(self) -> None:
        """Wait until nothing injected is waiting (or the stage has ended).
        Returns at once before the stage has started (in ``on_connect``)."""
        while self.pending and not self.ended and self.out is not None:
            if self._drained is None:
                self._drained = asyncio.Event()
            self.kick()
            await self._drained.wait()

    def _wake_drained(self) -> None:
        if self._drained is not None and (not self.pending or self.ended):
            self._drained.set()
            self._drained = None

    def _framing_failed(self, exc: FramingError, out: Output) -> None:
        ctx = self.ctx
        log.error("conn %d (%s): hook %s: %s data breaks its framing (%s); resetting the "
                  "connection", ctx.id, ctx.proxy, ctx._element.spec, self.direction, exc)
        self.ended = True
        out.reset(f"hook {ctx._element.spec}: {exc}")
