"""The routes fed arbitrary requests (hypothesis), with no HTTP server: whatever the
method, path (connection ids in any script's digits included) and body, the answer is a status below 500 (nothing here binds a busy
address), an error is Toxiproxy's JSON shape, and nothing raises."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midway.admin.routes import ToxiproxyAPI
from midway.config.load import config_from_dict
from midway.config.target import Target
from midway.control.agent import WorkerAgent
from midway.control.commands import LocalHandle
from midway.control.plane import ControlPlane
from midway.control.process import SingleFleet

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "type", "stream", "toxicity", "attributes", "conditions",
                         "upstream", "enabled", "toxics", "latency", "rate", "x"])
        | st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
bodies = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64))
# Ids as a client might mistype them: digits of other scripts (str.isdigit()
# takes "²" and "٣", int() refuses the one and reads the other), too many digits.
ids = st.sampled_from(["1", "0", "²", "٣", "1" * 5000, "%C2%B2", "-1"]) \
    | st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4)
segments = st.sampled_from(["proxies", "p", "toxics", "latency_downstream", "ghost", "",
                            "connections"]) | ids | st.text(max_size=10)
queries = st.sampled_from(["", "?reset=true", "?reset=²", "?proxy=p", "?proxy=%FF"])
paths = st.sampled_from(["/proxies", "/proxies/p", "/proxies/p/toxics", "/populate", "/reset",
                         "/proxies/p/toxics/latency_downstream", "/version", "/metrics",
                         "/reload", "/connections"]) \
    | st.lists(segments, min_size=0, max_size=5).map(lambda s: "/" + "/".join(s)) \
    | st.tuples(ids, st.sampled_from(["", "/toxics", "/toxics/latency_downstream"]),
                queries).map(lambda t: f"/connections/{t[0]}{t[1]}{t[2]}")
methods = st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD"])


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def without_listen(body: bytes) -> bytes:
    """Nothing here may listen anywhere but where the proxy was made (loopback)."""
    try:
        value: Any = json.loads(body)
    except ValueError:
        return body
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            item.pop("listen", None)
    return json.dumps(value).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, path=paths, body=bodies)
def test_any_request_gets_an_answer_below_500(loop: asyncio.AbstractEventLoop, method: str,
                                              path: str, body: bytes) -> None:
    async def answer() -> tuple[int, bytes, str]:
        config = config_from_dict({"proxy": {"p": {"listen": "127.0.0.1:0",
                                                   "upstreams": "127.0.0.1:1"}}})
        agent = WorkerAgent(Target(config, frozenset({"p"})))
        await agent.start()
        api = ToxiproxyAPI(ControlPlane(agent.running(), SingleFleet(LocalHandle(agent))))
        await api.handle("POST", "/proxies/p/toxics", b'{"type": "latency"}')
        try:
            response = await api.handle(method, path, without_listen(body), "fuzz")
        finally:
            await agent.runtime.shutdown(0)
        return response.status, response.body, response.content_type

    status, text, content_type = loop.run_until_complete(answer())
    assert 200 <= status < 500, (status, text)
    if status >= 400 and content_type == "application/json":
        error = json.loads(text)
        assert isinstance(error["error"], str) and error["status"] == status
        assert set(error) <= {"error", "status", "proxies"}  # populate adds "proxies"
