"""The ``midway_proxy`` fixture, as a user meets it: pytest finds it through the
``pytest11`` entry point of the installed package, and the README's example test
passes with it."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import needs

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Fault injection"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Fault injection section has no python example"
    return match.group(1)


def run_pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_example.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.fixture(autouse=True)
def installed() -> None:
    plugins = importlib.metadata.entry_points(group="pytest11")
    if not any(ep.value == "midway.pytest_plugin" for ep in plugins):
        pytest.skip(needs("midway installed, for its pytest11 entry point", pip="-e ."))


def test_readme_example_passes(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, readme_example())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_readme_example_passes_from_a_checkout(tmp_path: Path) -> None:
    """docs/faults.md: without installing, the checkout on PYTHONPATH and ``-p
    midway.pytest_plugin`` (the installed entry point turned off, as it is absent
    there)."""
    (tmp_path / "test_example.py").write_text(readme_example())
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:midway",
         "-p", "midway.pytest_plugin", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_fixture_stops_its_proxies_at_teardown(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, """
import socket

import pytest

seen = []


def test_one(midway_proxy):
    proxy = midway_proxy("127.0.0.1:1")
    other = midway_proxy(["127.0.0.1:1", "127.0.0.1:2"], listen="127.0.0.1:0",
                         idle_timeout_s=5)
    seen.extend([proxy.address, other.address])
    assert proxy.port != other.port


def test_two():
    for address in seen:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2)
""")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


MISUSES = """
import asyncio
import socket

import midway


def test_unknown_type(midway_proxy):
    midway_proxy("127.0.0.1:9").add_toxic("latncy", latency=100)


def test_unknown_attribute(midway_proxy):
    midway_proxy("127.0.0.1:9").add_toxic("latency", latence=100)


def test_bad_update(midway_proxy):
    midway_proxy("127.0.0.1:9").add_toxic("latency", latency=1).update(rate=3)


def test_bad_upstream(midway_proxy):
    midway_proxy("nonsense")


def test_no_such_connection(midway_proxy):
    midway_proxy("127.0.0.1:9").add_connection_toxic(12345, "latency", latency=100)


def test_async_api():
    async def main():
        async with midway.Proxy("127.0.0.1:0", "127.0.0.1:9") as proxy:
            proxy.add_toxic("latency", jitter=-1)
    asyncio.run(main())


def test_async_port_taken():
    taken = socket.create_server(("127.0.0.1", 0))
    async def main():
        async with midway.Proxy(f"127.0.0.1:{taken.getsockname()[1]}", "127.0.0.1:9"):
            pass
    asyncio.run(main())
"""


def test_a_misuse_is_reported_at_the_users_line(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, MISUSES)
    out = result.stdout
    assert "7 failed" in out, out
    for message in ("ConnectionNotFound: connection not found: 12345 is not an open "
                    "connection of proxy 'default'",
                    "type: unknown toxic type 'latncy' (known: bandwidth,",
                    "attributes.latence: unknown attribute of the latency toxic",
                    "attributes.rate: unknown attribute of the latency toxic",
                    "upstreams[0]: 'nonsense': expected host:port",
                    "attributes.jitter: must not be negative",
                    "ListenError: proxy default: cannot listen on 127.0.0.1:"):
        assert message in out
    # no frame shown is midway's, nor the thread hand-over of BackgroundProxy
    # (concurrent.futures); the async test's own asyncio.run frames are the user's
    frames = re.findall(r"^(\S+\.py):\d+: ", out, re.M)
    assert frames.count("test_example.py") == 9, out  # one per test, two with a main()
    assert not [f for f in frames if "/midway/" in f or "concurrent" in f], out
