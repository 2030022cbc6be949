"""``unix_mode``: the permissions of a unix listener's socket file decide which
users may connect; set before the socket accepts, and again by a reload."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import proxy_process, threaded_echo, wait_until

NOBODY = 65534

SYSTEM_PYTHON = "/usr/bin/python3"
"""A Python that user nobody may run (this one may be under root's home)."""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, to connect as another user (nobody), and /usr/bin/python3 for it")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="midway-unix-mode-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody_round_trip(path: Path) -> str:
    """Connect to ``path`` as user nobody, send and read back "hi": "ok" or the error."""
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\ns.settimeout(5)\n"
            "try:\n s.connect(sys.argv[1]); s.sendall(b'hi'); print(s.recv(2).decode())\n"
            "except OSError as e:\n print(e.strerror)\n")
    done = subprocess.run([SYSTEM_PYTHON, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=30, user=NOBODY, group=NOBODY, extra_groups=[])
    return done.stdout.strip().replace("hi", "ok")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@needs_root
def test_unix_mode_lets_other_users_connect(shared_dir: Path) -> None:
    sock = shared_dir / "web.sock"
    with threaded_echo() as up:
        with proxy_process(f"unix:{sock}", f"127.0.0.1:{up}", "--unix-mode", "666"):
            assert _mode(sock) == 0o666
            assert _as_nobody_round_trip(sock) == "ok"


@needs_root
def test_without_it_the_umask_decides_and_other_users_are_refused(shared_dir: Path) -> None:
    sock = shared_dir / "web.sock"
    with threaded_echo() as up:
        with proxy_process(f"unix:{sock}", f"127.0.0.1:{up}",
                           preexec=lambda: os.umask(0o022)):
            assert _mode(sock) == 0o755
            assert _as_nobody_round_trip(sock) == "Permission denied"


@needs_root
def test_a_reload_changes_the_mode_of_a_kept_socket(shared_dir: Path) -> None:
    sock = shared_dir / "web.sock"
    with threaded_echo() as up:
        config = shared_dir / "midway.toml"
        text = f'[proxy.p]\nlisten = "unix:{sock}"\nupstreams = ["127.0.0.1:{up}"]\n'
        config.write_text(text + 'unix_mode = "600"\n')
        with proxy_process("--config", str(config)) as proxy:
            assert _mode(sock) == 0o600
            assert _as_nobody_round_trip(sock) == "Permission denied"
            config.write_text(text + 'unix_mode = "0o666"\n')
            proxy.signal(signal.SIGHUP)
            assert wait_until(lambda: "reload: done" in proxy.stderr_text(), timeout=10), \
                proxy.stderr_text()
            assert _mode(sock) == 0o666
            assert _as_nobody_round_trip(sock) == "ok"


def test_the_listener_sets_the_mode_of_its_socket_file(tmp_path: Path) -> None:
    """Straight from the listener, which sets it between bind and listen."""
    from midway.config.addresses import parse_address
    from midway.core.listener import open_listening_socket

    path = tmp_path / "direct.sock"
    listener = open_listening_socket(parse_address(f"unix:{path}", listen=True), 8,
                                     unix_mode=0o640)
    try:
        assert _mode(path) == 0o640
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))  # it listens, with that mode
        client.close()
    finally:
        listener.close()
