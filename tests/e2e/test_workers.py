"""``--workers N`` as an operator sees it: which worker served what (log lines,
access records, connection ids unique across the workers), and workers that
drain and exit when their supervisor is killed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import midway

from ..helpers import ROOT, ProxyProcess, proxy_process, run, threaded_echo, wait_until

pytestmark = [pytest.mark.one_mode, pytest.mark.timeout(120)]

WORKER_LINE = re.compile(r"midway\[worker (\d+), pid (\d+)\] INFO default: listening on")


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A blocking echo server on threads, one per connection."""
    with threaded_echo() as port:
        yield port


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def refuses(port: int) -> bool:
    """Nothing listens: refused, or reset (a listener closed with the handshake in
    its queue resets it)."""
    try:
        connect(port).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie left for an init that reaps slowly."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


@contextlib.contextmanager
def supervised(*args: str) -> Iterator[tuple[ProxyProcess, set[int]]]:
    """midway with workers; yields it and a set of worker pids (add any a test
    learns) that are all killed at the end, whatever happened: a worker left
    serving after its supervisor would hold the test's pipes open for ever."""
    with proxy_process(*args) as proxy:
        known: set[int] = set()
        try:
            yield proxy, known
        finally:
            known |= children(proxy.pid)
            for pid in known:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def worker_pids(stderr: str) -> dict[int, int]:
    """Worker number -> pid, from the workers' own 'listening on' lines."""
    return {int(m[1]): int(m[2]) for m in WORKER_LINE.finditer(stderr)}


def test_workers_drain_and_exit_when_the_supervisor_is_killed(echo_port: int) -> None:
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--drain-timeout-s", "30") as (proxy, pids):
        assert wait_until(lambda: len(children(proxy.pid)) == 2, timeout=15)
        pids |= children(proxy.pid)
        with connect(proxy.port) as client:
            assert roundtrip(client, b"before") == b"before"
            proxy.proc.kill()  # SIGKILL: the supervisor forwards nothing
            proxy.proc.wait(5)
            # The workers notice, stop accepting at once ...
            assert wait_until(lambda: refuses(proxy.port), timeout=5), "still accepting"
            # ... and drain: the open connection still works.
            assert roundtrip(client, b"during the drain") == b"during the drain"
        # Its client gone, nothing is left to drain: both exit, long before 30 s.
        assert wait_until(lambda: all(gone(pid) for pid in pids), timeout=10), pids
        assert "the supervisor is gone: stopping" in proxy.stderr_text()


def test_each_record_and_log_line_names_its_worker_and_ids_are_unique(
        echo_port: int, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"

    def records() -> list[dict[str, object]]:
        if not access_log.exists():
            return []
        # Complete lines only: read while a worker writes, the last may be half there.
        return [json.loads(line) for line in access_log.read_text().splitlines(keepends=True)
                if line.endswith("\n")]

    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--access-log", str(access_log)) as (proxy, _):
        assert wait_until(lambda: len(worker_pids(proxy.stderr_text())) == 2, timeout=15)
        pids = worker_pids(proxy.stderr_text())
        assert len(set(pids.values())) == 2
        # The kernel spreads connections over the two workers by their addresses:
        # 40 connections all landing on one worker has odds of 2**-39.
        for i in range(40):
            with connect(proxy.port) as client:
                assert roundtrip(client, b"%d" % i) == b"%d" % i
        assert wait_until(lambda: len(records()) == 40, timeout=10)
        # A worker killed and restarted carries on with ids of its own.
        os.kill(pids[1], signal.SIGKILL)
        assert wait_until(lambda: len(worker_pids(proxy.stderr_text())) == 2
                          and pids[1] not in worker_pids(proxy.stderr_text()).values(),
                          timeout=15)
        pids_after = worker_pids(proxy.stderr_text())
        for i in range(40):
            with connect(proxy.port) as client:
                assert roundtrip(client, b"%d" % i) == b"%d" % i
        assert wait_until(lambda: len(records()) == 80, timeout=10)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
    got = records()
    ids = [r["id"] for r in got]
    assert len(set(ids)) == len(ids), sorted(ids)  # type: ignore[type-var]
    assert {r["worker"] for r in got} == {1, 2}
    for r in got:
        assert r["pid"] in (pids[r["worker"]], pids_after[r["worker"]])  # type: ignore[index]
        assert r["id"] % 2 == r["worker"] % 2  # type: ignore[operator]
    # Every line a worker wrote says which one it is; the supervisor's say so.
    for line in proxy.stderr_text().splitlines():
        if re.search(r"midway\[supervisor, pid \d+\]", line):
            continue
        if "listening on" in line or "stopping" in line or "stopped" in line:
            assert re.search(r"midway\[worker [12], pid \d+\]", line), line


def test_a_single_process_names_itself_worker_1(echo_port: int, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo_port}",
                       "--access-log", str(access_log)) as proxy:
        for _ in range(3):
            with connect(proxy.port) as client:
                assert roundtrip(client, b"x") == b"x"
        assert wait_until(lambda: access_log.exists()
                          and len(access_log.read_text().splitlines()) == 3, timeout=10)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
        assert " midway INFO " in proxy.stderr_text()  # no worker in a single process's lines
    got = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert [r["id"] for r in got] == [1, 2, 3]
    assert {(r["worker"], r["pid"]) for r in got} == {(1, proxy.pid)}



def test_workers_auto_on_one_cpu_is_a_single_process_that_nothing_can_join(
        echo_port: int) -> None:
    """README: "a single process (workers = 1) does not set SO_REUSEPORT, and
    nothing can join it".  ``--workers auto`` allowed one CPU (taskset, a
    container's cpuset) runs one process too, but set SO_REUSEPORT, so another
    program of the same user could take a share of its clients."""
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "auto",
                       preexec=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
                       ) as proxy:
        assert children(proxy.pid) == set()  # no supervisor: one process
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError) as caught:
                other.bind(("127.0.0.1", proxy.port))
            assert caught.value.errno == errno.EADDRINUSE
        with connect(proxy.port) as client:
            assert roundtrip(client, b"x") == b"x"


def test_a_library_runtime_of_a_workers_file_sets_no_reuseport(echo_port: int) -> None:
    """``midway.Runtime`` runs one process whatever ``[server] workers`` says:
    its listeners are not shared either."""
    config = midway.config_from_dict({"server": {"workers": 2}, "proxy": {"a": {
        "listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}"}}})

    async def main() -> int:
        runtime = midway.Runtime(config)
        await runtime.start()
        try:
            sock = runtime.services["a"].listeners[0].sock
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        finally:
            await runtime.shutdown(0)

    assert run(main()) == 0


def _shared_listener() -> socket.socket:
    """What another program of the same user listens with (HAProxy, nginx with
    ``reuseport``, another midway's workers): SO_REUSEPORT, which would let
    midway's workers bind beside it and take a share of its connections."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_workers_refuse_a_port_another_program_shares_with_reuseport(echo_port: int) -> None:
    """At start: exit 1 naming the address in use, as a single process does, not
    two programs silently splitting one port's clients."""
    other = _shared_listener()
    port = other.getsockname()[1]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "midway", f"127.0.0.1:{port}", f"127.0.0.1:{echo_port}",
             "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        other.close()
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in done.stderr


def test_a_reload_refuses_a_port_another_program_shares_with_reuseport(
        echo_port: int, tmp_path: Path) -> None:
    """At reload: the new listener is refused and named, the rest runs on."""
    other = _shared_listener()
    port = other.getsockname()[1]
    config = tmp_path / "midway.toml"
    proxy = f'[proxy.default]\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:{echo_port}"]\n'
    config.write_text(f"[server]\nworkers = 2\n{proxy}")
    try:
        with supervised("--config", str(config)) as (midway, _):
            assert wait_until(lambda: "started 2 workers" in midway.stderr_text(), timeout=30)
            config.write_text(f'[server]\nworkers = 2\n{proxy}[proxy.taken]\n'
                              f'listen = "127.0.0.1:{port}"\nupstreams = ["127.0.0.1:{echo_port}"]\n')
            midway.signal(signal.SIGHUP)
            assert wait_until(lambda: "reload: " in midway.stderr_text()
                              and "SIGHUP" in midway.stderr_text(), timeout=30)
            assert wait_until(lambda: f"127.0.0.1:{port}: address already in use; still "
                              "running the previous configuration" in midway.stderr_text(),
                              timeout=10), midway.stderr_text()
            with connect(midway.port) as client:
                assert roundtrip(client, b"still") == b"still"
    finally:
        other.close()
