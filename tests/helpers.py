"""Shared test helpers: loopback servers, a proxy subprocess, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass
class Mode:
    """How the proxy under test moves bytes: ``path`` is ``splice`` or ``copy``;
    ``loop`` is ``asyncio`` or ``uvloop``.  tests/e2e/conftest.py runs every
    end-to-end test in each mode."""

    path: str = "splice"
    loop: str = "asyncio"

    def loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        if self.loop == "uvloop":
            import uvloop
            return uvloop.new_event_loop
        return None

    def cli_args(self, args: list[str]) -> list[str]:
        """Flags that select this mode for a ``python -m midway`` child."""
        extra = ["--loop", self.loop]
        if self.path == "copy" and "--config" not in args:
            extra.append("--no-splice")
        return extra


MODE = Mode()


def needs(what: str, *, apt: str = "", pip: str = "", npm: str = "") -> str:
    """A skip reason, always in the same form: ``needs WHAT (install: COMMAND)``,
    the command one that provides it."""
    commands = [f"apt-get install {apt}" if apt else "", f"pip install '{pip}'" if pip else "",
                f"npm install --prefix .ci/node {npm}" if npm else ""]
    how = "; ".join(c for c in commands if c)
    return f"needs {what} (install: {how})" if how else f"needs {what}"


def needs_accel() -> str:
    """The skip reason of a test of the compiled relay (midway/core/_accel.c)."""
    if os.environ.get("MIDWAY_PURE_PYTHON", "") not in ("", "0"):
        return needs("the compiled relay, which this run leaves off (MIDWAY_PURE_PYTHON=1)")
    return needs("the compiled relay, built by pip with a C compiler", pip="-e .")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run ``coro`` on a fresh event loop (of the current :data:`MODE`), failing
    (not hanging) after ``timeout``."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    with asyncio.Runner(loop_factory=MODE.loop_factory()) as runner:
        return runner.run(bounded())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def serve(handler: Handler = echo_handler, host: str = "127.0.0.1"):
    """A loopback TCP server on a free port; yields the port."""
    server = await asyncio.start_server(handler, host, 0, backlog=4096)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def send_blob(writer: asyncio.StreamWriter, blob: bytes, piece: int = 1 << 20,
                    pause_s: float = 0.0) -> None:
    """Write ``blob`` in ``piece``-sized writes (honouring back-pressure, optionally
    pausing between them), then half-close."""
    view = memoryview(blob)
    for i in range(0, len(blob), piece):
        writer.write(view[i:i + piece])
        await writer.drain()
        if pause_s:
            await asyncio.sleep(pause_s)
    writer.write_eof()


async def sha256_to_eof(reader: asyncio.StreamReader) -> tuple[str, int]:
    """Read to EOF; the sha256 hex digest of what came and how many bytes."""
    digest = hashlib.sha256()
    total = 0
    while chunk := await reader.read(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    return digest.hexdigest(), total


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def flooding_upstream() -> Iterator[tuple[int, list[int]]]:
    """An upstream that sends ``x`` bytes as fast as it may to its first client;
    yields (port, [bytes sent so far])."""
    sent = [0]
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))

    def pump() -> None:
        try:
            conn, _ = server.accept()
        except OSError:  # closed before anyone connected
            return
        conn.settimeout(0.2)
        chunk = b"x" * 65536
        while not stop.is_set():
            try:
                sent[0] += conn.send(chunk)
            except TimeoutError:
                continue
            except OSError:
                break
        conn.close()

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield int(server.getsockname()[1]), sent
    finally:
        stop.set()
        server.close()


@contextlib.contextmanager
def threaded_echo(*, hold_after_eof: bool = False) -> Iterator[int]:
    """A blocking echo server on loopback, a thread per connection; yields its
    port.  ``hold_after_eof`` keeps its side open after the client's FIN (so a
    client's half-close stays visible) until the server is closed, at most 60 s."""
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    done = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                if hold_after_eof:
                    done.wait(60)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        server.close()


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[str, int]]:
    """The address of a listener whose accept queue is full: Linux drops further
    SYNs, so a connect to it neither succeeds nor fails until its timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        fillers = [socket.socket() for _ in range(4)]
        try:
            for f in fillers:
                f.setblocking(False)
                f.connect_ex(server.getsockname())
            time.sleep(0.05)  # the handshakes complete and fill the queue
            yield server.getsockname()
        finally:
            for f in fillers:
                f.close()


@contextlib.contextmanager
def threaded(handler: Callable[..., socketserver.BaseRequestHandler],
             wrap: Callable[[socket.socket], socket.socket] | None = None) -> Iterator[int]:
    """A socketserver on 127.0.0.1 that serves each connection with ``handler`` on
    a thread of its own, each accepted socket through ``wrap`` (e.g. TLS);
    yields its port."""
    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            return (wrap(sock) if wrap else sock), addr

    with Server(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join(5)


def http_server(root: Path) -> contextlib.AbstractContextManager[int]:
    """Python's http.server on 127.0.0.1 (a plain HTTP app), serving ``root``."""
    return threaded(functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


class ProxyProcess:
    """``python -m midway ARGS`` as a child process; knows its listening port."""

    def __init__(self, *args: str, preexec: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.args += MODE.cli_args(self.args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "midway", *self.args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=preexec, env={**os.environ, **(env or {})},
        )
        self.stderr_lines: list[str] = []
        self.port = self._wait_listening()
        self._reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._reader.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr_lines.append(raw.decode(errors="replace"))

    def _wait_listening(self, timeout: float = 15.0) -> int:
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode(errors="replace")
            if not line:
                raise AssertionError(f"midway exited early: {''.join(self.stderr_lines)}")
            self.stderr_lines.append(line)
            match = re.search(r"listening on (?:unix:\S+?[,\s]|\[?[^\s\]]*\]?:(\d+))", line)
            if match:  # a unix listener has no port: 0
                return int(match.group(1) or 0)
        raise AssertionError("midway did not start listening in time")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        """Everything written to stderr so far (all of it once the process ended)."""
        if self.proc.poll() is not None:
            self._reader.join(5)
        return "".join(self.stderr_lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def proxy_process(*args: str, **kwargs: Any) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(*args, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
