"""``midway top`` against a real midway: under tmux (a real terminal) it shows
the proxy and the connections line, and ``q`` leaves the terminal as it was; the
arrow keys and ``k`` close exactly the selected connection; with its output not
a terminal it prints the table once.  Then what it draws from given API answers
(the selection follows its connection, the sort by id, the upstreams' health), no
midway needed.

With ``MIDWAY_SCREENSHOTS=DIR`` the tmux test saves the screen as DIR/top.png
(the README's picture), drawn by headless Chromium."""

from __future__ import annotations

import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from midway.top import Snapshot, View, render_lines

from ..helpers import ROOT, wait_until
from .conftest import EchoServer
from .screenshots import save_small_png
from .test_ui import Midway, needs, start_midway, webdriver

pytestmark = pytest.mark.timeout(60)

TMUX = shutil.which("tmux")


@pytest.fixture
def midway(tmp_path: Path, echo: EchoServer) -> Iterator[Midway]:
    running = start_midway(tmp_path, echo)
    yield running
    running.process.stop()


def render_terminal(text: str, path: Path) -> None:
    """A captured terminal screen as a small PNG: the text in a dark <pre>, shot
    by headless Chromium (no image library needed)."""
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
        save_small_png(driver.find_element("tag name", "pre").screenshot_as_png, path)
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

    def selected(self) -> int | None:
        """The id of the connection top shows selected (its row in reverse video)."""
        for line in self("capture-pane", "-p", "-e", "-t", "top").splitlines():
            attributes = re.match(r"\x1b\[([\d;]*)m", line)
            cells = re.sub(r"\x1b\[[\d;]*m", "", line).split()
            if attributes and "7" in attributes.group(1).split(";") and cells \
                    and cells[0].isdigit():
                return int(cells[0])
        return None


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    yield server
    subprocess.run([TMUX, "-L", server.socket, "kill-server"], capture_output=True, timeout=10)


def start_top(tmux: Tmux, midway: Midway) -> None:
    """``midway top`` in a 132x24 tmux window; the shell says how it exited."""
    # LINES and COLUMNS unset: curses would take them over the terminal's size.
    command = (f"cd {ROOT} && unset LINES COLUMNS && PYTHONPATH={ROOT} {sys.executable} -m midway top "
               f"--admin 127.0.0.1:{midway.admin.port}; echo top-exited-$?; sleep 60")
    tmux("new-session", "-d", "-s", "top", "-x", "132", "-y", "24", command)


@pytest.mark.skipif(not TMUX, reason=needs("tmux", apt="tmux"))
def test_top_in_a_terminal_shows_proxies_and_quits_cleanly(midway: Midway, tmux: Tmux) -> None:
    start_top(tmux, midway)
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
            render_terminal(tmux.screen(),
                            Path(os.environ["MIDWAY_SCREENSHOTS"], "top.png").resolve())
        tmux("send-keys", "-t", "top", "q")
        # The shell prints after top: curses left the alternate screen, so the
        # shell's line is on the restored normal screen and top's table is gone.
        assert wait_until(lambda: "top-exited-0" in tmux.screen(), 5), tmux.screen()
        assert "PROXY" not in tmux.screen()


@pytest.mark.skipif(not TMUX, reason=needs("tmux", apt="tmux"))
def test_top_kill_key_closes_the_selected_connection(midway: Midway, tmux: Tmux) -> None:
    assert midway.admin.get("/connections").status == 200
    socks = [socket.create_connection(("127.0.0.1", midway.port("web")), timeout=5)
             for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(b"hi")
            assert sock.recv(10) == b"hi"
        clients = {f"127.0.0.1:{sock.getsockname()[1]}": sock for sock in socks}
        listed = midway.admin.get("/connections").json
        assert sorted(c["client"] for c in listed) == sorted(clients)
        sock_of = {c["id"]: clients[c["client"]] for c in listed}
        client_of = {c["id"]: c["client"] for c in listed}

        start_top(tmux, midway)
        assert wait_until(lambda: all(client in tmux.screen() for client in clients), 10), \
            tmux.screen()
        assert wait_until(lambda: tmux.selected() is not None, 5), tmux.screen()
        first = tmux.selected()
        tmux("send-keys", "-t", "top", "Down")
        assert wait_until(lambda: tmux.selected() not in (None, first), 5), tmux.screen()
        victim_id = tmux.selected()
        assert victim_id in sock_of
        tmux("send-keys", "-t", "top", "k")

        victim = sock_of.pop(victim_id)
        try:  # the client sees its connection closed (the socket's timeout bounds it)
            assert victim.recv(10) == b""
        except ConnectionResetError:
            pass
        for sock in sock_of.values():  # its neighbours keep flowing
            sock.sendall(b"still")
            assert sock.recv(10) == b"still"
        assert wait_until(lambda: victim_id not in
                          [c["id"] for c in midway.admin.get("/connections").json], 5)
        assert wait_until(lambda: f"killed connection {victim_id}" in tmux.screen(), 5), \
            tmux.screen()
        assert wait_until(lambda: client_of[victim_id] not in tmux.screen(), 5), tmux.screen()
        screen = tmux.screen()
        assert all(client_of[other] in screen for other in sock_of), screen
        tmux("send-keys", "-t", "top", "q")
        assert wait_until(lambda: "top-exited-0" in tmux.screen(), 5), tmux.screen()
    finally:
        for sock in socks:
            sock.close()


def test_top_without_a_terminal_prints_the_table_once(midway: Midway, echo: EchoServer) -> None:
    result = subprocess.run([sys.executable, "-m", "midway", "top", "--admin",
                             f"127.0.0.1:{midway.admin.port}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["PROXY", "LISTEN", "UPSTREAM"]
    proxies = [line for line in lines[1:] if line and not line.startswith(" ")]
    assert [line.split()[0] for line in proxies[:2]] == ["cache", "web"]
    assert f"127.0.0.1:{midway.port('web')}" in proxies[1]
    # Each proxy's upstreams, indented under it: the echo server is up (no
    # health checks configured, so no check yet).
    upstreams = [line.split() for line in lines if line.startswith("  ")]
    assert upstreams[:2] == [["up", echo.address, "weight", "1", "active", "0",
                              "last", "check", "none"]] * 2
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


def test_top_says_whether_its_token_is_missing_or_refused(tmp_path: Path,
                                                          echo: EchoServer) -> None:
    running = start_midway(tmp_path, echo, extra='admin_token = "s3cret"')
    right_file, wrong_file = tmp_path / "right", tmp_path / "wrong"
    right_file.write_text("s3cret\n")
    wrong_file.write_text("wrong\n")
    try:
        def top(token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if k != "MIDWAY_ADMIN_TOKEN"}
            if token is not None:
                env["MIDWAY_ADMIN_TOKEN"] = token
            return subprocess.run([sys.executable, "-m", "midway", "top", "--admin",
                                   f"127.0.0.1:{running.admin.port}", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=20)
        missing, wrong, right = top(None), top("wrong"), top("s3cret")
        # The file, as for midway connections, and over the environment's token.
        right_by_file = top("wrong", "--admin-token-file", str(right_file))
        wrong_by_file = top("s3cret", "--admin-token-file", str(wrong_file))
    finally:
        running.process.stop()
    assert missing.returncode == 1
    assert missing.stderr.strip() == ("midway top: the admin API needs a token: give "
                                      "--admin-token-file PATH or set MIDWAY_ADMIN_TOKEN")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == ("midway top: the admin API refused the token of "
                                    "MIDWAY_ADMIN_TOKEN")
    assert wrong_by_file.returncode == 1
    assert wrong_by_file.stderr.strip() == ("midway top: the admin API refused the token of "
                                            f"--admin-token-file {wrong_file}")
    for result in right, right_by_file:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("PROXY")


# -- what top draws from given answers (no midway) ----------------------------

def snapshot(connections: list[dict[str, object]], upstreams: list[dict[str, object]] | None
             = None) -> Snapshot:
    proxy = {"listen": "127.0.0.1:6380", "upstream": "127.0.0.1:6379", "enabled": True,
             "upstreams": upstreams or []}
    return Snapshot(0.0, {"web": proxy}, [], connections)


def connection(id: int, age_s: float, bytes_up: int = 0) -> dict[str, object]:
    return {"id": id, "proxy": "web", "client": f"127.0.0.1:{40000 + id}",
            "upstream": "127.0.0.1:6379", "age_s": age_s, "bytes_up": bytes_up,
            "bytes_down": 0, "state": "open", "path": "copy"}


def ids_shown(lines: list[str]) -> list[int]:
    start = next(i for i, line in enumerate(lines) if line.startswith("ID ")) + 1
    return [int(line.split()[0]) for line in lines[start:]]


def test_the_selection_follows_its_connection_when_rows_move() -> None:
    view = View(sort="bytes_up")
    render_lines(snapshot([connection(1, 3, 300), connection(2, 2, 200),
                           connection(3, 1, 100)]), None, view)
    view.move(1)
    assert view.shown[view.selected]["id"] == 2
    # The next refresh: 3 got busier and 1 closed; k must still kill 2.
    lines = render_lines(snapshot([connection(2, 2, 200), connection(3, 1, 900)]), None, view)
    assert ids_shown(lines) == [3, 2]
    assert view.shown[view.selected]["id"] == 2
    # 2 gone (killed): the row now at its place is selected, and stays so.
    render_lines(snapshot([connection(3, 1, 900), connection(4, 0, 0)]), None, view)
    assert view.shown[view.selected]["id"] == 4
    render_lines(snapshot([connection(5, 0, 950), connection(3, 1, 900),
                           connection(4, 0, 0)]), None, view)
    assert view.shown[view.selected]["id"] == 4
    view.move(-5)
    assert view.shown[view.selected]["id"] == 5
    render_lines(snapshot([]), None, view)
    assert view.shown == [] and view.selected == 0


def test_connections_sort_by_id_as_numbers() -> None:
    view = View(sort="id")
    lines = render_lines(snapshot([connection(10, 1), connection(2, 1), connection(1, 1)]),
                         None, view)
    assert ids_shown(lines) == [1, 2, 10]
    view.sort = "age_s"  # the oldest first
    lines = render_lines(snapshot([connection(10, 1), connection(2, 5), connection(1, 3)]),
                         None, view)
    assert ids_shown(lines) == [2, 1, 10]


def test_each_connection_shows_the_toxics_acting_on_it() -> None:
    """The proxy's and the connection's own (the API's ``toxics`` of the row)."""
    slow = {**connection(1, 1), "toxics": ["latency_downstream", "cable"]}
    lines = render_lines(snapshot([slow, {**connection(2, 1), "toxics": []}]), None, View())
    header = next(line for line in lines if line.startswith("ID "))
    assert header.split()[-1] == "TOXICS"
    rows = {line.split()[0]: line.split()[-1] for line in lines[lines.index(header) + 1:]}
    assert rows == {"1": "latency_downstream,cable", "2": "-"}


def test_upstreams_show_their_health_and_last_check() -> None:
    at = 1764632881.25
    lines = render_lines(snapshot([], [
        {"address": "10.0.0.5:6379", "weight": 3, "backup": False, "state": "up", "active": 2,
         "last_check": {"at": at, "passed": True, "reason": ""}},
        {"address": "10.0.0.6:6379", "weight": 1, "backup": True, "state": "down", "active": 0,
         "last_check": {"at": at, "passed": False, "reason": "connection refused"}},
        {"address": "10.0.0.7:6379", "weight": 1, "backup": False, "state": "up", "active": 0,
         "last_check": None},
        {"address": "10.0.0.7:6379", "route": "api", "weight": 1, "backup": False,
         "state": "down", "active": 0, "last_check": None}]), None, View())
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    assert [line.split(None, 1) for line in lines if line.startswith("  ")] == [
        ["up", f"10.0.0.5:6379                weight 3 active 2 last check {clock} ok"],
        ["DOWN", f"10.0.0.6:6379                weight 1 backup active 0 last check {clock} "
                 "failed (connection refused)"],
        ["up", "10.0.0.7:6379                weight 1 active 0 last check none"],
        # An SNI route's upstream, with its own health, says its route.
        ["DOWN", "10.0.0.7:6379                route api weight 1 active 0 last check none"]]


def test_proxy_columns_stay_under_their_headers_when_a_value_is_long() -> None:
    """A proxy listening on two addresses, a long name or a long upstream list
    widens its column: every number stays under its header (OPEN, CONN/S)
    instead of shifting right on that proxy's row."""
    proxies = {
        "web": {"listen": "127.0.0.1:18100,127.0.0.1:18102", "upstream": "127.0.0.1:18083",
                "enabled": True, "upstreams": []},
        "a-rather-long-proxy-name": {
            "listen": "[::1]:6380", "upstream": "10.0.0.5:6379,10.0.0.6:6379,10.0.0.7:6379",
            "enabled": True, "upstreams": []},
        "db": {"listen": ":5432", "upstream": "db:5432", "enabled": True, "upstreams": []}}
    metrics = [("midway_connections_active", {"proxy": name}, float(i))
               for i, name in enumerate(sorted(proxies))]
    lines = render_lines(Snapshot(0.0, proxies, metrics, []), None, View())
    header = lines[0]
    end = header.index("OPEN") + len("OPEN")  # OPEN is right-aligned: its numbers end there
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert sorted(rows) == sorted(proxies)
    for i, name in enumerate(sorted(proxies)):
        assert rows[name][:end].endswith(f" {i}"), (header, rows[name])


def test_a_state_of_several_words_is_shown_whole() -> None:
    """States such as ``half-closed by upstream`` or ``reading PROXY header``
    were cut to ten characters (``half-close``, ``reading PR``)."""
    states = ["half-closed by upstream", "reading PROXY header", "upstream TLS handshake"]
    rows = [{**connection(i, 1), "state": state} for i, state in enumerate(states, 1)]
    lines = render_lines(snapshot(rows), None, View(sort="id"))
    start = next(i for i, line in enumerate(lines) if line.startswith("ID "))
    column = lines[start].index("STATE")
    for line, state in zip(lines[start + 1:], states, strict=True):
        assert line[column:].startswith(state + " "), line
        assert line[column:].split()[len(state.split())] == "copy"  # PATH follows it


def test_with_workers_each_connection_shows_its_worker() -> None:
    """One process: no WORKER column; a connection of worker 2: the column, after
    PROXY, with each row's worker under it."""
    alone = render_lines(snapshot([{**connection(1, 1), "worker": 1}]), None, View())
    assert "WORKER" not in next(line for line in alone if line.startswith("ID "))
    lines = render_lines(snapshot([{**connection(1, 1), "worker": 1},
                                   {**connection(2, 1), "worker": 2}]), None, View(sort="id"))
    header = next(line for line in lines if line.startswith("ID "))
    assert header.split()[:4] == ["ID", "PROXY", "WORKER", "CLIENT"]
    rows = [line.split() for line in lines[lines.index(header) + 1:]]
    assert [(row[0], row[2]) for row in rows] == [("1", "1"), ("2", "2")]
    at = header.index("WORKER")
    assert all(line[at:at + 6].strip() in ("1", "2") for line in lines[lines.index(header) + 1:])
