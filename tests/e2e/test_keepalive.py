"""TCP keepalive (``tcp_keepalive_s``): the kernel's keepalive timer runs on both of
the proxy's sockets of a connection, as /proc/net/tcp shows it, only when asked
for; a reload applies it to the connections accepted after it."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import proxy_process, threaded_echo, wait_until

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(),
                                reason="needs Linux's /proc/net/tcp")

_KEEPALIVE_TIMER = 2
"""/proc/net/tcp's ``tr`` field for a socket whose keepalive timer is pending."""


_ESTABLISHED = "01"


def _timers() -> Iterator[tuple[int, int, int, int]]:
    """(local port, remote port, timer kind, clock ticks left) of each established
    IPv4 TCP socket."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, (kind, when) = fields[1], fields[2], fields[3], fields[5].split(":")
        if state == _ESTABLISHED:
            yield int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), \
                int(kind, 16), int(when, 16)


def _proxy_sockets(listen_port: int, client: socket.socket,
                   upstream_port: int) -> list[tuple[int, int]]:
    """The (timer kind, ticks left) of the proxy's two sockets of ``client``'s
    connection: the one it accepted, and the one it dialled (the only one to the
    upstream with its client's local port, when one connection is open)."""
    client_port = client.getsockname()[1]
    accepted = [(k, w) for lp, rp, k, w in _timers() if lp == listen_port and rp == client_port]
    dialled = [(k, w) for lp, rp, k, w in _timers() if rp == upstream_port]
    assert len(accepted) == 1, accepted
    return accepted + dialled


def _round_trip(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(b"ping")
    assert client.recv(16) == b"ping"
    return client


def test_keepalive_probes_are_armed_on_both_sockets_with_the_idle_time() -> None:
    with threaded_echo() as up, \
            proxy_process("127.0.0.1:0", f"127.0.0.1:{up}", "--tcp-keepalive-s", "7",
                          "--tcp-keepalive-interval-s", "2", "--tcp-keepalive-probes", "3") as proxy:
        with _round_trip(proxy.port) as client:
            timers = _proxy_sockets(proxy.port, client, up)
            assert len(timers) == 2, timers
            for kind, ticks in timers:
                # The keepalive timer, due within the 7 s idle time (clock ticks of 1/100 s).
                assert kind == _KEEPALIVE_TIMER and 0 < ticks <= 700, timers


def test_without_the_option_no_keepalive_timer_runs() -> None:
    with threaded_echo() as up, proxy_process("127.0.0.1:0", f"127.0.0.1:{up}") as proxy:
        with _round_trip(proxy.port) as client:
            timers = _proxy_sockets(proxy.port, client, up)
            assert len(timers) == 2 and all(kind != _KEEPALIVE_TIMER for kind, _ in timers), \
                timers


def test_a_reload_turns_keepalive_on_for_the_connections_accepted_after_it(
        tmp_path: Path) -> None:
    with threaded_echo() as up:
        config = tmp_path / "midway.toml"
        text = f'[proxy.p]\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:{up}"]\n'
        config.write_text(text)
        with proxy_process("--config", str(config)) as proxy, _round_trip(proxy.port) as before:
            config.write_text(text + "tcp_keepalive_s = 30\n")
            proxy.signal(signal.SIGHUP)
            assert wait_until(lambda: "reload: done" in proxy.stderr_text(), timeout=10), \
                proxy.stderr_text()
            kinds = [kind for kind, _ in _proxy_sockets(proxy.port, before, up)]
            assert _KEEPALIVE_TIMER not in kinds, kinds  # an open connection keeps its own
            before.close()
            assert wait_until(lambda: not any(rp == up for _, rp, _, _ in _timers()), timeout=10)
            with _round_trip(proxy.port) as after:
                timers = _proxy_sockets(proxy.port, after, up)
                assert [kind for kind, _ in timers] == [_KEEPALIVE_TIMER] * 2, timers
