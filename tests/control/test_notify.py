"""sd_notify over a real unix datagram socket, as systemd listens: the function
alone (a path, an abstract name), then midway as a service manager sees it:
READY=1 once it accepts, RELOADING=1 and READY=1 around a reload, STOPPING=1,
and with workers only the supervisor speaking, once every worker listens."""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from midway.control import notify

from ..helpers import proxy_process, wait_until


class Listener:
    """A datagram socket standing in for systemd's notify socket; records each
    message with the sender's pid (SO_PASSCRED, as systemd checks it)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        size = struct.calcsize("3i")
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:size])[0]
            self.messages.append((pid, data.decode()))

    def states(self) -> list[str]:
        return [text.splitlines()[0] for _, text in self.messages]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    path = str(tmp_path / "notify.sock")
    listener = Listener(path)
    yield path, listener
    listener.close()


def test_each_state_is_one_datagram(manager: tuple[str, Listener]) -> None:
    path, listener = manager
    env = {notify.ENVIRONMENT: path}
    assert notify.notify(notify.READY, environ=env)
    assert notify.notify(notify.RELOADING, environ=env)
    assert wait_until(lambda: len(listener.messages) == 2)
    assert listener.messages[0] == (os.getpid(), "READY=1")
    reloading = listener.messages[1][1].splitlines()
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert abs(int(reloading[1].split("=")[1]) / 1e6 - _monotonic()) < 5


def _monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def test_an_abstract_socket_name_starts_with_at() -> None:
    name = f"midway-test-notify-{os.getpid()}"
    listener = Listener("\0" + name)
    try:
        assert notify.notify(notify.STOPPING, environ={notify.ENVIRONMENT: "@" + name})
        assert wait_until(lambda: listener.states() == ["STOPPING=1"])
    finally:
        listener.close()


def test_without_a_manager_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not notify.notify(notify.READY, environ={})
    assert not notify.notify(notify.READY, environ={notify.ENVIRONMENT: str(tmp_path / "none")})


@pytest.mark.timeout(120)
def test_midway_says_ready_reloading_and_stopping(manager: tuple[str, Listener],
                                                  tmp_path: Path) -> None:
    path, listener = manager
    config = tmp_path / "midway.toml"
    config.write_text('[proxy.web]\nlisten = "127.0.0.1:0"\nupstreams = "127.0.0.1:1"\n')
    with proxy_process("--config", str(config), env={notify.ENVIRONMENT: path}) as proxy:
        assert wait_until(lambda: "READY=1" in listener.states(), timeout=10)
        # Ready means accepting: a connection is taken at once.
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: listener.states() == ["READY=1", "RELOADING=1", "READY=1"],
                          timeout=15), listener.states()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
    assert listener.states()[-1] == "STOPPING=1"
    assert {pid for pid, _ in listener.messages} == {proxy.pid}


@pytest.mark.timeout(120)
def test_with_workers_only_the_supervisor_says_ready_once_all_listen(
        manager: tuple[str, Listener]) -> None:
    path, listener = manager
    with proxy_process("127.0.0.1:0", "127.0.0.1:1", "--workers", "2",
                       env={notify.ENVIRONMENT: path}) as proxy:
        assert wait_until(lambda: "READY=1" in listener.states(), timeout=30)
        listening = [line for line in proxy.stderr_text().splitlines()
                     if "default: listening on" in line]
        assert len(listening) == 2  # both workers listened before READY
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0
    assert listener.states() == ["READY=1", "STOPPING=1"]
    assert {pid for pid, _ in listener.messages} == {proxy.pid}
