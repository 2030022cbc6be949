"""The proxy as a separate process: signals and draining, memory under a flood,
descriptor exhaustion, and a real protocol peer (Redis)."""

from __future__ import annotations

import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from midway.core.relay import FLOWING_S

from .. import helpers
from ..helpers import flooding_upstream, free_port, proxy_process, wait_until


class EchoServer:
    """A threaded blocking echo server (independent of any event loop)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo():  # type: ignore[no-untyped-def]
    server = EchoServer()
    yield server
    server.close()


def _roundtrip(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_sigterm_drains_open_connections_then_exits_zero(echo: EchoServer) -> None:
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo.port}", "--drain-timeout-s", "10") as proxy:
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        held.sendall(b"before")
        assert held.recv(100) == b"before"
        proxy.signal(signal.SIGTERM)
        # New connections are refused once it stops listening ...
        assert wait_until(lambda: _refused(proxy.port), timeout=5)
        # ... while the open one keeps working.
        held.sendall(b"during drain")
        assert held.recv(100) == b"during drain"
        assert proxy.proc.poll() is None
        held.close()
        assert proxy.wait(timeout=5) == 0
        assert "Traceback" not in proxy.stderr_text()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_drain_timeout_closes_lingering_connections(echo: EchoServer) -> None:
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo.port}", "--drain-timeout-s", "0.5") as proxy:
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        time.sleep(FLOWING_S + 0.1)  # idle, everything delivered: a FIN (a cut transfer: reset)
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(timeout=10) == 0
        assert time.monotonic() - start < 5
        assert held.recv(1) == b""  # closed by the proxy
        held.close()


def test_second_signal_exits_at_once(echo: EchoServer) -> None:
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo.port}", "--drain-timeout-s", "60") as proxy:
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        proxy.signal(signal.SIGINT)
        time.sleep(0.3)
        assert proxy.proc.poll() is None, "still draining after the first signal"
        start = time.monotonic()
        proxy.signal(signal.SIGINT)
        assert proxy.wait(timeout=5) == 0
        assert time.monotonic() - start < 2
        held.close()


def test_slow_reader_keeps_proxy_memory_bounded() -> None:
    """The upstream floods; the client does not read.  The proxy must not buffer the
    flood: its memory stays flat and the upstream is slowed down by TCP."""
    with flooding_upstream() as (port, sent), \
            proxy_process("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
        base = proxy.rss_kib()
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(2.0)
        stalled_at = sent[0]
        time.sleep(1.0)
        grown = proxy.rss_kib() - base
        # Only kernel socket buffers are in flight: a few MiB at most, not the flood.
        assert sent[0] - stalled_at < 1 << 20, "the upstream was not slowed down"
        assert sent[0] < 64 << 20
        assert grown < 8 * 1024, f"proxy RSS grew by {grown} KiB"
        # Reading again drains it all, in order.
        client.settimeout(5)
        got = 0
        while got < stalled_at // 2:
            data = client.recv(1 << 20)
            assert data and set(data) == {ord("x")}
            got += len(data)
        client.close()


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def _limited_config(tmp_path: Path, echo_port: int, server_limit: int) -> Path:
    """A file with ``[server] max_connections`` and one proxy to the echo server,
    on the data path of the test's mode."""
    config = tmp_path / "midway.toml"
    config.write_text(f"""
[server]
max_connections = {server_limit}
[proxy.storm]
listen = "127.0.0.1:0"
upstreams = ["127.0.0.1:{echo_port}"]
backlog = 512
splice = {"true" if helpers.MODE.path == "splice" else "false"}
""")
    return config


@pytest.mark.parametrize("server_limit", [0, 1000], ids=["auto-limit", "limit-above-fds"])
def test_descriptor_exhaustion_neither_kills_nor_spins(echo: EchoServer, tmp_path,  # type: ignore[no-untyped-def]
                                                      server_limit: int) -> None:
    """With 64 descriptors, a storm of 150 clients: with the automatic limit the
    proxy stops accepting before running out; with a limit above what descriptors
    allow it hits EMFILE, backs off and logs.  Either way it neither dies nor spins,
    and serves again once the storm is over."""
    config = _limited_config(tmp_path, echo.port, server_limit)
    with proxy_process("--config", str(config), preexec=_low_nofile) as proxy:
        storm = _storm(proxy.port)
        time.sleep(0.5)
        cpu_before = proxy.cpu_seconds()
        time.sleep(1.5)
        cpu_used = proxy.cpu_seconds() - cpu_before
        assert proxy.proc.poll() is None, "the proxy died"
        assert cpu_used < 0.5, f"the proxy spun: {cpu_used:.2f} CPU-s in 1.5 s"
        for s in storm:
            s.close()
        # Once the storm is over it serves again.
        assert wait_until(lambda: _try_roundtrip(proxy.port), timeout=10)
        if server_limit:
            assert "too many open files" in proxy.stderr_text()
            # ... which the start foretold: the hard limit of 64 cannot hold 1000.
            assert "server.max_connections = 1000 needs about 2064 open files" \
                in proxy.stderr_text()


def _low_soft_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))


@pytest.mark.one_mode
def test_a_configured_limit_raises_the_soft_descriptor_limit(echo: EchoServer,
                                                             tmp_path: Path) -> None:
    """``max_connections = 200`` under a soft open-file limit of 64 (hard 4096,
    as a shell's ``ulimit -Sn 64`` leaves it): midway raises the soft limit as
    the automatic limit does, so 150 clients held open at once are each served,
    none closed for want of a descriptor."""
    config = _limited_config(tmp_path, echo.port, 200)
    with proxy_process("--config", str(config), preexec=_low_soft_nofile) as proxy:
        clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
                   for _ in range(150)]
        try:
            for i, client in enumerate(clients):
                client.sendall(b"%03d" % i)
            answers = [_read(client, 3) for client in clients]
        finally:
            for client in clients:
                client.close()
        log = proxy.stderr_text()
    assert answers == [b"%03d" % i for i in range(150)], log
    assert "too many open files" not in log, log


def _read(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n and (chunk := sock.recv(n - len(got))):
        got += chunk
    return got


def _storm(port: int, clients: int = 150) -> list[socket.socket]:
    """Up to ``clients`` connections held open (far more than 64 descriptors allow),
    until one cannot be made."""
    storm = []
    for _ in range(clients):
        try:
            storm.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            break
    return storm


@pytest.mark.one_mode
def test_running_out_of_descriptors_does_not_eject_the_upstream(echo: EchoServer,
                                                                tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Descriptors run out while dialling the upstream (a limit above what they
    allow): that is midway's shortage, not the upstream's failure, so passive
    health does not take the upstream out, and the first client after the storm
    is served at once (not ``no_upstream`` for the 10 s of an ejection)."""
    config = _limited_config(tmp_path, echo.port, 1000)
    with proxy_process("--config", str(config), preexec=_low_nofile) as proxy:
        storm = _storm(proxy.port)
        assert wait_until(lambda: "too many open files" in proxy.stderr_text(), timeout=10), \
            proxy.stderr_text()
        for s in storm:
            s.close()
        time.sleep(0.5)  # the storm's closes are handled
        served = wait_until(lambda: _try_roundtrip(proxy.port), timeout=3)
        log = proxy.stderr_text()
    assert served, log
    assert " is down" not in log and "no upstream is up" not in log, log


def _try_roundtrip(port: int) -> bool:
    try:
        return _roundtrip(port, b"again", timeout=1) == b"again"
    except OSError:
        return False


@pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-benchmark"),
                    reason=helpers.needs("redis-server and redis-benchmark",
                                               apt="redis-server"))
def test_redis_through_the_proxy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _try_connect(port), timeout=10)
        with proxy_process("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(proxy.port)]
            big = "v" * 1_000_000
            subprocess.run([*cli, "-x", "SET", "greeting"], input=big, check=True, timeout=20,
                           capture_output=True, text=True)
            out = subprocess.run([*cli, "GET", "greeting"], check=True, timeout=20,
                                 capture_output=True, text=True).stdout.strip()
            assert out == big
            bench = subprocess.run(
                ["redis-benchmark", "-h", "127.0.0.1", "-p", str(proxy.port), "-n", "20000",
                 "-c", "50", "-P", "4", "-t", "set,get,lpush,lpop", "-q"],
                check=True, timeout=120, capture_output=True, text=True)
            assert bench.stdout.count("requests per second") == 4, bench.stdout
            assert "error" not in bench.stdout.lower() + bench.stderr.lower()
    finally:
        redis.terminate()
        redis.wait(10)


def _try_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
