"""midway replay end to end with real tools: a curl session against a real HTTP
server recorded through ``midway --pcap``, the server stopped, and the same curl
against ``midway replay`` gets byte-identical output (headers included); a
redis-benchmark session recorded and replayed completes (strictly without
``-r``; with random keys only with ``--loose``); the ``midway_replay`` fixture."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .. import helpers
from ..helpers import ROOT, free_port, proxy_process, wait_until

# Subprocesses on their own loops: once, not once per mode.
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.one_mode,
    pytest.mark.skipif(not shutil.which("curl"), reason=helpers.needs("curl", apt="curl")),
]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextmanager
def background(*args: str, port: int) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:  # leaving it closes the pipe
        try:
            assert wait_until(lambda: listening(port), timeout=15), args
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def replaying(capture: Path, port: int, *options: str) -> Iterator[list[str]]:
    """``python -m midway replay``; yields its log lines, complete once stopped.
    Ready when it logs that it listens (a probe connection would play the first
    recorded connection)."""
    proc = subprocess.Popen([sys.executable, "-m", "midway", "replay", str(capture), "--listen",
                             f"127.0.0.1:{port}", "--wait-s", "5", *options],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    log: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any("listening on" in x for x in log):
            line = proc.stderr.readline()
            assert line, f"midway replay exited: {log}"
            log.append(line.rstrip("\n"))
        yield log
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        log.extend(err.splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def record(capture: Path, upstream: int, listen: int) -> Iterator[None]:
    with proxy_process(f"127.0.0.1:{listen}", f"127.0.0.1:{upstream}", "--pcap",
                       str(capture)) as proxy:
        yield
        proxy.signal()
        assert proxy.wait() == 0  # a clean stop: the capture is complete


def curl(port: int, path: str) -> bytes:
    return subprocess.run(["curl", "-si", "--max-time", "20", f"http://127.0.0.1:{port}{path}"],
                          capture_output=True, timeout=30, check=True).stdout


def test_a_recorded_curl_session_replays_byte_identical(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello, replay\n")
    (site / "blob.bin").write_bytes(bytes(range(256)) * 2000)  # 512 KB: many segments
    capture, http_port, port = tmp_path / "session.pcap", free_port(), free_port()
    paths = ["/hello.txt", "/blob.bin", "/missing"]
    with background(sys.executable, "-m", "http.server", str(http_port), "--bind",
                    "127.0.0.1", "--directory", str(site), port=http_port):
        recorded = []
        for _ in record(capture, http_port, port):
            recorded = [curl(port, p) for p in paths]
    assert not listening(http_port)  # the server is gone
    assert recorded[0].endswith(b"hello, replay\n") and b" 404 " in recorded[2]

    # The replay listens where the proxy did: curl's Host header names that port,
    # and the request must match the recording byte for byte.
    with replaying(capture, port) as log:
        replayed = [curl(port, p) for p in paths]
    assert replayed == recorded
    assert not [line for line in log if "WARNING" in line], log
    assert any("stopped (3 clients, 3 played to the end, 0 failed)" in line for line in log), log

    # Another request than the recording's: logged with a hex diff, closed.
    with replaying(capture, port) as log:
        other = subprocess.run(["curl", "-si", "--max-time", "20",
                                f"http://127.0.0.1:{port}/hellO.txt"],
                               capture_output=True, timeout=30)
    assert other.stdout == b""
    text = "\n".join(log)
    assert "differ from the recording at byte" in text, text
    assert re.search(r"\|GET /hello\.txt", text) and re.search(r"\|GET /hellO\.txt", text)


needs_redis = pytest.mark.skipif(
    not shutil.which("redis-server") or not shutil.which("redis-benchmark"),
    reason=helpers.needs("redis-server and redis-benchmark", apt="redis-server"))

BENCHMARK = ["-n", "200", "-c", "1", "-t", "set,get", "-P", "1", "-q"]
"""Small and sequential: one client, no pipelining, so that the replay's
connections come in the recording's order (redis-benchmark's configuration
fetch, then one connection per test)."""


def benchmark(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port),
                           *BENCHMARK, *extra], capture_output=True, text=True, timeout=60)


def completed(run: subprocess.CompletedProcess[str]) -> bool:
    # -q prints one "NAME: N requests per second" line per test once it is done.
    done = re.findall(r"(SET|GET): [0-9.]+ requests per second", run.stdout)
    return run.returncode == 0 and done == ["SET", "GET"]


@needs_redis
@pytest.mark.parametrize("random_keys", [False, True], ids=["fixed-keys", "random-keys"])
def test_a_recorded_redis_benchmark_replays_to_completion(tmp_path: Path,
                                                          random_keys: bool) -> None:
    # Without -r every key is the literal "key:__rand_int__" and the values are
    # the same from run to run, so the replay can check content.  With -r the
    # keys are random (12 digits, so the same length): only --loose replays that.
    extra = ("-r", "100000") if random_keys else ()
    capture, redis_port, port = tmp_path / "bench.pcap", free_port(), free_port()
    with background("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                    port=redis_port):
        for _ in record(capture, redis_port, port):
            assert completed(benchmark(port, *extra))
    with replaying(capture, port, *(["--loose"] if random_keys else [])) as log:
        run = benchmark(port, *extra)
    assert completed(run), (run.stdout, run.stderr, log)
    assert any("3 played to the end, 0 failed" in line for line in log), log
    if random_keys:  # and strictly, the random keys do not match
        with replaying(capture, port) as log:
            benchmark(port, *extra)
        assert any("differ from the recording" in line for line in log), log


def plugin_installed() -> bool:
    return any(ep.value == "midway.pytest_plugin"
               for ep in importlib.metadata.entry_points(group="pytest11"))


@pytest.mark.skipif(not plugin_installed(), reason=helpers.needs("midway installed (its pytest plugin)", pip="-e ."))
def test_the_midway_replay_fixture(tmp_path: Path, midway_replay: object) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "a.txt").write_text("fixture\n")
    capture, http_port, port = tmp_path / "s.pcap", free_port(), free_port()
    with background(sys.executable, "-m", "http.server", str(http_port), "--bind",
                    "127.0.0.1", "--directory", str(site), port=http_port):
        for _ in record(capture, http_port, port):
            recorded = curl(port, "/a.txt")
    started = time.monotonic()
    replay = midway_replay(str(capture), f"127.0.0.1:{port}")  # type: ignore[operator]
    assert curl(replay.port, "/a.txt") == recorded
    assert wait_until(lambda: replay.completed == 1, timeout=5)
    assert replay.failures == [] and time.monotonic() - started < 10
