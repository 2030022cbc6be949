"""Per-connection view and control through the admin API, over real processes:
``/connections`` lists every open connection (of both workers with
``workers = 2``) with its proxy, client, bytes and state; ``DELETE`` closes one
(the client sees a FIN or, with ``?reset=true``, a reset; the access log says
``killed``) while its neighbours go on exchanging data; a toxic added to one
connection slows that one alone, until it is removed; ``midway connections`` prints the table,
sorted, and says clearly when the API cannot be reached."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..helpers import ROOT, free_port, proxy_process, threaded_echo, wait_until
from .test_control_workers import Api, both_up, records
from .test_workers import supervised

pytestmark = pytest.mark.timeout(120)

SLOW_S = 0.3
"""The latency a per-connection toxic adds: far above a loopback round trip."""


@pytest.fixture
def echo_port() -> Iterator[int]:
    """An echo server on threads that keeps its side open after the client's
    FIN (so a client's half-close stays visible) until the test ends."""
    with threaded_echo(hold_after_eof=True) as port:
        yield port


def roundtrip(sock: socket.socket, payload: bytes) -> float:
    """Send ``payload``, read its echo whole; the seconds it took."""
    started = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "closed"
        got += chunk
    assert got == payload
    return time.monotonic() - started


def client_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def listen_port(api: Api) -> int:
    status, shown = api.request("GET", "/proxies/default")
    assert status == 200, shown
    return int(shown["listen"].rsplit(":", 1)[1])


def by_client(api: Api, **headers: str) -> dict[str, dict[str, Any]]:
    status, rows = api.request("GET", "/connections", headers=headers)
    assert status == 200, rows
    return {row["client"]: row for row in rows}


def sees_close(sock: socket.socket) -> str:
    """How the client learns its connection ended: ``fin`` or ``reset``."""
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    return "fin"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midway", "connections", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_the_table_shows_what_an_upstream_name_resolved_to(echo_port: int) -> None:
    """``midway connections`` with an upstream given by name: the UPSTREAM_ADDR
    column is the API's ``upstream_addr``, the loopback address that accepted."""
    with proxy_process("127.0.0.1:0", f"localhost:{echo_port}", "--admin",
                       "127.0.0.1:0") as proxy:
        api = Api(proxy)
        with socket.create_connection(("127.0.0.1", listen_port(api)), timeout=10) as sock:
            roundtrip(sock, b"x" * 100)
            [row] = by_client(api).values()
            out = cli("--admin", f"127.0.0.1:{api.port}")
    assert out.returncode == 0, out.stderr
    head, line = out.stdout.splitlines()
    assert head.split()[4:6] == ["UPSTREAM", "UPSTREAM_ADDR"]
    assert line.split()[4:6] == [f"localhost:{echo_port}", row["upstream_addr"]]
    assert row["upstream_addr"] == f"127.0.0.1:{echo_port}"


def test_one_process_lists_kills_and_slows_single_connections(echo_port: int,
                                                              tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    auth = {"Authorization": "Bearer s3cret"}
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--admin", "127.0.0.1:0",
                       "--access-log", str(access_log), "--admin-token-file", str(token)) as proxy, \
            contextlib.ExitStack() as stack:
        api = Api(proxy)
        assert api.request("GET", "/connections")[0] == 401  # the admin token's rule
        status, shown = api.request("GET", "/proxies/default", headers=auth)
        port = int(shown["listen"].rsplit(":", 1)[1])
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
                 for _ in range(4)]
        sizes = [1000, 3000, 2000, 500]
        for sock, size in zip(socks, sizes, strict=True):
            roundtrip(sock, b"x" * size)
        socks[3].shutdown(socket.SHUT_WR)
        assert wait_until(lambda: by_client(api, **auth)[client_of(socks[3])]["state"]
                          == "half-closed by client", timeout=5)
        rows = by_client(api, **auth)
        assert len(rows) == 4
        for sock, size in zip(socks, sizes, strict=True):
            row = rows[client_of(sock)]
            assert (row["proxy"], row["worker"], row["upstream"]) == (
                "default", 1, f"127.0.0.1:{echo_port}")
            assert (row["bytes_up"], row["bytes_down"]) == (size, size)
            assert row["path"] in ("copy", "splice") and row["toxics"] == []
            assert row["age_s"] >= 0
        assert {rows[client_of(s)]["state"] for s in socks[:3]} == {"open"}
        ids = [rows[client_of(s)]["id"] for s in socks]
        assert api.request("GET", f"/connections/{ids[0]}", headers=auth)[1]["client"] == \
            client_of(socks[0])

        # The command line reads the same table, sorted; with the token from its file.
        out = cli("--admin", f"127.0.0.1:{api.port}", "--sort", "bytes",
                  "--admin-token-file", str(token))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["ID", "PROXY", "WORKER"]
        assert [int(line.split()[0]) for line in lines[1:]] == [ids[1], ids[2], ids[0], ids[3]]
        out = cli("--admin", f"127.0.0.1:{api.port}", "--sort", "age")
        assert out.returncode == 1 and "401" in out.stderr  # no token: refused, said
        out = subprocess.run([sys.executable, "-m", "midway", "connections", "--admin",
                              f"127.0.0.1:{api.port}", "--sort", "age"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "MIDWAY_ADMIN_TOKEN": "s3cret"})
        assert [int(line.split()[0]) for line in out.stdout.splitlines()[1:]] == ids
        # --proxy: one proxy's; a name no proxy has is a mistake, said as such.
        out = cli("--admin", f"127.0.0.1:{api.port}", "--proxy", "default",
                  "--admin-token-file", str(token))
        assert out.returncode == 0 and len(out.stdout.splitlines()) == 5, out.stderr
        out = cli("--admin", f"127.0.0.1:{api.port}", "--proxy", "defualt",
                  "--admin-token-file", str(token))
        assert out.returncode == 1 and out.stdout == ""
        assert "no proxy named 'defualt' (proxies: default)" in out.stderr
        assert "Traceback" not in out.stderr

        # A toxic on one connection slows that one alone.
        status, toxic = api.request("POST", f"/connections/{ids[2]}/toxics",
                                    {"type": "latency", "attributes": {"latency": 300}},
                                    headers=auth)
        assert status == 200 and toxic["name"] == "latency_downstream", toxic
        assert roundtrip(socks[2], b"slow") >= SLOW_S
        assert roundtrip(socks[1], b"fast") < SLOW_S
        with socket.create_connection(("127.0.0.1", port), timeout=10) as late:
            assert roundtrip(late, b"new") < SLOW_S
            late_client = client_of(late)  # closed: half-closed by client (echo holds its side)
        row = api.request("GET", f"/connections/{ids[2]}", headers=auth)[1]
        assert (row["toxics"], row["path"]) == (["latency_downstream"], "chain")
        assert api.request("POST", f"/connections/{ids[2]}/toxics", {"type": "latency"},
                           headers=auth)[0] == 409

        # Killing one leaves its neighbours flowing; with ?reset=true the client sees an RST.
        time.sleep(1.1)  # quiet for longer than FLOWING_S: a FIN, not a reset
        assert api.request("DELETE", f"/connections/{ids[0]}", headers=auth)[0] == 204
        assert sees_close(socks[0]) == "fin"
        roundtrip(socks[1], b"still here")
        assert api.request("DELETE", f"/connections/{ids[1]}?reset=true", headers=auth)[0] == 204
        assert sees_close(socks[1]) == "reset"
        assert roundtrip(socks[2], b"neighbour") >= SLOW_S
        status, error = api.request("GET", f"/connections/{ids[0]}", headers=auth)
        assert (status, error) == (404, {"error": "connection not found", "status": 404})
        assert api.request("DELETE", f"/connections/{ids[0]}", headers=auth)[0] == 404
        assert api.request("DELETE", "/connections/nope", headers=auth)[0] == 404
        assert wait_until(lambda: len(records(access_log)) >= 2, timeout=5)
        killed = {r["id"]: r for r in records(access_log) if r["reason"] == "killed"}
        assert set(killed) == {ids[0], ids[1]}
        assert killed[ids[1]]["bytes_up"] == 3000 + len(b"fast") + len(b"still here")
        assert set(by_client(api, **auth)) == {client_of(socks[2]), client_of(socks[3]),
                                               late_client}


@pytest.mark.one_mode
def test_workers_2_connections_of_both_workers_are_listed_and_steered(echo_port: int,
                                                                      tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    with supervised("127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2",
                    "--admin", "127.0.0.1:0", "--access-log", str(access_log)) as (proxy, _), \
            contextlib.ExitStack() as stack:
        both_up(proxy)
        api = Api(proxy)
        port = listen_port(api)
        socks = []
        # The kernel spreads connections over the workers by their addresses:
        # open them until both workers hold some (bounded).
        for i in range(64):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            roundtrip(sock, b"%d" % i * 100)
            socks.append(sock)
            if i >= 7 and len({r["worker"] for r in by_client(api).values()}) == 2:
                break
        rows = by_client(api)
        assert set(rows) == {client_of(s) for s in socks}
        assert {r["worker"] for r in rows.values()} == {1, 2}
        assert len({r["id"] for r in rows.values()}) == len(socks)  # unique across workers
        for i, sock in enumerate(socks):
            row = rows[client_of(sock)]
            assert row["proxy"] == "default"
            assert row["bytes_up"] == row["bytes_down"] == len(b"%d" % i * 100)
        status, only = api.request("GET", "/connections?proxy=default")
        assert status == 200 and len(only) == len(socks)
        assert api.request("GET", "/connections?proxy=other")[1] == []
        on = {w: [s for s in socks if rows[client_of(s)]["worker"] == w] for w in (1, 2)}

        # A toxic on one connection of worker 2 slows it alone.
        slow = on[2][0]
        status, _ = api.request("POST", f"/connections/{rows[client_of(slow)]['id']}/toxics",
                                {"type": "latency", "attributes": {"latency": 300}})
        assert status == 200
        assert roundtrip(slow, b"slow") >= SLOW_S
        assert all(roundtrip(s, b"fast") < SLOW_S for s in socks if s is not slow)

        # Listed and removed through the supervisor: the connection is fast again.
        slow_id = rows[client_of(slow)]["id"]
        status, own = api.request("GET", f"/connections/{slow_id}/toxics")
        assert status == 200 and [t["name"] for t in own] == ["latency_downstream"], own
        assert api.request("DELETE", f"/connections/{slow_id}/toxics/latency_downstream")[0] == 204
        assert roundtrip(slow, b"fast again") < SLOW_S
        assert api.request("GET", f"/connections/{slow_id}/toxics") == (200, [])
        assert api.request("DELETE", f"/connections/{slow_id}/toxics/latency_downstream") == (
            404, {"error": "toxic not found", "status": 404})

        # Killing one of worker 1's leaves every neighbour (on both workers) flowing.
        victim = on[1][0]
        victim_id = rows[client_of(victim)]["id"]
        assert api.request("DELETE", f"/connections/{victim_id}?reset=true")[0] == 204
        assert sees_close(victim) == "reset"
        for s in socks:
            if s is not victim:
                roundtrip(s, b"after")
        assert wait_until(lambda: any(r["reason"] == "killed" for r in records(access_log)),
                          timeout=5)
        (record,) = [r for r in records(access_log) if r["reason"] == "killed"]
        assert (record["id"], record["worker"]) == (victim_id, 1)
        assert api.request("GET", f"/connections/{victim_id}")[0] == 404
        assert client_of(victim) not in by_client(api)
        assert len(by_client(api)) == len(socks) - 1


@pytest.mark.one_mode
def test_midway_connections_says_when_the_admin_api_cannot_be_reached() -> None:
    port = free_port()
    out = cli("--admin", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert out.stderr.strip() == (f"midway connections: cannot reach the admin API at "
                                  f"127.0.0.1:{port}: connection refused")
    assert out.stdout == ""

