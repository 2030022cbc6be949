"""Toxics added at run time take seeds: ``Proxy.add_toxic(seed=...)`` and the
admin API's ``seed`` field set one; without it they take the proxy's ``seed``
option, so an API-driven test repeats its draws as a configured one does."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import midway
from midway.admin.routes import ToxiproxyAPI
from midway.chain.toxics import make_toxic
from midway.config.load import config_from_dict
from midway.config.target import Target
from midway.control.agent import WorkerAgent
from midway.control.commands import LocalHandle
from midway.control.plane import ControlPlane
from midway.control.process import SingleFleet

from .helpers import run

pytestmark = pytest.mark.timeout(30)


def draws(toxic: Any) -> list[float]:
    """What connection 1 of the toxic draws (its toxicity draw, then jitter)."""
    rng = toxic.connection_rng(1)
    return [rng.random() for _ in range(5)]


def same_draws_as(seed: int, name: str | None = None) -> list[float]:
    """Connection 1's draws of a configured toxic with this seed (and name)."""
    return draws(make_toxic("latency", attributes={"latency": 10, "jitter": 5}, seed=seed,
                            name=name))


def test_python_add_toxic_takes_a_seed_and_else_the_proxys() -> None:
    async def main() -> tuple[Any, Any, Any]:
        async with midway.Proxy("127.0.0.1:0", "127.0.0.1:1", seed=42) as proxy:
            inherited = proxy.add_toxic("latency", latency=10, jitter=5)
            own = proxy.add_toxic("latency", latency=10, jitter=5, seed=7, name="own")
            toxics = {t.name: t for t in proxy.toxics}
            assert inherited.name in toxics and own.name in toxics
            async with midway.Proxy("127.0.0.1:0", "127.0.0.1:1") as unseeded:
                drawn = unseeded.add_toxic("latency", latency=10, jitter=5)
                drawn_toxic = unseeded.toxics[0]
                assert drawn.name == drawn_toxic.name
            return toxics["latency_downstream"], toxics["own"], drawn_toxic

    inherited, own, drawn = run(main())
    assert (inherited.seed, own.seed) == (42, 7)
    assert "seed" not in own.attributes.to_json()  # a setting, not an attribute
    assert draws(inherited) == same_draws_as(42) and draws(own) == same_draws_as(7, "own")
    assert not drawn.seed_given  # no seed anywhere: drawn (and logged)


def test_background_proxy_add_toxic_passes_the_seed_on() -> None:
    with midway.BackgroundProxy("127.0.0.1:0", "127.0.0.1:1") as proxy:
        proxy.add_toxic("latency", latency=10, jitter=5, seed=9)
        assert proxy.toxics[0].seed == 9


def admin_create(body: dict[str, Any], proxy_seed: int) -> tuple[int, Any, Any]:
    async def main() -> tuple[int, Any, Any]:
        config = config_from_dict({"proxy": {"p": {
            "listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", "seed": proxy_seed}}})
        agent = WorkerAgent(Target(config, frozenset({"p"})))
        await agent.start()
        api = ToxiproxyAPI(ControlPlane(agent.running(), SingleFleet(LocalHandle(agent))))
        try:
            response = await api.handle("POST", "/proxies/p/toxics", json.dumps(body).encode())
            toxics = [e for e in agent.runtime.services["p"].elements if hasattr(e, "seed")]
            return response.status, json.loads(response.body), toxics[0] if toxics else None
        finally:
            await agent.runtime.shutdown(0)

    return asyncio.run(main())


def test_admin_toxics_take_the_proxys_seed_or_their_own() -> None:
    latency = {"type": "latency", "attributes": {"latency": 10, "jitter": 5}}
    status, _, inherited = admin_create(latency, proxy_seed=42)
    assert status == 200 and inherited.seed == 42
    assert draws(inherited) == same_draws_as(42)
    status, body, own = admin_create({**latency, "seed": 7}, proxy_seed=42)
    assert status == 200 and own.seed == 7
    assert "seed" not in body  # Toxiproxy's shape is unchanged
    status, _, drawn = admin_create(latency, proxy_seed=0)
    assert status == 200 and not drawn.seed_given


@pytest.mark.parametrize("seed", [-1, "7", 1.5, True])
def test_admin_rejects_a_bad_seed(seed: object) -> None:
    status, body, toxic = admin_create({"type": "latency", "seed": seed}, proxy_seed=0)
    assert status == 400 and toxic is None
    assert body["error"].startswith("bad request body: seed:")
