"""Reload as an operator sees it (``midway --config FILE`` and SIGHUP or ``POST
/reload``): under live streams and a steady stream of new connections, twenty
reloads that change the upstreams and a timeout drop nothing, refuse nothing and
corrupt nothing; a broken file changes nothing and names the key; a removed
proxy drains; an edited hook module is imported anew."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import helpers
from ..helpers import (
    ProxyProcess,
    needs,
    proxy_process,
    run,
    serve,
    threaded_echo,
    wait_until,
)

LIVE_STREAMS = 200
"""Connections open through every reload, each echoing a chunk every
:data:`STREAM_PAUSE_S` (what a 2-core machine shared with other jobs bears;
the issue's 1000 is the same test with this raised)."""
CHUNK = 1024
STREAM_PAUSE_S = 0.05
RELOADS = 20
CHURN_LOOPS = 4
"""Loops that each open, use and close one new connection after another."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(path: Path, proxies: dict[str, dict[str, Any]],
                 server: dict[str, Any] | None = None) -> None:
    """A TOML file with ``[server]`` and one ``[proxy.NAME]`` table each; the
    data path follows the test's mode."""
    lines = ["[server]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (server or {}).items()]
    lines += ["[defaults]", f"splice = {toml_value(helpers.MODE.path == 'splice')}"]
    for name, table in proxies.items():
        lines.append(f"[proxy.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


def count(proxy: ProxyProcess, text: str) -> int:
    return sum(text in line for line in list(proxy.stderr_lines))


def reload(proxy: ProxyProcess, done_before: int) -> None:
    """SIGHUP, then wait for the reload to be logged as done."""
    proxy.signal(signal.SIGHUP)
    assert wait_until(lambda: count(proxy, "reload: done") > done_before, timeout=20), \
        proxy.stderr_text()


def port_of(proxy: ProxyProcess, name: str) -> int:
    """Where proxy ``name`` listens, from its 'listening on' line."""
    assert wait_until(lambda: count(proxy, f"{name}: listening on") > 0, timeout=10)
    line = next(line for line in proxy.stderr_lines if f"{name}: listening on" in line)
    return int(re.search(r"listening on \S*:(\d+),", line)[1])  # type: ignore[index]


def admin_port(proxy: ProxyProcess) -> int:
    assert wait_until(lambda: count(proxy, "admin API") > 0, timeout=10)
    line = next(line for line in proxy.stderr_lines if "admin API" in line)
    return int(line.rsplit(":", 1)[1])


def post(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, headers={"User-Agent": "midway-tests"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return exchange(sock, payload)


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A blocking echo server on threads, one per connection."""
    with threaded_echo() as port:
        yield port


# -- twenty reloads under load ------------------------------------------------------


@pytest.mark.timeout(300)
def test_twenty_reloads_under_load_drop_refuse_and_corrupt_nothing(tmp_path: Path) -> None:
    config = tmp_path / "midway.toml"
    accepted = {"a": 0, "b": 0}

    def echo_counting(name: str) -> Any:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted[name] += 1
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
            except ConnectionError:
                pass
            finally:
                writer.close()
        return handler

    async def scenario() -> None:
        async with serve(echo_counting("a")) as port_a, serve(echo_counting("b")) as port_b:
            a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
            rotation = [[a, b], [b], [a]]  # the last of the twenty is [b]
            assert rotation[(RELOADS - 1) % 3] == [b]

            def web(i: int) -> dict[str, Any]:
                return {"listen": "127.0.0.1:0" if i < 0 else f"127.0.0.1:{port}",
                        "upstreams": rotation[i % 3] if i >= 0 else [a],
                        "connect_timeout_s": 1.0 + i / 10 if i >= 0 else 5.0}

            write_config(config, {"web": web(-1)})
            proxy = ProxyProcess("--config", str(config))
            try:
                port = proxy.port
                await under_load(proxy, port, lambda i: write_config(config, {"web": web(i)}))
                # The last file says upstream b alone: new connections go there.
                before = dict(accepted)
                for _ in range(10):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"x")
                    assert await reader.readexactly(1) == b"x"
                    writer.close()
                assert accepted["b"] == before["b"] + 10 and accepted["a"] == before["a"]
                proxy.signal(signal.SIGTERM)
                assert await asyncio.to_thread(proxy.wait, 30) == 0
            finally:
                proxy.stop()
            assert "Traceback" not in proxy.stderr_text()

    run(scenario(), timeout=240)


async def under_load(proxy: ProxyProcess, port: int, rewrite: Any) -> None:
    done = asyncio.Event()
    connected = 0
    all_connected = asyncio.Event()

    async def stream(index: int) -> tuple[str, str, int]:
        nonlocal connected
        rng = random.Random(index)
        sent, received = hashlib.sha256(), hashlib.sha256()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        chunks = 0
        first = True
        while first or not done.is_set():
            chunk = rng.randbytes(CHUNK)
            sent.update(chunk)
            writer.write(chunk)
            received.update(await asyncio.wait_for(reader.readexactly(CHUNK), 30))
            chunks += 1
            progress[index] = chunks
            if first:
                first = False
                connected += 1
                if connected == LIVE_STREAMS:
                    all_connected.set()
            await asyncio.sleep(STREAM_PAUSE_S)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 30)
        received.update(rest)
        writer.close()
        return sent.hexdigest(), received.hexdigest(), chunks

    progress = [0] * LIVE_STREAMS
    """Round trips each stream has made so far."""
    refused = 0
    served = 0

    async def churn(index: int) -> None:
        nonlocal refused, served
        payload = b"%d" % index * 32
        while not done.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                refused += 1
                continue
            writer.write(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            assert got == payload
            writer.close()
            served += 1

    streams = [asyncio.create_task(stream(i)) for i in range(LIVE_STREAMS)]
    async with asyncio.timeout(60):
        await all_connected.wait()
    churners = [asyncio.create_task(churn(i)) for i in range(CHURN_LOOPS)]
    for i in range(RELOADS):
        rewrite(i)
        done_before = count(proxy, "reload: done")
        await asyncio.to_thread(reload, proxy, done_before)
        await asyncio.sleep(0.05)  # new connections between the reloads too
    # Every stream was open before the first reload (all_connected); it lived
    # through them all if it makes one more round trip after the last.
    after_last = list(progress)
    async with asyncio.timeout(30):
        while any(now <= then for now, then in zip(progress, after_last, strict=True)):
            await asyncio.sleep(0.05)
    done.set()
    results = await asyncio.gather(*streams)
    await asyncio.gather(*churners)
    for sent, received, chunks in results:
        assert sent == received
        assert chunks >= 2  # one before the first reload, one after the last
    assert refused == 0
    assert served > RELOADS
    assert count(proxy, "reload: done") == RELOADS


# -- a broken file, a removed proxy, a hook edited ------------------------------------


@pytest.mark.one_mode
@pytest.mark.parametrize(("broken", "key"), [
    ({"connect_timeout_s": "soon"}, "proxy.web.connect_timeout_s"),
    ({"health": {"send_hex": "04 d2 16 2"}}, "proxy.web.health.send_hex: '04 d2 16 2'"),
], ids=["timeout", "health-hex"])
def test_a_broken_file_changes_nothing_and_names_the_key(tmp_path: Path, echo_port: int,
                                                        broken: dict[str, Any], key: str) -> None:
    config = tmp_path / "midway.toml"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}"}
    write_config(config, {"web": web}, {"admin": "127.0.0.1:0"})
    with proxy_process("--config", str(config)) as proxy:
        port, api = port_of(proxy, "web"), admin_port(proxy)
        write_config(config, {"web": {**web, "listen": f"127.0.0.1:{port}", **broken}},
                     {"admin": "127.0.0.1:0"})
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: count(proxy, "still running the previous configuration"))
        line = next(line for line in proxy.stderr_lines if "reload: " in line and "ERROR" in line)
        assert key in line, line
        assert roundtrip(port) == b"ping"
        # The API answers the same error, as JSON, and nothing changed either.
        status, body = post(api, "/reload")
        assert status == 400 and body["status"] == 400
        assert key in body["error"]
        config.write_text("[proxy.web\n")  # not even TOML
        status, body = post(api, "/reload")
        assert status == 400 and "midway.toml" in body["error"], body
        assert roundtrip(port) == b"ping"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
    assert "Traceback" not in proxy.stderr_text()


@pytest.mark.one_mode
def test_an_address_in_use_changes_nothing_and_says_so(tmp_path: Path, echo_port: int) -> None:
    """A listen address another program holds is found only when binding: the
    reload is refused as a bad file is, with the same words."""
    config = tmp_path / "midway.toml"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}"}
    write_config(config, {"web": web})
    with socket.create_server(("127.0.0.1", 0)) as other, \
            proxy_process("--config", str(config)) as proxy:
        port, taken = port_of(proxy, "web"), other.getsockname()[1]
        write_config(config, {"web": {**web, "listen": [f"127.0.0.1:{port}",
                                                          f"127.0.0.1:{taken}"]}})
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: count(proxy, f"reload: web: cannot listen on 127.0.0.1:{taken}:"
                                               " address already in use; still running the "
                                               "previous configuration")), proxy.stderr_text()
        assert roundtrip(port) == b"ping"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_onto_a_taken_address_says_nothing_changed(tmp_path: Path, echo_port: int,
                                                            workers: str) -> None:
    """A file whose new listen address another program holds is refused, and
    said as every refused reload is: the log line ends 'still running the
    previous configuration' and the API's error begins 'reload: ' (neither
    did), and with workers as in one process ('proxy web: ...' there)."""
    config = tmp_path / "midway.toml"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}"}
    server = {"admin": "127.0.0.1:0", "workers": int(workers)}
    write_config(config, {"web": web}, server)
    with proxy_process("--config", str(config)) as proxy, \
            socket.create_server(("127.0.0.1", 0)) as taken:
        port, api = port_of(proxy, "web"), admin_port(proxy)
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        write_config(config, {"web": {**web, "listen": busy}}, server)
        status, body = post(api, "/reload")
        assert (status, body) == (500, {"error": f"reload: web: cannot listen on {busy}: "
                                                 "address already in use", "status": 500})
        assert wait_until(lambda: count(proxy, "still running the previous configuration"))
        assert roundtrip(port) == b"ping"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
@pytest.mark.parametrize("workers", [1, 2])
def test_an_address_moves_between_proxies_in_either_order_of_the_file(
        tmp_path: Path, echo_port: int, workers: int) -> None:
    """One proxy gives up a listen address that another takes, whichever comes
    first in the file: the reload binds it after it is freed (it failed with
    'address already in use' when the taker came first), and back again."""
    config = tmp_path / "midway.toml"
    upstream = f"127.0.0.1:{echo_port}"
    moving, first, second = (helpers.free_port() for _ in range(3))

    def write(holder: str) -> None:
        write_config(config, {
            name: {"listen": [f"127.0.0.1:{own}", *([f"127.0.0.1:{moving}"]
                                                     if name == holder else [])],
                   "upstreams": upstream}
            for name, own in (("a", first), ("b", second))}, {"workers": workers})

    write("b")
    with proxy_process("--config", str(config)) as proxy:
        assert wait_until(lambda: count(proxy, "b: listening on") == workers * 2, timeout=15)
        done = 0
        for holder in ("a", "b", "a"):  # from b to a (a first in the file), back, again
            write(holder)
            reload(proxy, done)
            done += 1
            assert count(proxy, "already in use") == 0, proxy.stderr_text()
            assert roundtrip(moving) == b"ping"
            assert wait_until(lambda h=holder: count(proxy, f"{h}: listening on 127.0.0.1:"
                                                            f"{moving}") > 0)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
def test_a_removed_proxy_drains_then_is_closed(tmp_path: Path, echo_port: int) -> None:
    config, access_log = tmp_path / "midway.toml", tmp_path / "access.log"
    upstream = f"127.0.0.1:{echo_port}"
    server = {"drain_timeout_s": 2, "access_log": str(access_log)}
    write_config(config, {"web": {"listen": "127.0.0.1:0", "upstreams": upstream},
                          "old": {"listen": "127.0.0.1:0", "upstreams": upstream}}, server)
    with proxy_process("--config", str(config)) as proxy:
        web_port, old_port = port_of(proxy, "web"), port_of(proxy, "old")
        with socket.create_connection(("127.0.0.1", old_port), timeout=10) as live:
            assert exchange(live, b"before") == b"before"
            write_config(config, {"web": {"listen": f"127.0.0.1:{web_port}",
                                          "upstreams": upstream}}, server)
            reload(proxy, 0)
            assert refused(old_port)  # it stopped accepting at once ...
            assert exchange(live, b"during") == b"during"  # ... and drains
            assert roundtrip(web_port) == b"ping"
            live.settimeout(10)
            assert live.recv(100) == b""  # closed at the drain timeout
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
    records = [json.loads(line) for line in access_log.read_text().splitlines()]
    old = [r for r in records if r["proxy"] == "old"]
    assert [(r["reason"], r["detail"]) for r in old] == [("shutdown", "drain timeout")]
    assert 1.5 < old[0]["duration_s"] < 10


@pytest.mark.one_mode
@pytest.mark.parametrize("workers", [1, 2])
def test_a_sighup_while_draining_is_ignored(tmp_path: Path, echo_port: int,
                                            workers: int) -> None:
    """SIGTERM, then SIGHUP with a file that adds a proxy: midway is stopping, so
    the reload is not run (said in one line): the new proxy's port is not bound,
    where a client's handshake would complete and then hang until the exit."""
    config = tmp_path / "midway.toml"
    upstream = f"127.0.0.1:{echo_port}"
    server = {"drain_timeout_s": 30, "workers": workers}
    late = helpers.free_port()
    write_config(config, {"web": {"listen": "127.0.0.1:0", "upstreams": upstream}}, server)
    with proxy_process("--config", str(config)) as proxy:
        assert wait_until(lambda: count(proxy, "listening on") >= workers, timeout=30)
        if workers > 1:
            assert wait_until(lambda: count(proxy, "started 2 workers") > 0, timeout=30)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as live:
            assert exchange(live, b"before") == b"before"
            proxy.signal(signal.SIGTERM)
            assert wait_until(lambda: count(proxy, "draining 1 connection") > 0, timeout=10)
            write_config(config, {"web": {"listen": f"127.0.0.1:{proxy.port}",
                                          "upstreams": upstream},
                                  "late": {"listen": f"127.0.0.1:{late}",
                                           "upstreams": upstream}}, server)
            proxy.signal(signal.SIGHUP)
            assert wait_until(lambda: count(proxy, "SIGHUP while stopping: ignored") > 0,
                              timeout=10), proxy.stderr_text()
            assert refused(late)
            assert count(proxy, "reload: done") == 0
            assert exchange(live, b"during") == b"during"
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
def test_a_reload_imports_an_edited_hook_module_anew(tmp_path: Path, echo_port: int) -> None:
    hook = tmp_path / "tagger.py"
    hook.write_text("def on_data(direction, data, ctx):\n    return data.replace(b'x', b'A')\n")
    config = tmp_path / "midway.toml"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}",
           "hooks": ["tagger:on_data"]}
    write_config(config, {"web": web})
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    with proxy_process("--config", str(config), env=env) as proxy:
        port = proxy.port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as before:
            assert exchange(before, b"x") == b"A"
            # Same size, same second: only a fresh compile from the source sees it.
            hook.write_text(hook.read_text().replace("b'A'", "b'B'"))
            write_config(config, {"web": {**web, "listen": f"127.0.0.1:{port}"}})
            reload(proxy, 0)
            assert roundtrip(port, b"x") == b"B"
            assert exchange(before, b"x") == b"A"  # an open connection keeps its hook
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
def test_a_reloaded_hook_that_calls_sys_exit_is_refused_and_midway_goes_on(
        tmp_path: Path, echo_port: int) -> None:
    hook = tmp_path / "quitter.py"
    hook.write_text("def on_data(direction, data, ctx):\n    return None\n")
    config = tmp_path / "midway.toml"
    write_config(config, {"web": {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}",
                                  "hooks": [f"{hook}:on_data"]}})
    with proxy_process("--config", str(config)) as proxy:
        hook.write_text("import sys\nsys.exit(0)\n")
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: count(proxy, "SystemExit: 0") > 0, timeout=10), \
            proxy.stderr_text()
        assert "still running the previous configuration" in proxy.stderr_text()
        assert roundtrip(proxy.port) == b"ping"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
def test_sighup_without_a_file_changes_nothing(echo_port: int) -> None:
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo_port}") as proxy:
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: count(proxy, "there is no file to read again"))
        assert roundtrip(proxy.port) == b"ping"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
def test_toxics_of_a_reload_reach_open_connections(tmp_path: Path, echo_port: int) -> None:
    """Settings apply to new connections only; toxics, as through the API, to
    open ones too."""
    config = tmp_path / "midway.toml"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}"}
    write_config(config, {"web": web})
    with proxy_process("--config", str(config)) as proxy:
        port = proxy.port
        web["listen"] = f"127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as live:
            assert exchange(live, b"fast") == b"fast"
            config.write_text(config.read_text() + "[[proxy.web.toxics]]\n"
                              'type = "latency"\nattributes = { latency = 400 }\n')
            reload(proxy, 0)
            started = time.monotonic()
            assert exchange(live, b"slow") == b"slow"
            assert time.monotonic() - started >= 0.4
            write_config(config, {"web": web})
            reload(proxy, 1)
            started = time.monotonic()
            assert exchange(live, b"fast again") == b"fast again"
            assert time.monotonic() - started < 0.4
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
def test_what_needs_a_restart_is_said_and_kept(tmp_path: Path, echo_port: int) -> None:
    config = tmp_path / "midway.toml"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}"}
    write_config(config, {"web": web}, {"workers": 1})
    with proxy_process("--config", str(config)) as proxy:
        web["listen"] = f"127.0.0.1:{proxy.port}"
        write_config(config, {"web": web}, {"workers": 3, "drain_timeout_s": 1})
        reload(proxy, 0)
        line = next(line for line in proxy.stderr_lines if "server.workers" in line)
        assert "WARNING" in line and "restart midway to apply it" in line, line
        assert "changed from 1 to 3" in line
        assert roundtrip(proxy.port) == b"ping"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
def test_a_reload_that_changes_server_settings_says_so(tmp_path: Path, echo_port: int) -> None:
    """A reload changing only ``[server]`` keys (the process-wide limit, the
    access log's file) applies them and its done line names them, rather than
    saying the configuration is unchanged."""
    config, first, second = tmp_path / "midway.toml", tmp_path / "a.log", tmp_path / "b.log"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}"}
    write_config(config, {"web": web}, {"access_log": str(first)})
    with proxy_process("--config", str(config)) as proxy:
        web["listen"] = f"127.0.0.1:{proxy.port}"
        write_config(config, {"web": web}, {"access_log": str(second), "max_connections": 1})
        reload(proxy, 0)
        line = next(line for line in proxy.stderr_lines if "reload: done" in line)
        assert "changed [server] (max_connections, access_log)" in line, line
        assert "configuration unchanged" not in line, line
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as held:
            assert exchange(held, b"one") == b"one"
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=1) as waiting:
                waiting.sendall(b"two")
                with pytest.raises(TimeoutError):  # queued: the limit of 1 is in force
                    waiting.recv(3)
        assert wait_until(lambda: second.exists() and second.read_text().count("\n") >= 1)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


@pytest.mark.one_mode
@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_after_logrotate_writes_the_access_log_and_dump_at_their_paths(
        tmp_path: Path, echo_port: int, workers: int) -> None:
    """logrotate renames the access log and the dump file, then reloads (its
    postrotate `kill -HUP`): the lines that follow go to new files at the paths,
    not to the renamed ones."""
    config, access_log, dump = tmp_path / "midway.toml", tmp_path / "access.log", tmp_path / "dump"
    web = {"listen": "127.0.0.1:0", "upstreams": f"127.0.0.1:{echo_port}",
           "dump_file": str(dump)}
    server = {"access_log": str(access_log), "workers": workers, "admin": "127.0.0.1:0"}
    write_config(config, {"web": web}, server)

    def lines(path: Path, text: str = "") -> int:
        return sum(text in line for line in path.read_text().splitlines()) if path.exists() else 0

    with proxy_process("--config", str(config)) as proxy:
        port, api = port_of(proxy, "web"), admin_port(proxy)
        for _ in range(4):
            assert roundtrip(port) == b"ping"
        assert wait_until(lambda: lines(access_log) == 4 and lines(dump, " close") == 4)
        for path in (access_log, dump):
            path.rename(f"{path}.1")
        reload(proxy, 0)
        assert post(api, "/reload")[0] == 200  # the API's reload alike
        for _ in range(6):
            assert roundtrip(port) == b"ping"
        assert wait_until(lambda: lines(access_log) == 6 and lines(dump, " close") == 6)
        assert lines(tmp_path / "access.log.1") == 4
        assert lines(tmp_path / "dump.1", " open: ") == 4
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0


# -- a user's run: wrk through two workers while the file changes -------------------

NGINX, WRK = shutil.which("nginx"), shutil.which("wrk")


@contextlib.contextmanager
def nginx_servers(tmp_path: Path, n: int, body_file: Path) -> Iterator[list[str]]:
    """``n`` nginx servers (one process each), answering ``GET /`` with their
    name and ``GET /big`` with ``body_file``; yields their addresses."""
    procs, addresses = [], []
    try:
        for i in range(n):
            root = tmp_path / f"nginx{i}"
            root.mkdir()
            port = helpers.free_port()
            temp = " ".join(f"{kind}_temp_path {root};" for kind in
                            ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            (root / "nginx.conf").write_text(
                f"daemon off; master_process off; pid {root}/nginx.pid;\n"
                f"error_log {root}/error.log;\nevents {{ worker_connections 1024; }}\n"
                f"http {{ access_log off; {temp}\n"
                f"  server {{ listen 127.0.0.1:{port};\n"
                f'    location / {{ return 200 "nginx{i}\\n"; }}\n'
                f"    location /big {{ alias {body_file}; }} }} }}\n")
            procs.append(subprocess.Popen([str(NGINX), "-c", str(root / "nginx.conf")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            addresses.append(f"127.0.0.1:{port}")
        for address in addresses:
            assert wait_until(lambda a=address: not refused(int(a.rsplit(":", 1)[1])), 10)
        yield addresses
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def slow_download(port: int, size: int, out: dict[str, Any]) -> None:
    """GET /big read in small pieces over seconds; ``out`` gets its sha256."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        body = bytearray(data.split(b"\r\n\r\n", 1)[1])
        while chunk := sock.recv(32768):
            body += chunk
            time.sleep(0.04)  # about 8 s for 6 MiB: open through every reload
    out["sha256"], out["size"] = hashlib.sha256(body).hexdigest(), len(body)
    out["done_at"] = time.monotonic()
    assert out["size"] == size


@pytest.mark.one_mode
@pytest.mark.timeout(120)
@pytest.mark.skipif(not NGINX or not WRK, reason=needs("nginx and wrk", apt="nginx-light wrk"))
def test_reloads_with_two_workers_under_wrk_fail_no_request(tmp_path: Path) -> None:
    """``workers = 2``, wrk running through midway to nginx servers, and a slow
    download open; the file is changed and reloaded (SIGHUP and ``POST
    /reload``): a weight, an upstream added, one removed, a timeout, a broken
    file (refused, logged, the old config serving on).  wrk sees no socket error
    and no non-2xx answer, the download arrives whole, every upstream of the
    last file serves, and a removed one gets no new connection."""
    body = random.Random(7).randbytes(6 << 20)
    big = tmp_path / "big.bin"
    big.write_bytes(body)
    config = tmp_path / "midway.toml"
    server = {"workers": 2, "admin": "127.0.0.1:0",
              "access_log": str(tmp_path / "access.log")}
    with nginx_servers(tmp_path, 3, big) as (a, b, c):
        write_config(config, {"web": {"listen": "127.0.0.1:0", "upstreams": [a, b]}}, server)
        with proxy_process("--config", str(config)) as proxy:
            port, api = port_of(proxy, "web"), admin_port(proxy)
            assert wait_until(lambda: count(proxy, "started 2 workers") > 0, 20)

            def web(upstreams: list[Any], **more: Any) -> None:
                write_config(config, {"web": {"listen": f"127.0.0.1:{port}",
                                              "upstreams": upstreams, **more}}, server)

            wrk = subprocess.Popen([str(WRK), "-t1", "-c20", "-d10s", f"http://127.0.0.1:{port}/"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            download: dict[str, Any] = {}
            downloader = threading.Thread(target=slow_download,
                                          args=(port, len(body), download))
            try:
                downloader.start()
                time.sleep(1)
                steps: list[tuple[list[Any], dict[str, Any]]] = [
                    ([f"{a},weight=3", b], {}),
                    ([f"{a},weight=3", b, c], {}),
                    ([b, c], {}),
                    ([b, c], {"connect_timeout_s": 2, "idle_timeout_s": 120}),
                ]
                for i, (upstreams, more) in enumerate(steps):
                    done = count(proxy, "reload: done")
                    web(upstreams, **more)
                    if i % 2:
                        assert post(api, "/reload")[0] == 200
                    else:
                        reload(proxy, done)
                    time.sleep(1)
                web([f"{b},weight=300", c])
                refusals = count(proxy, "still running the previous configuration")
                proxy.signal(signal.SIGHUP)
                assert wait_until(lambda: count(
                    proxy, "still running the previous configuration") > refusals, 20)
                status, answer = post(api, "/reload")
                assert status == 400 and "proxy.web.upstreams[0].weight" in answer["error"]
                web([b, c])
                reloads_done_at = time.monotonic()
                out, _ = wrk.communicate(timeout=30)
                downloader.join(30)
            finally:
                if wrk.poll() is None:
                    wrk.kill()
                    wrk.wait(10)
            assert wrk.returncode == 0, out
            assert re.search(r"\d+ requests in", out), out
            assert "Socket errors" not in out and "Non-2xx" not in out, out
            assert download.get("sha256") == hashlib.sha256(body).hexdigest()
            assert download["done_at"] > reloads_done_at  # it was open through them all
            # The last good file is in force: c serves, a (removed) gets nothing new.
            served = [roundtrip_http(port) for _ in range(20)]
            assert set(served) == {b"nginx1\n", b"nginx2\n"}, served
            proxy.signal(signal.SIGTERM)
            assert proxy.wait(30) == 0
    assert "Traceback" not in proxy.stderr_text()


def roundtrip_http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1]
