"""Upstream order (round-robin with failover) and the public API surface."""

import pytest

import midway
import midway.config.addresses
from midway.config.addresses import parse_address
from midway.upstream.health import HealthSettings
from midway.upstream.state import UpstreamSet, UpstreamSpec


def _pool(ups: list[midway.config.addresses.Address]) -> UpstreamSet:
    """A proxy's pool as the service builds it today (no health table yet)."""
    return UpstreamSet("p", [UpstreamSpec(u) for u in ups],
                       health=HealthSettings(eject_after=0), balancer_feedback=False)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_round_robin_rotates_the_start_then_the_rest_in_order(n: int) -> None:
    """The order midway has always used: the start rotates, failover goes on in
    the configured order from there (the smooth weighted round-robin of equal
    weights gives exactly this), also after failed connects."""
    ups = [parse_address(f"10.0.0.{i}:80", listen=False) for i in range(n)]
    pool = _pool(ups)
    for turn in range(3 * n):
        order = [u.address for u in pool.order("10.9.9.9")]
        start = turn % n
        assert order == [ups[(start + i) % n] for i in range(n)]
        pool.upstreams[0].connect_failed("connection refused")  # changes nothing here


def test_pool_needs_an_upstream() -> None:
    with pytest.raises(ValueError):
        _pool([])


def test_public_api_is_explicit() -> None:
    assert sorted(midway.__all__) == sorted([
        "__version__", "Proxy", "BackgroundProxy", "proxy_config", "Runtime", "Config",
        "ProxyConfig", "ServerConfig", "load_config", "config_from_dict", "Element", "Stage",
        "Attachment", "Output", "ConnectionInfo", "CloseReason", "CloseRecord", "MidwayError",
        "ConfigError", "ListenError", "UpstreamError", "Rejected",
        "ToxicHandle", "ToxicError", "ToxicExists", "ToxicNotFound", "Replay", "BackgroundReplay",
    ])
    for name in midway.__all__:
        assert hasattr(midway, name), name


def test_background_proxy_for_synchronous_tests() -> None:
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def echo_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(100))

    threading.Thread(target=echo_once, daemon=True).start()
    with midway.BackgroundProxy("127.0.0.1:0", f"127.0.0.1:{server.getsockname()[1]}") as proxy:
        address = proxy.address
        with socket.create_connection(address, timeout=5) as client:
            client.sendall(b"sync")
            assert client.recv(100) == b"sync"
    server.close()
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1)


def test_background_proxy_start_errors_reach_the_caller() -> None:
    taken = __import__("socket").create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    with pytest.raises(midway.ListenError, match="address already in use"):
        midway.BackgroundProxy(f"127.0.0.1:{port}", "127.0.0.1:9").start()
    taken.close()
