"""A worker's agent in this process: a change that fails half way leaves what
ran before; a reload's rebuilt elements are retired, not dropped, while open
connections hold them, and keep their place in the chain."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from midway.chain.dump import DumpElement
from midway.chain.hooks import HookElement
from midway.chain.registry import build_elements, rebuild_elements
from midway.chain.toxics.base import Toxic
from midway.config.addresses import parse_address
from midway.config.load import config_from_dict
from midway.config.schema import Config, ProxyConfig, UpstreamConfig
from midway.config.target import Target
from midway.control.agent import WorkerAgent
from midway.control.commands import Apply, CommandFailed

from ..helpers import read_exactly, read_to_eof, run, serve


def proxy(name: str, **options: object) -> ProxyConfig:
    table = {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", **options}
    return config_from_dict({"proxy": {name: table}}).proxies[0]


def test_a_change_that_fails_half_way_leaves_what_ran_before() -> None:
    async def scenario() -> None:
        agent = WorkerAgent(Target(Config(proxies=(proxy("a"), proxy("b")))))
        await agent.start()
        before = agent.running()
        with socket.create_server(("127.0.0.1", 0)) as busy:
            taken = busy.getsockname()[1]
            a, b = before.config.proxies
            wanted = Target(dataclasses.replace(before.config, proxies=(
                dataclasses.replace(a, upstreams=(UpstreamConfig(parse_address("127.0.0.1:2", listen=False)),)),
                dataclasses.replace(b, listen=(parse_address(f"127.0.0.1:{taken}",
                                                             listen=True),)),
                proxy("c"),
            )))
            with pytest.raises(CommandFailed) as caught:
                await agent.execute(Apply(wanted))
        assert caught.value.status == 500 and caught.value.message.startswith("b: ")
        assert agent.running() == before  # a's upstream too: all or nothing
        assert sorted(agent.runtime.services) == ["a", "b"]
        await agent.runtime.shutdown(0)

    run(scenario())


def test_rebuilt_elements_keep_their_place_and_open_connections_keep_them() -> None:
    hooked = proxy("web", hooks=["examples.rewrite:rewrite"], dump="text",
                   toxics=[{"type": "latency", "name": "slow"}])
    current = build_elements(hooked)
    assert isinstance(current[0], HookElement) and isinstance(current[1], DumpElement)
    assert isinstance(current[2], Toxic)
    chain, retired = rebuild_elements(current, hooked, capture=False, dump=False,
                                      hooks=True, fresh=True)
    old_hook, new_hook = chain[0], chain[1]
    assert retired == [old_hook] and old_hook is current[0]
    assert isinstance(new_hook, HookElement) and new_hook is not old_hook
    assert chain[2:] == current[1:]  # the dump and the toxic as they were
    for element in chain:
        element.close()


def test_a_reload_swaps_the_dump_for_new_connections_only(tmp_path: object) -> None:
    async def scenario() -> None:
        async with serve() as port:
            web = proxy("web", upstreams=f"127.0.0.1:{port}", dump="text",
                        dump_file=str(tmp_path) + "/dump.txt")
            agent = WorkerAgent(Target(Config(proxies=(web,))))
            await agent.start()
            service = agent.runtime.services["web"]
            (address,) = service.addresses
            host, _, listen_port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(listen_port))
            writer.write(b"open")
            assert await reader.readexactly(4) == b"open"
            (old_dump,) = [e for e in service.elements if isinstance(e, DumpElement)]
            running = agent.running()
            changed = dataclasses.replace(running.config.proxies[0], dump="hex")
            await agent.execute(Apply(Target(dataclasses.replace(
                running.config, proxies=(changed,))), reload=True))
            dumps = [e for e in service.elements if isinstance(e, DumpElement)]
            assert dumps[0] is old_dump and len(dumps) == 2  # retired, still held
            assert service.retired == {old_dump}
            writer.write(b"more")
            assert await reader.readexactly(4) == b"more"  # the open one goes on
            writer.close()
            async with asyncio.timeout(5):
                while service.retired:  # its last connection closed: dropped
                    await asyncio.sleep(0.01)
            assert [e for e in service.elements if isinstance(e, DumpElement)] == dumps[1:]
            await agent.runtime.shutdown(0)

    run(scenario())


@pytest.mark.parametrize("changed", [{}, {"seed": 2}], ids=["bytes", "bytes-and-seed"])
def test_a_reload_that_changes_limit_data_keeps_its_count_on_open_connections(
        changed: dict[str, object]) -> None:
    # A new seed (or conditions) makes the reload replace the toxic rather than
    # update it in place: the count of bytes passed must go on all the same.
    def config(port: int, limit: int, **more: object) -> ProxyConfig:
        return proxy("p", upstreams=f"127.0.0.1:{port}", toxics=[
            {"type": "limit_data", "name": "cap", "seed": 1, "attributes": {"bytes": limit},
             **more}])

    async def scenario() -> None:
        async with serve() as port:
            agent = WorkerAgent(Target(Config(proxies=(config(port, 1000),))))
            await agent.start()
            host, _, listen_port = agent.runtime.services["p"].addresses[0].rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(listen_port))
            writer.write(b"a" * 500)
            assert await read_exactly(reader, 500) == b"a" * 500
            running = agent.running()
            lowered = dataclasses.replace(config(port, 600, **changed),
                                          listen=running.config.proxies[0].listen)
            await agent.execute(Apply(Target(dataclasses.replace(
                running.config, proxies=(lowered,))), reload=True))
            writer.write(b"b" * 500)
            assert await read_to_eof(reader) == b"b" * 100  # 500 + 100: closed at 600
            writer.close()
            reader, writer = await asyncio.open_connection(host, int(listen_port))
            writer.write(b"c" * 700)  # a new connection counts from 0
            assert await read_to_eof(reader) == b"c" * 600
            writer.close()
            await agent.runtime.shutdown(0)

    run(scenario())
