"""One control plane for ``workers = 2``, over real processes: a toxic added
through the admin API reaches both workers, ``/metrics`` adds both up to exactly
what the access log says, each worker writes a capture of its own, and a worker
killed in the middle of an API call or a reload makes the API answer an error
(never hang) and comes back running what the others run."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..helpers import ProxyProcess, needs, threaded, threaded_echo, wait_until
from ..metrics.support import value
from .test_reload import write_config
from .test_workers import children, supervised

pytestmark = [pytest.mark.one_mode, pytest.mark.timeout(180)]

WORKER_LISTENING = re.compile(r"midway\[worker (\d+), pid (\d+)\] INFO default: listening on")


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A blocking echo server on threads, one per connection."""
    with threaded_echo() as port:
        yield port


class Api:
    def __init__(self, proxy: ProxyProcess) -> None:
        assert wait_until(lambda: any("admin API" in line for line in proxy.stderr_lines),
                          timeout=20), proxy.stderr_text()
        line = next(line for line in proxy.stderr_lines if "admin API" in line)
        self.port = int(line.rsplit(":", 1)[1])

    def listen_port(self, proxy: str = "default") -> int:
        """The port ``proxy`` listens on, as the API reports it."""
        return int(self.request("GET", f"/proxies/{proxy}")[1]["listen"].rsplit(":", 1)[1])

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         headers={"User-Agent": "midway-tests", **(headers or {})})
            response = conn.getresponse()
            data = response.read()
            kind = response.getheader("Content-Type", "")
            return response.status, json.loads(data) if "json" in kind and data else data
        finally:
            conn.close()


def workers(proxy: ProxyProcess) -> dict[int, int]:
    """Worker number -> pid of its latest start."""
    return {int(m[1]): int(m[2]) for m in WORKER_LISTENING.finditer(proxy.stderr_text())}


def both_up(proxy: ProxyProcess) -> dict[int, int]:
    assert wait_until(lambda: len(workers(proxy)) == 2 and
                      any("started 2 workers" in line for line in proxy.stderr_lines),
                      timeout=30), proxy.stderr_text()
    return workers(proxy)


def timed_roundtrip(port: int, payload: bytes = b"ping") -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got, time.monotonic() - started


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Complete lines only: read while a worker writes, the last one may be half there.
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n")]


def load(port: int, connections: int, size: int = 1000) -> None:
    """``connections`` round trips, eight at a time (the kernel spreads them)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: timed_roundtrip(port, b"%d" % i * size)[0],
                            range(connections)))
    assert got == [b"%d" % i * size for i in range(connections)]


def test_a_toxic_added_through_the_api_hits_both_workers(echo_port: int,
                                                         tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--admin", "127.0.0.1:0", "--access-log", str(access_log)) as (proxy, _):
        both_up(proxy)
        port, api = proxy.port, Api(proxy)
        # proxy.port may be the admin API's (its line can come first): ask the API.
        status, shown = api.request("GET", "/proxies/default")
        assert status == 200
        port = int(shown["listen"].rsplit(":", 1)[1])
        status, toxic = api.request("POST", "/proxies/default/toxics",
                                    {"type": "latency", "attributes": {"latency": 300}})
        assert status == 200 and toxic["attributes"]["latency"] == 300
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            timings = list(pool.map(lambda _: timed_roundtrip(port), range(24)))
        assert all(got == b"ping" and seconds >= 0.3 for got, seconds in timings), timings
        assert wait_until(lambda: len(records(access_log)) == 24, timeout=10)
        # The kernel spread them: both workers served some, and every one was slow.
        assert {r["worker"] for r in records(access_log)} == {1, 2}
        assert all(r["duration_s"] >= 0.3 for r in records(access_log))
        status, _ = api.request("DELETE", "/proxies/default/toxics/latency_downstream")
        assert status == 204
        fast = [timed_roundtrip(port)[1] for _ in range(10)]
        assert max(fast) < 0.3, fast
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


def test_metrics_add_up_both_workers_to_exactly_the_access_log(echo_port: int,
                                                               tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--admin", "127.0.0.1:0", "--access-log", str(access_log)) as (proxy, _):
        both_up(proxy)
        api = Api(proxy)
        port = api.listen_port()
        load(port, 40, size=777)
        assert wait_until(lambda: len(records(access_log)) == 40, timeout=10)
        status, body = api.request("GET", "/metrics")
        assert status == 200
        text = body.decode()
        got = records(access_log)
        assert {r["worker"] for r in got} == {1, 2}  # both counted, and summed
        labels = {"proxy": "default"}
        assert value(text, "midway_bytes_total", **labels, direction="upstream") == \
            sum(r["bytes_up"] for r in got)
        assert value(text, "midway_bytes_total", **labels, direction="downstream") == \
            sum(r["bytes_down"] for r in got)
        assert value(text, "midway_closes_total", **labels, reason="eof") == \
            sum(r["reason"] == "eof" for r in got) == 40
        assert value(text, "midway_connection_seconds_count", **labels) == 40
        assert value(text, "midway_connect_seconds_count", **labels) == 40
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


def test_the_upstreams_list_counts_the_connections_of_every_worker(echo_port: int) -> None:
    """docs/balancing.md's drain: weight 0, "wait until the admin API shows
    active: 0", then take the upstream out.  With two workers, the API's
    ``active`` and ``connects`` must be both workers' (as /metrics is), or an
    operator would take out an upstream that the other worker still serves."""
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--admin", "127.0.0.1:0") as (proxy, _):
        both_up(proxy)
        api = Api(proxy)
        port = api.listen_port()

        def upstream() -> dict[str, Any]:
            status, shown = api.request("GET", "/proxies/default")
            assert status == 200
            entry: dict[str, Any] = shown["upstreams"][0]
            return entry

        # 20 connections all on one worker: odds of 2**-19.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        try:
            for client in clients:
                client.sendall(b"x")
                assert client.recv(1) == b"x"
            assert wait_until(lambda: upstream()["active"] == 20, timeout=10), upstream()
            assert upstream()["connects"] == 20 and upstream()["state"] == "up"
            _, listed = api.request("GET", "/proxies")
            assert listed["default"]["upstreams"][0]["active"] == 20
        finally:
            for client in clients:
                client.close()
        assert wait_until(lambda: upstream()["active"] == 0, timeout=10), upstream()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


@pytest.mark.skipif(shutil.which("tshark") is None, reason=needs("tshark", apt="tshark"))
def test_each_worker_writes_a_capture_of_its_own(echo_port: int, tmp_path: Path) -> None:
    capture, access_log = tmp_path / "capture.pcap", tmp_path / "access.log"
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--pcap", str(capture), "--access-log", str(access_log)) as (proxy, _):
        both_up(proxy)
        load(proxy.port, 30, size=100)
        assert wait_until(lambda: len(records(access_log)) == 30, timeout=10)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0
    by_worker = {w: sum(r["worker"] == w for r in records(access_log)) for w in (1, 2)}
    assert not capture.exists()
    for worker, connections in by_worker.items():
        path = tmp_path / f"capture.w{worker}.pcap"
        result = subprocess.run(["tshark", "-n", "-r", str(path), "-Y",
                                 "tcp.flags.syn == 1 && tcp.flags.ack == 0"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr  # a whole, valid capture
        # Two legs per connection, each opened by one SYN.
        assert len(result.stdout.splitlines()) == 2 * connections, (worker, result.stdout)


def test_a_worker_killed_during_an_api_call_makes_it_fail_and_comes_back_with_the_toxic(
        echo_port: int, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--admin", "127.0.0.1:0", "--access-log", str(access_log)) as (proxy, pids):
        first = both_up(proxy)
        pids |= set(first.values())
        api = Api(proxy)
        port = api.listen_port()
        # Worker 2: the route reads the live toxics from worker 1 (the first that
        # runs) before it sends the change to both.
        victim = first[2]
        os.kill(victim, signal.SIGSTOP)  # it cannot answer ...
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(api.request, "POST", "/proxies/default/toxics",
                               {"type": "latency", "attributes": {"latency": 300}})
            time.sleep(1.0)
            assert not call.done()  # ... so the call waits for it
            os.kill(victim, signal.SIGKILL)  # ... and it dies meanwhile
            status, error = call.result(timeout=10)  # an answer, not a hang
        assert status == 503, error
        assert f"worker 2 (pid {victim})" in error["error"], error
        # The supervisor starts worker 2 again, with the toxic worker 1 applied.
        assert wait_until(lambda: workers(proxy).get(2) not in (None, victim), timeout=30), \
            proxy.stderr_text()
        pids |= children(proxy.pid)
        assert [t["name"] for t in api.request("GET", "/proxies/default/toxics")[1]] == \
            ["latency_downstream"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            timings = list(pool.map(lambda _: timed_roundtrip(port), range(24)))
        assert all(got == b"ping" and seconds >= 0.3 for got, seconds in timings), timings
        assert wait_until(lambda: len(records(access_log)) == 24, timeout=10)
        assert {r["worker"] for r in records(access_log)} == {1, 2}
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


def test_a_hung_worker_times_the_call_out_and_is_restarted(echo_port: int) -> None:
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--admin", "127.0.0.1:0") as (proxy, pids):
        first = both_up(proxy)
        pids |= set(first.values())
        api = Api(proxy)
        os.kill(first[2], signal.SIGSTOP)  # never answers, never dies by itself
        started = time.monotonic()
        status, error = api.request("POST", "/proxies/default/toxics", {"type": "timeout"})
        waited = time.monotonic() - started
        assert status == 503 and "worker 2" in error["error"] and "within" in error["error"]
        assert waited < 20  # the control plane's timeout, below the API's own 25 s
        assert wait_until(lambda: workers(proxy).get(2) not in (None, first[2]), timeout=30)
        pids |= children(proxy.pid)
        assert [t["name"] for t in api.request("GET", "/proxies/default/toxics")[1]] == \
            ["timeout_downstream"]
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


def test_a_worker_killed_during_a_reload_comes_back_with_the_new_configuration(
        tmp_path: Path) -> None:
    hits = {"a": 0, "b": 0}
    servers = {}
    for name in hits:
        server = socket.create_server(("127.0.0.1", 0), backlog=128)
        servers[name] = server

        def accept(server: socket.socket = server, name: str = name) -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                hits[name] += 1
                with conn:
                    with contextlib.suppress(OSError):
                        while data := conn.recv(65536):
                            conn.sendall(data)

        threading.Thread(target=accept, daemon=True).start()
    a, b = (f"127.0.0.1:{s.getsockname()[1]}" for s in servers.values())
    config, access_log = tmp_path / "midway.toml", tmp_path / "access.log"
    server_table = {"workers": 2, "admin": "127.0.0.1:0", "access_log": str(access_log)}
    write_config(config, {"default": {"listen": "127.0.0.1:0", "upstreams": [a]}},
                 server_table)
    try:
        with supervised("--config", str(config)) as (proxy, pids):
            first = both_up(proxy)
            pids |= set(first.values())
            api = Api(proxy)
            port = api.listen_port()
            write_config(config, {"default": {"listen": f"127.0.0.1:{port}",
                                              "upstreams": [b]}}, server_table)
            victim = first[2]
            os.kill(victim, signal.SIGSTOP)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                call = pool.submit(api.request, "POST", "/reload")
                time.sleep(1.0)
                assert not call.done()
                os.kill(victim, signal.SIGKILL)
                status, error = call.result(timeout=10)
            assert status == 503 and f"worker 2 (pid {victim})" in error["error"], error
            assert wait_until(lambda: workers(proxy).get(2) not in (None, victim), timeout=30)
            pids |= children(proxy.pid)
            before = dict(hits)
            load(port, 30, size=10)
            assert wait_until(lambda: len(records(access_log)) == 30, timeout=10)
            # Every worker, the restarted one too, runs the new file: upstream b.
            assert {r["worker"] for r in records(access_log)} == {1, 2}
            assert hits["a"] == before["a"] and hits["b"] == before["b"] + 30
            assert {r["upstream"] for r in records(access_log)} == {b}
            proxy.signal(signal.SIGTERM)
            assert proxy.wait(20) == 0
    finally:
        for server in servers.values():
            server.close()


def test_the_proxies_upstream_figures_add_up_both_workers(echo_port: int,
                                                          tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "127.0.0.1:1", "--workers", "2",
                    "--admin", "127.0.0.1:0", "--access-log", str(access_log),
                    "--health-eject-after", "0") as (proxy, _):
        both_up(proxy)
        api = Api(proxy)
        port = api.listen_port()
        load(port, 40, size=10)
        assert wait_until(lambda: len(records(access_log)) == 40, timeout=10)
        got = records(access_log)
        assert {r["worker"] for r in got} == {1, 2}
        text = api.request("GET", "/metrics")[1].decode()
        failures = value(text, "midway_connect_failures_total", proxy="default",
                         upstream="127.0.0.1:1")
        assert failures == sum(len(r.get("failures") or ()) for r in got) > 0
        status, shown = api.request("GET", "/proxies/default")
        assert status == 200
        by_address = {u["address"]: u for u in shown["upstreams"]}
        # What GET /proxies says is the whole proxy's, as /metrics is, not one worker's.
        assert by_address[f"127.0.0.1:{echo_port}"]["connects"] == 40
        assert by_address[f"127.0.0.1:{echo_port}"]["active"] == 0
        assert by_address["127.0.0.1:1"]["connect_failures"] == failures
        assert api.request("GET", "/proxies")[1]["default"]["upstreams"] == shown["upstreams"]
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


def test_counters_do_not_go_back_when_a_worker_is_restarted(echo_port: int,
                                                             tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--admin", "127.0.0.1:0", "--access-log", str(access_log)) as (proxy, pids):
        first = both_up(proxy)
        pids |= set(first.values())
        api = Api(proxy)
        port = api.listen_port()
        load(port, 40, size=10)
        assert wait_until(lambda: len(records(access_log)) == 40, timeout=10)
        assert {r["worker"] for r in records(access_log)} == {1, 2}
        labels = {"proxy": "default"}
        before = api.request("GET", "/metrics")[1].decode()
        assert value(before, "midway_connections_total", **labels) == 40
        os.kill(first[2], signal.SIGKILL)
        assert wait_until(lambda: workers(proxy).get(2) not in (None, first[2]), timeout=30), \
            proxy.stderr_text()
        pids |= children(proxy.pid)
        assert wait_until(lambda: api.request("GET", "/metrics")[0] == 200, timeout=10)
        load(port, 10, size=10)
        assert wait_until(lambda: len(records(access_log)) == 50, timeout=10)
        after = api.request("GET", "/metrics")[1].decode()
        # A sum that went back would be read by rate() as a reset of the whole
        # counter: the restarted worker's predecessor still counts.
        assert value(after, "midway_connections_total", **labels) == 50
        assert value(after, "midway_closes_total", **labels, reason="eof") == 50
        assert value(after, "midway_connection_seconds_count", **labels) == 50
        assert value(after, "midway_bytes_total", **labels, direction="upstream") == \
            sum(r["bytes_up"] for r in records(access_log))
        assert value(after, "midway_connections_active", **labels) == 0
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


@contextlib.contextmanager
def killable_workers(upstream: int) -> Iterator[tuple[ProxyProcess, set[int], dict[int, int],
                                                      Api]]:
    """Two workers in front of ``upstream``, with the API: (midway, the pids to
    kill at the end, worker number -> pid, the API)."""
    with supervised("127.0.0.1:0", f"127.0.0.1:{upstream}", "--workers", "2",
                    "--admin", "127.0.0.1:0") as (proxy, pids):
        first = both_up(proxy)
        pids |= set(first.values())
        yield proxy, pids, first, Api(proxy)


def test_a_worker_killed_with_connections_open_keeps_the_counters_and_docs_say_how(
        echo_port: int) -> None:
    """kill -9 of a worker holding connections: no counter goes back, the gauge
    drops to what is really open, and the dead worker's connections are the
    documented gap between accepted and closed (docs/metrics.md, Workers)."""
    with killable_workers(echo_port) as (proxy, pids, first, api):
        port = api.listen_port()
        held = []
        for i in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"%d" % i)
            assert sock.recv(16) == b"%d" % i
            held.append(sock)
        try:
            assert wait_until(lambda: len(api.request("GET", "/connections")[1]) == 20, timeout=10)
            ids = [c["id"] for c in api.request("GET", "/connections")[1]]
            on_worker_2 = sum(1 for i in ids if i % 2 == 0)  # worker w numbers w, w+2, ...
            labels = {"proxy": "default"}
            before = api.request("GET", "/metrics")[1].decode()
            assert value(before, "midway_connections_active", **labels) == 20
            os.kill(first[2], signal.SIGKILL)
            assert wait_until(lambda: workers(proxy).get(2) not in (None, first[2]), timeout=30), \
                proxy.stderr_text()
            pids |= children(proxy.pid)
        finally:
            for sock in held:
                sock.close()
        load(port, 10, size=10)
        assert wait_until(lambda: value(api.request("GET", "/metrics")[1].decode(),
                                        "midway_connections_active", **labels) == 0, timeout=10)
        after = api.request("GET", "/metrics")[1].decode()
        assert value(after, "midway_connections_total", **labels) == 30
        closes = sum(value(after, "midway_closes_total", **labels, reason=reason)
                     for reason in ("eof", "reset"))
        assert closes == 30 - on_worker_2
        assert value(after, "midway_connection_seconds_count", **labels) == closes
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


def test_an_update_with_port_0_keeps_the_port_with_workers_as_in_one_process(
        echo_port: int) -> None:
    """docs/faults.md: "Port 0 in an update keeps the port the proxy has", also
    when the upstream changes with it (which restarts the proxy).  With workers
    the supervisor reserves the addresses first: it bound a new ephemeral port
    for ``127.0.0.1:0``, so a client of the old port was refused."""
    with supervised("--admin", "127.0.0.1:0", "--workers", "2") as (proxy, _):
        api = Api(proxy)
        assert wait_until(lambda: any("started 2 workers" in line
                                      for line in proxy.stderr_lines), timeout=30)
        status, created = api.request("POST", "/proxies", {
            "name": "p", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"})
        assert status == 201, created
        for change in ({"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo_port}"},
                       {"listen": "127.0.0.1:0"}):
            status, shown = api.request("PATCH", "/proxies/p", change)
            assert (status, shown["listen"]) == (200, created["listen"]), (change, shown)
        port = int(created["listen"].rsplit(":", 1)[1])
        assert timed_roundtrip(port)[0] == b"ping"


def test_a_unix_listener_through_the_api_with_workers_names_the_body_field(
        tmp_path: Path) -> None:
    """A unix-socket listener needs ``workers = 1``: through the API the 400
    names the body's field, ``listen[0]``, as every other bad address does (it
    named the configuration file's ``proxy.NAME.listen[0]``)."""
    path = tmp_path / "l.sock"
    with supervised("--admin", "127.0.0.1:0", "--workers", "2") as (proxy, _):
        api = Api(proxy)
        status, answer = api.request("POST", "/proxies", {
            "name": "u", "listen": f"unix:{path}", "upstream": "127.0.0.1:1"})
        assert (status, answer) == (400, {
            "error": f"bad request body: listen[0]: unix:{path}: unix-socket listeners "
                     "need workers = 1", "status": 400})
        assert api.request("GET", "/proxies") == (200, {})


class EndlessDownload(socketserver.BaseRequestHandler):
    """Sends to its client until the client goes away."""

    def handle(self) -> None:
        self.request.settimeout(60)
        with contextlib.suppress(OSError):
            while True:
                self.request.sendall(b"d" * 65536)


def test_the_clients_of_a_killed_worker_see_the_end_its_kernel_gives_and_docs_say_so() -> None:
    """docs/guarantees.md and docs/metrics.md: a worker killed by SIGKILL cannot
    reset its connections; the kernel closes its sockets, and a client that had
    nothing unread by midway gets a FIN, even in the middle of a download (the
    docs said 'their clients see a reset').  The other worker's go on."""
    with threaded(EndlessDownload) as upstream, \
            killable_workers(upstream) as (proxy, pids, first, api):
        port = api.listen_port()
        clients = []
        try:
            for _ in range(20):  # 20 on one worker: odds of 2**-19
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                assert clients[-1].recv(65536)  # each download is flowing
            assert wait_until(lambda: len(api.request("GET", "/connections")[1]) == 20,
                              timeout=10)
            worker_of = {int(c["client"].rsplit(":", 1)[1]): c["worker"]
                         for c in api.request("GET", "/connections")[1]}
            os.kill(first[2], signal.SIGKILL)
            ends = []
            for client in clients:
                if worker_of[client.getsockname()[1]] == 2:
                    while chunk := client.recv(1 << 20):
                        assert set(chunk) == {ord("d")}
                    ends.append("fin")
                else:
                    assert client.recv(65536)  # worker 1's go on
            assert ends and set(ends) == {"fin"}
        finally:
            for client in clients:
                client.close()
        docs = Path(__file__).parents[2] / "docs"
        assert "killed by SIGKILL" in (docs / "guarantees.md").read_text()
        assert "clients see a reset" not in (docs / "metrics.md").read_text()


def test_the_admin_api_stops_when_the_drain_starts_with_workers_as_in_one_process(
        echo_port: int) -> None:
    """SIGTERM: one process closes its admin API before it drains.  The
    supervisor served it on through the drain and took changes: a proxy
    created then answered 201 with an address whose clients hung until the
    drain timeout, a reload was applied.  Now its port refuses, as in one
    process, while the open connections drain as before."""
    with killable_workers(echo_port) as (proxy, _, _, api):
        port = api.listen_port()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
            proxy.signal(signal.SIGTERM)

            def admin_refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", api.port), timeout=2).close()
                except ConnectionRefusedError:
                    return True
                except ConnectionResetError:  # queued as the socket closed: try again
                    return False
                return False

            assert wait_until(admin_refused, timeout=10), proxy.stderr_text()
            held.sendall(b"still")
            assert held.recv(16) == b"still"  # the drain goes on
        assert proxy.wait(30) == 0


def test_two_proxies_cannot_share_an_address_with_workers_as_in_one_process(
        echo_port: int) -> None:
    """One process answers 500 'address already in use' to a proxy created,
    populated or moved onto another proxy's address.  With workers, the
    supervisor's reservations (SO_REUSEPORT among themselves) let it: both
    proxies listened on the port and the kernel split their clients."""
    with supervised("--admin", "127.0.0.1:0", "--workers", "2") as (proxy, _):
        api = Api(proxy)
        assert wait_until(lambda: any("started 2 workers" in line
                                      for line in proxy.stderr_lines), timeout=30)
        status, first = api.request("POST", "/proxies", {
            "name": "first", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo_port}"})
        assert status == 201, first
        taken = first["listen"]
        port = taken.rsplit(":", 1)[1]
        in_use = {"error": f"second: cannot listen on {taken}: address already in use",
                  "status": 500}
        for listen in (taken, f":{port}"):
            assert api.request("POST", "/proxies", {
                "name": "second", "listen": listen, "upstream": "127.0.0.1:1"}) == (
                500, {**in_use, "error": in_use["error"].replace(taken, listen)})
            assert api.request("POST", "/populate", [{
                "name": "second", "listen": listen, "upstream": "127.0.0.1:1"}])[0] == 500
        status, _ = api.request("POST", "/proxies", {
            "name": "second", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"})
        assert status == 201
        assert api.request("PATCH", "/proxies/second", {"listen": taken}) == (500, in_use)
        assert sorted(api.request("GET", "/proxies")[1]) == ["first", "second"]
        assert api.request("GET", "/proxies/first")[1]["listen"] == taken
        for _ in range(20):  # every client reaches the first proxy's upstream
            assert timed_roundtrip(int(port))[0] == b"ping"
        # A disabled proxy listens nowhere: its address may be taken, and
        # enabling it then is what fails, naming it.
        assert api.request("PATCH", "/proxies/first", {"enabled": False})[0] == 200
        assert api.request("PATCH", "/proxies/second", {"listen": taken})[0] == 200
        assert api.request("PATCH", "/proxies/first", {"enabled": True}) == (500, {
            **in_use, "error": in_use["error"].replace("second", "first")})
