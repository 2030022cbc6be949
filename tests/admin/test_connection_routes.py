"""The ``/connections`` routes in this process, over a worker's agent with a real
loopback connection: an id in the path is plain ASCII decimal, anything else
(``²``, Arabic-Indic digits, thousands of digits) is ``connection not found``
in JSON, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from midway.admin.routes import ToxiproxyAPI
from midway.config.load import config_from_dict
from midway.config.target import Target
from midway.control.agent import WorkerAgent
from midway.control.commands import LocalHandle
from midway.control.plane import ControlPlane
from midway.control.process import SingleFleet

from ..helpers import read_exactly, run, serve

NOT_FOUND = {"error": "connection not found", "status": 404}


@asynccontextmanager
async def one_connection(host: str = "127.0.0.1") -> AsyncIterator[tuple[
        ToxiproxyAPI, int, asyncio.StreamReader, asyncio.StreamWriter]]:
    """The API over one worker whose proxy ``p`` (to an echo server on 127.0.0.1,
    at ``host``) holds one open connection; yields the API, that connection's id
    and its two ends."""
    async with serve() as echo:
        config = config_from_dict({"proxy": {"p": {"listen": "127.0.0.1:0",
                                                   "upstreams": f"{host}:{echo}"}}})
        agent = WorkerAgent(Target(config))
        await agent.start()
        try:
            api = ToxiproxyAPI(ControlPlane(agent.running(), SingleFleet(LocalHandle(agent))))
            host, _, port = agent.runtime.services["p"].addresses[0].rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            (row,) = json.loads((await api.handle("GET", "/connections")).body)
            try:
                yield api, row["id"], reader, writer
            finally:
                writer.close()
        finally:
            await agent.runtime.shutdown(0)


async def answer(api: ToxiproxyAPI, method: str, path: str,
                 body: Any = None) -> tuple[int, Any]:
    response = await api.handle(method, path, b"" if body is None else json.dumps(body).encode())
    return response.status, json.loads(response.body) if response.body else None


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("DELETE", ""), ("POST", "/toxics")])
def test_an_id_that_is_not_ascii_decimal_is_connection_not_found(method: str,
                                                                 suffix: str) -> None:
    async def scenario() -> None:
        async with one_connection() as (api, id, _, _):
            assert id < 10
            eastern = "٠١٢٣٤٥٦٧٨٩"[id]  # str.isdigit() takes it, int() reads it as id
            for text in ("²", "1²", eastern, "%C2%B2", "1" * 5000, "1" * 21, "0", "-1",
                         " 1", "1.0"):
                assert await answer(api, method, f"/connections/{text}{suffix}",
                                    {"type": "latency"}) == (404, NOT_FOUND), text
            status, _ = await answer(api, "GET", f"/connections/{id}")
            assert status == 200  # the connection is there, under its own id

    run(scenario())


def test_a_connection_to_a_name_shows_the_address_it_resolved_to() -> None:
    async def scenario() -> None:
        async with one_connection("localhost") as (api, id, reader, writer):
            status, row = await answer(api, "GET", f"/connections/{id}")
            port = row["upstream"].rpartition(":")[2]
            assert (status, row["upstream"], row["upstream_addr"]) == (
                200, f"localhost:{port}", f"127.0.0.1:{port}")
    run(scenario())


def test_a_connections_own_toxic_is_listed_and_removed_live_with_nothing_lost() -> None:
    async def scenario() -> None:
        async with one_connection() as (api, id, reader, writer):
            assert await answer(api, "GET", f"/connections/{id}/toxics") == (200, [])
            status, toxic = await answer(api, "POST", f"/connections/{id}/toxics",
                                         {"type": "blackhole", "name": "cable"})
            assert status == 200, toxic
            assert await answer(api, "GET", f"/connections/{id}/toxics") == (200, [toxic])
            writer.write(b"held back")  # the echo's answer is held by the blackhole
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.3)

            assert await answer(api, "DELETE", f"/connections/{id}/toxics/cable") == (204, None)
            assert await read_exactly(reader, 9) == b"held back"  # flushed, in order
            assert await answer(api, "GET", f"/connections/{id}/toxics") == (200, [])
            status, row = await answer(api, "GET", f"/connections/{id}")
            assert (status, row["toxics"]) == (200, [])
            writer.write(b"goes on")
            assert await read_exactly(reader, 7) == b"goes on"

            # Gone, never there, or the proxy's: said in words.
            assert await answer(api, "DELETE", f"/connections/{id}/toxics/cable") == (
                404, {"error": "toxic not found", "status": 404})
            assert (await answer(api, "POST", "/proxies/p/toxics", {"type": "noop"}))[0] == 200
            status, error = await answer(api, "DELETE", f"/connections/{id}/toxics/noop_downstream")
            assert status == 409 and "DELETE /proxies/p/toxics/noop_downstream" in error["error"]
            status, listed = await answer(api, "GET", "/proxies/p/toxics")
            assert [t["name"] for t in listed] == ["noop_downstream"]  # left alone
            for path in (f"/connections/{id + 100}/toxics/cable", "/connections/²/toxics/cable"):
                assert await answer(api, "DELETE", path) == (404, NOT_FOUND)
            assert await answer(api, "GET", f"/connections/{id + 100}/toxics") == (404, NOT_FOUND)

    run(scenario())


@pytest.mark.parametrize("toxic", [{"type": "noop", "name": "n"},
                                   {"type": "latency", "name": "n", "toxicity": 0.0,
                                    "attributes": {"latency": 10_000}}])
def test_a_connections_own_toxic_that_does_not_apply_is_listed_removable_and_harmless(
        toxic: dict[str, Any]) -> None:
    """A ``noop``, or a toxicity roll that leaves the connection out, still is one
    of its toxics (as Toxiproxy lists a toxic whatever its toxicity): answered,
    listed, in the way of a second one of its name, and removed."""
    async def scenario() -> None:
        async with one_connection() as (api, id, reader, writer):
            status, added = await answer(api, "POST", f"/connections/{id}/toxics", toxic)
            assert status == 200, added
            assert await answer(api, "GET", f"/connections/{id}/toxics") == (200, [added])
            assert (await answer(api, "POST", f"/connections/{id}/toxics", toxic))[0] == 409
            writer.write(b"unharmed")
            assert await read_exactly(reader, 8, timeout=2) == b"unharmed"
            assert await answer(api, "DELETE", f"/connections/{id}/toxics/n") == (204, None)
            assert await answer(api, "GET", f"/connections/{id}/toxics") == (200, [])

    run(scenario())
