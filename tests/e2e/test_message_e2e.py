"""conditions.message end to end: a line protocol over real loopback sockets,
"reset the connection at the 3rd request".  The first two requests reach the
server and are answered; the third reaches it not at all and the client sees a
reset.  From each place a toxic comes from: Python, the command line, TOML and
the admin API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import midway

from .. import helpers
from ..admin.conftest import Admin
from ..helpers import proxy_process, run

pytestmark = pytest.mark.timeout(120)

REQUESTS = [b"GET alpha\r\n", b"GET beta\r\n", b"SET gamma 3\r\n"]


@contextlib.asynccontextmanager
async def line_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """Answers each line with ``+OK <n>``; yields (port, lines received)."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                received.append(line)
                writer.write(b"+OK %d\r\n" % len(received))
                await writer.drain()
        writer.close()

    async with helpers.serve(handle) as port:
        yield port, received


async def converse(port: int) -> tuple[list[bytes], str]:
    """Send the requests one at a time, each after the last reply; returns the
    replies and how the connection ended."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[bytes] = []
    ending = "open"
    try:
        for request in REQUESTS:
            writer.write(request)
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), 10)
            if not reply:
                ending = "eof"
                break
            replies.append(reply)
    except ConnectionResetError:
        ending = "reset"
    finally:
        writer.close()
    return replies, ending


def check(result: tuple[list[bytes], str], received: list[bytes]) -> None:
    replies, ending = result
    assert replies == [b"+OK 1\r\n", b"+OK 2\r\n"]
    assert ending == "reset"
    assert received == REQUESTS[:2]  # not one byte of the third reached the server


def test_python_api_resets_at_the_third_request() -> None:
    async def main() -> None:
        async with line_server() as (port, received):
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
                proxy.add_toxic("reset_peer", stream="upstream",
                                conditions={"message": 3, "framing": r"line:\r\n"})
                check(await converse(proxy.port), received)

    run(main())


def through_process(args_for: Callable[[int], list[str]],
                    setup: Callable[[helpers.ProxyProcess, int], int] | None = None) -> None:
    """The conversation through ``python -m midway ARGS`` (``args_for(port)``, the
    line server's port); ``setup(process, port)`` may return another port to
    talk to."""
    async def main() -> None:
        async with line_server() as (port, received):
            with proxy_process(*args_for(port)) as proxy:
                target = proxy.port
                if setup is not None:
                    target = await asyncio.to_thread(setup, proxy, port)
                check(await converse(target), received)

    run(main())


@pytest.mark.one_mode
def test_command_line_resets_at_the_third_request() -> None:
    through_process(lambda port: ["127.0.0.1:0", f"127.0.0.1:{port}",
                                  "--toxic", "reset_peer:stream=upstream,message=3"])


@pytest.mark.one_mode
def test_config_file_resets_at_the_third_request(tmp_path: Path) -> None:
    config = tmp_path / "midway.toml"

    def args_for(port: int) -> list[str]:
        config.write_text(
            f'[proxy.lines]\nlisten = "127.0.0.1:0"\nupstreams = "127.0.0.1:{port}"\n'
            '[[proxy.lines.toxics]]\ntype = "reset_peer"\nstream = "upstream"\n'
            "conditions = { message = 3, framing = 'line:\\r\\n' }\n")
        return ["--config", str(config)]

    through_process(args_for)


@pytest.mark.one_mode
def test_admin_api_resets_at_the_third_request() -> None:

    def setup(process: helpers.ProxyProcess, upstream: int) -> int:
        api = Admin(process)
        created = api.post("/proxies", {"name": "lines", "listen": "127.0.0.1:0",
                                        "upstream": f"127.0.0.1:{upstream}"})
        assert created.status == 201, created.body
        toxic = api.post("/proxies/lines/toxics", {
            "type": "reset_peer", "stream": "upstream", "conditions": {"message": 3}})
        assert toxic.status == 200, toxic.body
        assert toxic.json["conditions"] == {"message": 3}
        return int(created.json["listen"].rsplit(":", 1)[1])

    through_process(lambda port: ["--admin", "127.0.0.1:0"], setup)
