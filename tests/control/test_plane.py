"""The control plane with fake workers, and the channel over a real socket pair:
a change every worker refused changes nothing, one a worker missed is in force
and names it (and the worker is sent back in step), changes never interleave,
and a worker's end closing fails every waiting call at once."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import Any

import pytest

from midway.admin.host import HostError
from midway.config.schema import Config, ProxyConfig
from midway.config.target import Edit, Target
from midway.control.channel import Channel, serve
from midway.control.commands import Applied, Apply, Command, CommandFailed, WorkerLost
from midway.control.plane import ControlPlane

from ..helpers import run


class FakeWorker:
    def __init__(self, number: int, answer: Any = None, delay: float = 0.0) -> None:
        self.number, self.pid = number, 1000 + number
        self.answer = answer
        self.delay = delay
        self.seen: list[Command] = []

    async def call(self, command: Command, timeout_s: float = 10.0) -> Any:
        self.seen.append(command)
        await asyncio.sleep(self.delay)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer if self.answer is not None else Applied()


class FakeFleet:
    def __init__(self, *workers: FakeWorker) -> None:
        self.workers = list(workers)
        self.lost_ones: list[tuple[int, str]] = []

    def handles(self) -> list[Any]:
        return list(self.workers)

    def reserve(self, target: Target) -> Target:
        return target

    def release(self, target: Target) -> None:
        pass

    def lost(self, handle: Any, why: str) -> None:
        self.lost_ones.append((handle.number, why))


def add(name: str) -> Any:
    def edit(target: Target) -> Edit:
        return Edit(target.with_proxy(ProxyConfig(name=name)))
    return edit


def names(target: Target) -> list[str]:
    return [p.name for p in target.config.proxies]


def test_refused_by_every_worker_changes_nothing() -> None:
    fleet = FakeFleet(FakeWorker(1, CommandFailed("web: address in use", 500)),
                      FakeWorker(2, CommandFailed("web: address in use", 500)))
    plane = ControlPlane(Target(Config()), fleet)
    with pytest.raises(HostError) as caught:
        run(plane.change(add("web")))
    assert (caught.value.status, caught.value.message) == (500, "web: address in use")
    assert names(plane.target) == [] and fleet.lost_ones == []


def test_a_worker_that_missed_it_is_named_and_sent_back_in_step() -> None:
    fleet = FakeFleet(FakeWorker(1), FakeWorker(2, WorkerLost("it exited before answering")))
    plane = ControlPlane(Target(Config()), fleet)
    with pytest.raises(HostError) as caught:
        run(plane.change(add("web")))
    assert caught.value.status == 503
    assert "worker 2 (pid 1002): it exited before answering" in caught.value.message
    assert names(plane.target) == ["web"]  # worker 1 serves it: it is in force
    assert fleet.lost_ones == [(2, "it exited before answering")]


def test_changes_are_made_one_at_a_time_each_from_the_last() -> None:
    fleet = FakeFleet(FakeWorker(1, delay=0.01), FakeWorker(2, delay=0.02))
    plane = ControlPlane(Target(Config()), fleet)

    async def many() -> None:
        await asyncio.gather(*(plane.change(add(f"p{i}")) for i in range(10)))

    run(many())
    assert sorted(names(plane.target)) == [f"p{i}" for i in range(10)]  # none lost
    sizes = [len(c.target.config.proxies) for c in fleet.workers[0].seen
             if isinstance(c, Apply)]
    assert sizes == list(range(1, 11))  # each one built on the one before


def test_ports_bound_by_the_workers_are_pinned_in_the_target() -> None:
    from midway.config.addresses import parse_address
    bound = (parse_address("127.0.0.1:43210", listen=True),)
    fleet = FakeFleet(FakeWorker(1, Applied({"web": bound})))
    plane = ControlPlane(Target(Config()), fleet)
    target = run(plane.change(lambda t: Edit(t.with_proxy(dataclasses.replace(
        ProxyConfig(name="web"), listen=(parse_address("127.0.0.1:0", listen=True),))))))
    web = target.proxy("web")
    assert web is not None and web.listen == bound


class Echoing:
    """A worker agent that answers each command after a pause (or refuses)."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def execute(self, command: Any) -> Any:
        await asyncio.sleep(0.01)
        self.order.append(command.name)
        if command.name == "refuse":
            raise CommandFailed("no", 409)
        return command.name.upper()


@dataclasses.dataclass(frozen=True)
class Named(Command):
    name: str


def test_the_channel_answers_in_order_and_fails_fast_when_the_worker_is_gone() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        agent = Echoing()
        reader, writer = await asyncio.open_connection(sock=theirs)
        worker = asyncio.create_task(serve(agent, reader, writer))
        channel = await Channel.open(ours, "worker 1")
        answers = await asyncio.gather(*(channel.call(Named(n), 5) for n in ("a", "b", "c")))
        assert answers == ["A", "B", "C"] and agent.order == ["a", "b", "c"]
        with pytest.raises(CommandFailed) as caught:
            await channel.call(Named("refuse"), 5)
        assert (caught.value.status, caught.value.message) == (409, "no")
        # The worker's end goes (the process died): a waiting call fails now,
        # not when its 30 s run out.
        pending = asyncio.create_task(channel.call(Named("slow"), 30))
        await asyncio.sleep(0)
        worker.cancel()
        writer.close()
        theirs.close()
        async with asyncio.timeout(2):
            with pytest.raises(WorkerLost):
                await pending
        with pytest.raises(WorkerLost):
            await channel.call(Named("after"), 5)
        channel.close()

    run(scenario())


def test_a_call_unanswered_in_time_is_a_lost_worker() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        channel = await Channel.open(ours, "worker 1")
        with pytest.raises(WorkerLost, match="no answer to Named within 0.1 s"):
            await channel.call(Named("x"), 0.1)
        channel.close()
        theirs.close()

    run(scenario())


def test_views_add_up_every_workers_upstreams_and_skip_one_that_is_gone() -> None:
    from midway.admin.host import ProxyView

    def view(active: int) -> dict[str, ProxyView]:
        entry = {"address": "a:1", "weight": 1, "backup": False, "state": "up",
                 "active": active, "connects": active, "connect_failures": 0,
                 "last_check": None}
        return {"web": ProxyView("web", True, ("127.0.0.1:80",), upstreams=(entry,))}

    fleet = FakeFleet(FakeWorker(1, view(3)), FakeWorker(2, view(4)))
    plane = ControlPlane(Target(Config()), fleet)
    assert run(plane.views(merged=True))["web"].upstreams[0]["active"] == 7
    fleet.workers.append(FakeWorker(3, WorkerLost("it exited before answering")))
    assert run(plane.views(merged=True))["web"].upstreams[0]["active"] == 7
    fleet.workers[:2] = []
    with pytest.raises(HostError) as caught:
        run(plane.views(merged=True))
    assert caught.value.status == 503 and "worker 3" in caught.value.message


def test_the_reload_log_says_what_changed() -> None:
    from midway.config.addresses import parse_address
    from midway.control.plane import reload_summary

    def proxy(name: str, **options: Any) -> ProxyConfig:
        return ProxyConfig(name=name, listen=(parse_address("127.0.0.1:0", listen=True),),
                           **options)

    web, cache = proxy("web"), proxy("cache")
    assert reload_summary([web], [web]) == "1 proxy: web; configuration unchanged"
    assert reload_summary([web, cache], [proxy("web", idle_timeout_s=5.0, retries=1),
                                         proxy("db")]) \
        == "2 proxies: db, web; added db; removed cache; changed web (idle_timeout_s, retries)"
    assert reload_summary([web], []) == "0 proxies: none; removed web"
    # A certificate renewed in place changes no key, but the reload read it again.
    tls = proxy("tls", tls_cert="/etc/midway/tls.pem")
    assert reload_summary([web, tls], [web, tls]) \
        == "2 proxies: tls, web; configuration unchanged; TLS files read again (tls)"
    # An edited hook file is applied though the configuration is the same: say so.
    audited = proxy("api", hooks=("myhooks:Audit",))
    assert reload_summary([web, audited], [web, audited]) \
        == "2 proxies: api, web; configuration unchanged; hooks imported anew (api)"
