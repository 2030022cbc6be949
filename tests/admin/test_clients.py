"""Unmodified Toxiproxy client libraries drive midway's admin API: PyPI's
``toxiproxy-python`` and npm's ``toxiproxy-node-client`` (both installed by
.ci/run), exactly as they would drive toxiproxy-server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ..helpers import ROOT, needs
from .conftest import Admin, EchoServer, port_of, refused, round_trip

pytestmark = pytest.mark.timeout(90)

NODE_MODULES = ROOT / ".ci" / "node" / "node_modules"


def timed_round_trip(port: int) -> float:
    started = time.monotonic()
    assert round_trip(port) == b"ping"
    return time.monotonic() - started


def test_toxiproxy_python_client(admin: Admin, echo: EchoServer) -> None:
    toxiproxy = pytest.importorskip("toxiproxy", reason=needs("the toxiproxy Python client",
                                                              pip="toxiproxy-python==0.1.1"))
    server = toxiproxy.Toxiproxy()
    server.update_api_consumer(admin.host, admin.port)
    assert server.running()
    assert json.loads(server.version())["version"].startswith("2.")

    proxy = server.create(name="redis", upstream=echo.address, listen="127.0.0.1:0")
    assert proxy.enabled is True
    port = port_of(proxy.listen)
    assert round_trip(port) == b"ping"
    assert set(server.proxies()) == {"redis"}
    with pytest.raises(toxiproxy.api.ProxyExists):
        server.create(name="redis", upstream=echo.address, listen="127.0.0.1:0")

    proxy.add_toxic(type="latency", attributes={"latency": 200})
    toxic = proxy.get_toxic("latency_downstream")
    assert (toxic.type, toxic.stream, toxic.toxicity) == ("latency", "downstream", 1.0)
    assert toxic.attributes == {"latency": 200, "jitter": 0}
    assert timed_round_trip(port) >= 0.2
    with pytest.raises(toxiproxy.api.InvalidToxic):
        proxy.add_toxic(type="latency", name="bad", attributes={"latency": "slow"})
    with pytest.raises(toxiproxy.api.ProxyExists):  # the client's name for any 409
        proxy.add_toxic(type="latency")
    assert proxy.destroy_toxic("latency_downstream")
    assert proxy.toxics() == {}
    assert timed_round_trip(port) < 0.2

    with proxy.down():
        assert refused(port)
        assert server.get_proxy("redis").enabled is False
    assert round_trip(port) == b"ping"

    proxy.add_toxic(type="timeout", name="cut", attributes={"timeout": 0})
    proxy.disable()
    assert server.reset()
    assert server.get_proxy("redis").enabled is True
    assert proxy.toxics() == {}
    assert round_trip(port) == b"ping"

    populated = server.populate([{"name": "web", "upstream": echo.address,
                                  "listen": "127.0.0.1:0"}])
    assert [p.name for p in populated] == ["web"]
    server.destroy_all()
    assert server.proxies() == {}
    assert refused(port)
    with pytest.raises(toxiproxy.api.NotFound):
        proxy.destroy()


NODE_SCRIPT = r"""
const { Toxiproxy } = require("toxiproxy-node-client");
const net = require("net");

function roundTrip(port) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const sock = net.connect(port, "127.0.0.1", () => sock.write("ping"));
    sock.on("data", (d) => { sock.end(); resolve({ data: d.toString(), ms: Date.now() - started }); });
    sock.on("error", reject);
  });
}

(async () => {
  const [url, upstream] = process.argv.slice(2);
  const toxiproxy = new Toxiproxy(url);
  const out = {};
  out.version = JSON.parse(await toxiproxy.getVersion()).version;
  const proxy = await toxiproxy.createProxy({ name: "db", listen: "127.0.0.1:0", upstream });
  out.created = proxy.toJson();
  const port = Number(proxy.listen.split(":").pop());
  out.plain = await roundTrip(port);
  const toxic = await proxy.addToxic({ type: "latency", stream: "downstream", toxicity: 1,
                                       attributes: { latency: 200 } });
  out.toxic = toxic.toJson();
  out.slow = await roundTrip(port);
  out.updated = (await toxic.update({ attributes: { latency: 300 }, toxicity: 1 })).toJson();
  out.fetched = (await proxy.getToxic("latency_downstream")).toJson();
  await toxic.remove();
  out.fast = await roundTrip(port);
  try { await proxy.getToxic("latency_downstream"); out.missing = "found"; }
  catch (e) { out.missing = e.message; }
  out.disabled = (await proxy.update({ enabled: false })).toJson();
  await toxiproxy.reset();
  out.afterReset = (await toxiproxy.get("db")).toJson();
  const populated = await toxiproxy.populate([
    { name: "db", listen: "127.0.0.1:0", upstream },
    { name: "cache", listen: "127.0.0.1:0", upstream },
  ]);
  out.populated = Object.keys(populated).sort();
  out.all = Object.keys(await toxiproxy.getAll()).sort();
  for (const p of Object.values(await toxiproxy.getAll())) await p.remove();
  out.empty = Object.keys(await toxiproxy.getAll());
  try { await toxiproxy.createProxy({ name: "", upstream }); out.invalid = "created"; }
  catch (e) { out.invalid = e.message; }
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_toxiproxy_node_client(admin: Admin, echo: EchoServer, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "toxiproxy-node-client").is_dir():
        pytest.skip(needs("node and the toxiproxy Node client", apt="nodejs npm",
                          npm="toxiproxy-node-client@4.1.0"))
    script = tmp_path / "drive.js"
    script.write_text(NODE_SCRIPT)
    result = subprocess.run([node, str(script), admin.url, echo.address], capture_output=True,
                            text=True, timeout=60, env={"NODE_PATH": str(NODE_MODULES),
                                                        "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    assert out["version"].startswith("2.")
    assert out["created"]["name"] == "db" and out["created"]["enabled"] is True
    assert out["plain"]["data"] == "ping"
    assert out["toxic"] == {"name": "latency_downstream", "type": "latency",
                            "stream": "downstream", "toxicity": 1,
                            "attributes": {"latency": 200, "jitter": 0}}
    assert out["slow"]["data"] == "ping" and out["slow"]["ms"] >= 200
    assert out["updated"]["attributes"] == {"latency": 300, "jitter": 0}
    assert out["fetched"] == out["updated"]
    assert out["fast"]["ms"] < 200
    assert "404" in out["missing"]
    assert out["disabled"]["enabled"] is False
    assert out["afterReset"]["enabled"] is True
    assert out["populated"] == ["cache", "db"] == out["all"]
    assert out["empty"] == []
    assert "400" in out["invalid"]
