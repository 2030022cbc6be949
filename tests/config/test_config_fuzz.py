"""The configuration loader fed arbitrary documents (hypothesis): a TOML file is
untrusted input as much as a PROXY header is.  Whatever the bytes or the shape of
the tables, loading either gives a :class:`~midway.config.schema.Config` or raises
:class:`~midway.errors.ConfigError` with a message, never another exception (which
the command line would print as a traceback)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midway.config.load import config_from_dict, load_config
from midway.config.schema import (
    Config,
    HealthConfig,
    ProxyConfig,
    RouteSpec,
    ServerConfig,
    ToxicSpec,
    UpstreamConfig,
)
from midway.errors import ConfigError


def _names(*classes: type) -> list[str]:
    return sorted({f.name for cls in classes for f in dataclasses.fields(cls)})


# Real keys most of the time (so that the loader gets past "unknown key" and into
# each option's checks), and now and then a near-miss.
proxy_keys = st.sampled_from(_names(ProxyConfig, UpstreamConfig, RouteSpec)) | st.text(max_size=8)
server_keys = st.sampled_from(_names(ServerConfig)) | st.text(max_size=8)
health_keys = st.sampled_from(_names(HealthConfig)) | st.text(max_size=6)
toxic_keys = st.sampled_from(_names(ToxicSpec) + ["latency", "jitter", "rate", "bytes"]) \
    | st.text(max_size=6)

# What tomllib can produce: no None; any int; floats with inf and nan.
plausible_text = st.sampled_from([
    "127.0.0.1:0", "127.0.0.1:6379", "[::1]:0", ":0", "unix:/tmp/midway-fuzz.sock",
    "localhost:80", "127.0.0.1:6379,weight=3", "127.0.0.1:1,backup", "127.0.0.1:1,weight=x",
    "round_robin", "least_connections", "random", "hash", "off", "v1", "v2", "auto",
    "asyncio", "uvloop", "latency", "downstream", "upstream", "*.example.com", "example.com",
    "10.0.0.0/8", "info", "", "-", "00 00 00 08 04 d2 16 2f", "4e", "4", "0x4e",
])
scalars = (st.booleans() | st.integers() | st.integers(-3, 70000)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | plausible_text)


def values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12)


def tables(keys: st.SearchStrategy[str], nested: dict[str, st.SearchStrategy[Any]] | None = None,
           ) -> st.SearchStrategy[dict[str, Any]]:
    plain = st.dictionaries(keys, values(keys), max_size=6)
    if not nested:
        return plain
    return st.tuples(plain, st.fixed_dictionaries({}, optional=nested)).map(
        lambda pair: {**pair[0], **pair[1]})


proxy_tables = tables(proxy_keys, {
    "listen": values(proxy_keys) | plausible_text | st.lists(plausible_text, max_size=3),
    "upstreams": st.lists(plausible_text | st.dictionaries(proxy_keys, values(proxy_keys),
                                                           max_size=3), max_size=3),
    "health": tables(health_keys),
    "toxics": st.lists(tables(toxic_keys, {"attributes": tables(toxic_keys)}), max_size=3),
    "routes": st.lists(tables(proxy_keys), max_size=3) | tables(proxy_keys),
})
documents = st.fixed_dictionaries({}, optional={
    "server": tables(server_keys) | values(server_keys),
    "defaults": tables(proxy_keys, {"health": tables(health_keys)}),
    "proxy": st.dictionaries(st.text(max_size=8) | st.sampled_from(["web", "db"]),
                             proxy_tables | values(proxy_keys), max_size=3),
}) | st.dictionaries(st.text(max_size=8), values(proxy_keys), max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_document_is_a_config_or_a_config_error(document: dict[str, Any]) -> None:
    try:
        config = config_from_dict(document)
    except ConfigError as exc:
        assert str(exc).strip(), "a configuration error must say what is wrong"
        return
    assert isinstance(config, Config)
    for proxy in config.proxies:
        assert proxy.listen and proxy.upstreams or proxy.routes, proxy


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_is_a_config_or_a_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                raw: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "midway.toml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).strip()


VALID = b"""
[server]
max_connections = 100

[proxy.web]
listen = "127.0.0.1:0"
upstreams = ["127.0.0.1:8080,weight=2", "127.0.0.1:8081,backup"]
balance = "least_connections"
idle_timeout_s = 30

[proxy.web.health]
interval_s = 2

[[proxy.web.toxics]]
type = "latency"
attributes = { latency = 100 }
"""


def test_the_seed_document_is_valid(tmp_path: Path) -> None:
    """The mutations below start from a document that loads (else they would only
    ever test the error path)."""
    path = tmp_path / "midway.toml"
    path.write_bytes(VALID)
    config = load_config(path)
    assert [p.name for p in config.proxies] == ["web"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_valid_file_with_bytes_changed_is_a_config_or_a_config_error(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        byte = data.draw(st.sampled_from(list(b'"=[]{},.#\n 0123456789-_ax\\\'')) | st.integers(0, 255))
        if action == "replace":
            raw[at] = byte
        elif action == "delete":
            del raw[at]
        else:
            raw.insert(at, byte)
    path = tmp_path_factory.mktemp("fuzz") / "midway.toml"
    path.write_bytes(bytes(raw))
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).strip()


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1, True, "30"])
def test_odd_numbers_for_a_timeout_are_refused_by_name(value: object) -> None:
    """What tomllib can produce that a naive float() check would let through."""
    document = {"proxy": {"web": {"listen": "127.0.0.1:0", "upstreams": ["127.0.0.1:1"],
                                  "idle_timeout_s": value}}}
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        config_from_dict(document)

