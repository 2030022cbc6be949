"""midway's own fault features end to end, over real loopback sockets: a Redis
transaction reset exactly at EXEC (redis-cli through midway, conditions.match),
and seeded jitter whose delays repeat from run to run (two midway processes with
the same --seed)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from midway.chain.toxics import make_toxic

from .. import helpers
from ..helpers import free_port, proxy_process, read_exactly, run, serve, wait_until

# A toxic always takes the buffered path and these tests run subprocesses: once,
# not once per mode.
pytestmark = [pytest.mark.timeout(120), pytest.mark.one_mode]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"),
                    reason=helpers.needs("redis-server and redis-cli", apt="redis-server"))
def test_redis_cli_sees_the_reset_exactly_at_exec(tmp_path: Path) -> None:
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _listening(port), timeout=10)
        direct = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
        with proxy_process("127.0.0.1:0", f"127.0.0.1:{port}",
                           "--toxic", r"reset_peer:stream=upstream,match=EXEC\r\n") as proxy:
            session = subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(proxy.port)],
                input="SET before 1\nMULTI\nSET inside 1\nINCR counter\nEXEC\nSET after 1\n",
                capture_output=True, text=True, timeout=20)
        replies = session.stdout.split()
        # Everything before EXEC reached Redis and was answered ...
        assert replies[:4] == ["OK", "OK", "QUEUED", "QUEUED"], session
        assert "reset" in (session.stdout + session.stderr).lower(), session
        # ... and EXEC did not: the transaction was discarded with the connection.
        def get(key: str) -> str:
            return subprocess.run([*direct, "GET", key], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        assert get("before") == "1"
        assert get("inside") == ""
        assert get("counter") == ""
    finally:
        redis.terminate()
        redis.wait(10)


LATENCY_MS, JITTER_MS = 60, 60
PINGS, CONNECTIONS = 8, 2
SLACK_S = 0.035
"""Real-time overhead allowed above a scheduled delay on a loaded 2-core machine
(the schedule's jitter spans 120 ms, so a different seed is told apart)."""


def expected_delays(seed: int) -> list[list[float]]:
    """The delays the seeded latency toxic schedules, computed from the seed alone."""
    toxic = make_toxic("latency", attributes={"latency": LATENCY_MS, "jitter": JITTER_MS},
                       seed=seed)
    schedule = []
    for sequence in range(1, CONNECTIONS + 1):
        rng = toxic.connection_rng(sequence)
        rng.random()  # the toxicity draw
        schedule.append([(LATENCY_MS + rng.randrange(2 * JITTER_MS) - JITTER_MS) / 1000
                         for _ in range(PINGS)])
    return schedule


def measured_delays(seed: int) -> list[list[float]]:
    """Round trips of PINGS one-chunk pings on CONNECTIONS connections in turn,
    through a midway process started with --seed."""
    async def main() -> list[list[float]]:
        async with serve() as upstream:
            with proxy_process("127.0.0.1:0", f"127.0.0.1:{upstream}", "--seed", str(seed),
                               "--toxic", f"latency:latency={LATENCY_MS},jitter={JITTER_MS}") as proxy:
                rounds = []
                for _ in range(CONNECTIONS):
                    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                    rtts = []
                    for _ in range(PINGS):
                        started = time.monotonic()
                        writer.write(b"ping")
                        await writer.drain()
                        assert await read_exactly(reader, 4) == b"ping"
                        rtts.append(time.monotonic() - started)
                    writer.close()
                    rounds.append(rtts)
                return rounds

    return run(main())


def close_to(measured: list[list[float]], schedule: list[list[float]]) -> bool:
    return all(s - 0.002 <= m <= s + SLACK_S
               for ms, ss in zip(measured, schedule, strict=True)
               for m, s in zip(ms, ss, strict=True))


def test_two_runs_with_the_same_seed_give_identical_delay_sequences() -> None:
    schedule = expected_delays(42)
    first, second = measured_delays(42), measured_delays(42)
    assert close_to(first, schedule), (first, schedule)
    assert close_to(second, schedule), (second, schedule)
    assert not close_to(first, expected_delays(43))  # the seed is what decides
