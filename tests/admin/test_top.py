"""``midway top`` against a real midway: under tmux (a real terminal) it shows
the proxy and the connections line, and ``q`` leaves the terminal as it was;
with its output not a terminal it prints the table once.

With ``MIDWAY_SCREENSHOTS=DIR`` the tmux test saves the screen as DIR/top.png
(the README's picture), drawn by headless Chromium."""

from __future__ import annotations

import html
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers import ROOT, wait_until
from .conftest import EchoServer
from .test_ui import Midway, needs, start_midway, webdriver

pytestmark = pytest.mark.timeout(60)

TMUX = shutil.which("tmux")


@pytest.fixture
def midway(tmp_path: Path, echo: EchoServer) -> Iterator[Midway]:
    running = start_midway(tmp_path, echo)
    yield running
    running.process.stop()


def render_terminal(text: str, path: Path) -> None:
    """A captured terminal screen as a PNG: the text in a dark <pre>, shot by
    headless Chromium (no image library needed)."""
    assert webdriver is not None, "rendering the screenshot needs selenium and Chromium"
    page = path.with_suffix(".html")
    page.write_text("<body style='margin:0;background:#111'><pre style='margin:0;padding:8px;"
                    "color:#ddd;font:13px DejaVu Sans Mono,monospace'>"
                    + html.escape(text.rstrip()) + "</pre></body>")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1150,400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options)
    try:
        driver.get(page.as_uri())
        driver.find_element("tag name", "pre").screenshot(str(path))
    finally:
        driver.quit()
        page.unlink()


class Tmux:
    """A tmux server of its own (``-L``), so nothing else's sessions are touched."""

    def __init__(self) -> None:
        self.socket = f"midway-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        return subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    yield server
    subprocess.run([TMUX, "-L", server.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.skipif(not TMUX, reason=needs("tmux", apt="tmux"))
def test_top_in_a_terminal_shows_proxies_and_quits_cleanly(midway: Midway, tmux: Tmux) -> None:
    # LINES and COLUMNS unset: curses would take them over the terminal's size.
    command = (f"cd {ROOT} && unset LINES COLUMNS && PYTHONPATH={ROOT} {sys.executable} -m midway top "
               f"--admin 127.0.0.1:{midway.admin.port}; echo top-exited-$?; sleep 60")
    tmux("new-session", "-d", "-s", "top", "-x", "132", "-y", "24", command)
    with socket.create_connection(("127.0.0.1", midway.port("web")), timeout=5) as sock:
        sock.sendall(b"hello")
        assert sock.recv(10) == b"hello"
        assert wait_until(lambda: "PROXY" in tmux.screen(), 10), tmux.screen()
        screen = tmux.screen()
        lines = screen.splitlines()
        assert lines[0].startswith("midway top - 127.0.0.1:")
        web = next(line for line in lines if line.startswith("web "))
        assert f"127.0.0.1:{midway.port('web')}" in web
        # One connection open on web (the OPEN column).
        assert wait_until(lambda: next(line for line in tmux.screen().splitlines()
                                       if line.startswith("web ")).split()[3] == "1", 5)
        if midway.admin.get("/connections").status == 404:
            assert "connections: not available" in screen
        else:
            client = f"127.0.0.1:{sock.getsockname()[1]}"
            assert wait_until(lambda: client in tmux.screen(), 5), tmux.screen()
        if os.environ.get("MIDWAY_SCREENSHOTS"):
            render_terminal(tmux.screen(), Path(os.environ["MIDWAY_SCREENSHOTS"], "top.png"))
        tmux("send-keys", "-t", "top", "q")
        # The shell prints after top: curses left the alternate screen, so the
        # shell's line is on the restored normal screen and top's table is gone.
        assert wait_until(lambda: "top-exited-0" in tmux.screen(), 5), tmux.screen()
        assert "PROXY" not in tmux.screen()


def test_top_without_a_terminal_prints_the_table_once(midway: Midway) -> None:
    result = subprocess.run([sys.executable, "-m", "midway", "top", "--admin",
                             f"127.0.0.1:{midway.admin.port}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["PROXY", "LISTEN", "UPSTREAM"]
    proxies = [line for line in lines[1:] if line and not line.startswith(" ")]
    assert [line.split()[0] for line in proxies[:2]] == ["cache", "web"]
    assert f"127.0.0.1:{midway.port('web')}" in proxies[1]
    # Each proxy's upstreams, indented under it.
    assert any(line.startswith("  ") and ("up " in line or "DOWN" in line) for line in lines)
    assert "connections" in result.stdout.lower()


def test_top_says_when_midway_does_not_answer(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "midway", "top", "--admin",
                                 f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True,
                                text=True, timeout=20)
    assert result.returncode == 1
    assert f"midway at 127.0.0.1:{port} does not answer" in result.stderr
    assert "Traceback" not in result.stderr
    bad = subprocess.run([sys.executable, "-m", "midway", "top", "--admin", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=20)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
