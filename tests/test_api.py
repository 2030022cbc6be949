"""The public API surface: what ``midway`` exports, and ``BackgroundProxy`` for
synchronous tests."""

import pytest

import midway


def test_public_api_is_explicit() -> None:
    assert sorted(midway.__all__) == sorted([
        "__version__", "Proxy", "BackgroundProxy", "proxy_config", "Runtime", "Config",
        "ProxyConfig", "ServerConfig", "load_config", "config_from_dict", "Element", "Stage",
        "Attachment", "Output", "ConnectionInfo", "CloseReason", "CloseRecord", "MidwayError",
        "ConfigError", "ListenError", "UpstreamError", "Rejected",
        "ToxicHandle", "ToxicError", "ToxicExists", "ToxicNotFound", "Replay", "BackgroundReplay",
        "ConnectionToxicHandle", "ConnectionNotFound", "StillConnecting",
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


@pytest.mark.parametrize("option", ["workers", "drain_timeout_s", "access_log"])
def test_a_server_option_given_to_a_proxy_says_it_is_the_midway_processs(option: str) -> None:
    """``Proxy(workers=2)`` runs one proxy in the caller's process: the error says
    the option is [server]'s (it said 'unknown key', and for drain_timeout_s
    'did you mean idle_timeout_s?')."""
    with pytest.raises(midway.ConfigError) as caught:
        midway.BackgroundProxy("127.0.0.1:0", "127.0.0.1:9", **{option: 2})
    assert str(caught.value) == (
        f"proxy.default.{option}: a [server] key (the whole midway process's), not a proxy's")


def test_a_defect_keeps_its_frames_and_a_low_level_cause_is_kept() -> None:
    import traceback

    from midway.errors import at_callers_line

    @at_callers_line
    def defect() -> None:
        raise KeyError("a bug in midway")

    @at_callers_line
    def port_taken() -> None:
        try:
            raise OSError(98, "Address already in use")
        except OSError as exc:
            raise midway.ListenError("cannot listen on 127.0.0.1:1: address in use") from exc

    with pytest.raises(KeyError) as bug:
        defect()
    assert [f.name for f in traceback.extract_tb(bug.value.__traceback__)][-1] == "defect"
    with pytest.raises(midway.ListenError) as taken:
        port_taken()
    assert [f.name for f in traceback.extract_tb(taken.value.__traceback__)][-1] == "entry"
    assert isinstance(taken.value.__cause__, OSError)


def test_a_handle_outliving_its_background_proxy_is_gone() -> None:
    """remove() does nothing once the toxic is gone, and a stopped proxy has none
    left: tearing down a toxic after its proxy (an ExitStack, a fixture of wider
    scope) must not fail, as with the asyncio Proxy."""
    with midway.BackgroundProxy("127.0.0.1:0", "127.0.0.1:9") as proxy:
        handle = proxy.add_toxic("latency", latency=100)
        assert handle.active
    handle.remove()
    assert not handle.active
    with pytest.raises(midway.MidwayError, match="not running"):
        proxy.add_toxic("latency", latency=100)


def test_proxies_run_one_after_another_leave_no_descriptor_or_loop_behind() -> None:
    """A test suite runs a proxy per test, each on a loop of its own
    (``asyncio.run``, ``BackgroundProxy``): once a proxy that carried a connection
    has stopped and its loop closed, the loop and the relay's epoll descriptors
    are gone.  They were kept for good (two descriptors per test with the compiled
    relay, one in pure Python), by the idle timeout's timer left armed on the
    closed loop, until a long suite ran out of descriptors."""
    import asyncio
    import gc
    import socket
    import threading
    import weakref

    from .helpers import fd_count

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(conn.recv(100))

    threading.Thread(target=echo, daemon=True).start()
    upstream = f"127.0.0.1:{server.getsockname()[1]}"
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def one_test() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with midway.Proxy("127.0.0.1:0", upstream) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.read(100), 5) == b"ping"
            writer.close()

    def one_sync_test() -> None:
        with midway.BackgroundProxy("127.0.0.1:0", upstream) as proxy, \
                socket.create_connection(proxy.address, timeout=5) as client:
            client.sendall(b"ping")
            assert client.recv(100) == b"ping"

    try:
        asyncio.run(one_test())
        one_sync_test()
        for _ in range(3):
            gc.collect()
        before = fd_count()
        for _ in range(5):
            asyncio.run(one_test())
            one_sync_test()
        for _ in range(3):  # a loop freed by one collection frees its poller in the next
            gc.collect()
        assert fd_count() == before
        assert [ref for ref in loops if ref() is not None] == []
    finally:
        stop.set()
        server.close()


class _Shout:
    def on_data(self, direction: str, data: bytes, ctx: object) -> bytes:
        return data.upper() if direction == "downstream" else data


def test_background_proxy_adds_and_removes_an_element_live_from_the_test_thread() -> None:
    """``Proxy.add_element``/``remove_element`` apply to open connections; a
    synchronous test had only ``proxy.proxy.add_element``, which touches the
    proxy's loop from another thread.  BackgroundProxy runs them on its loop."""
    import socket
    import threading

    from midway.chain.hooks import HookElement

    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(100):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    with midway.BackgroundProxy("127.0.0.1:0", f"127.0.0.1:{server.getsockname()[1]}") as proxy, \
            socket.create_connection(proxy.address, timeout=5) as client:
        client.sendall(b"quiet")
        assert client.recv(100) == b"quiet"
        element = HookElement(_Shout)
        proxy.add_element(element)
        client.sendall(b"loud")
        assert client.recv(100) == b"LOUD"
        proxy.remove_element(element)
        client.sendall(b"quiet again")
        assert client.recv(100) == b"quiet again"
    server.close()
