"""midway's own toxics and seeds in the configuration: TOML tables, ``--toxic``
flags and the proxy's ``seed``, without sockets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from midway.chain.registry import build_elements
from midway.chain.toxics import Toxic
from midway.chain.toxics.config import build_toxic, toxic_table_from_spec
from midway.config.load import config_from_dict
from midway.config.schema import ProxyConfig
from midway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def proxy_with(*toxics: dict[str, Any], **options: Any) -> ProxyConfig:
    table = {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", "toxics": list(toxics),
             **options}
    return config_from_dict({"proxy": {"p": table}}).proxies[0]


def toxics_of(config: ProxyConfig) -> list[Toxic[Any]]:
    return [e for e in build_elements(config) if isinstance(e, Toxic)]


def test_toml_accepts_the_new_toxics() -> None:
    config = proxy_with(
        {"type": "limit_time", "attributes": {"after_s": 30}},
        {"type": "stall", "stream": "upstream", "attributes": {"stall_s": 2.5}},
        {"type": "corrupt", "attributes": {"probability": 0.001}, "conditions": {"after_s": 1}},
    )
    assert [(t.type, t.stream, t.attributes.to_json()) for t in toxics_of(config)] == [
        ("limit_time", "downstream", {"after_s": 30.0}),
        ("stall", "upstream", {"stall_s": 2.5}),
        ("corrupt", "downstream", {"probability": 0.001}),
    ]


def test_toml_errors_for_the_new_toxics_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        proxy_with({"type": "corrupt", "attributes": {"probability": 2}})
    assert info.value.path == "proxy.p.toxics[0].attributes.probability"
    assert "at most 1" in info.value.message


def test_toxic_flags_for_the_new_toxics() -> None:
    assert toxic_table_from_spec("limit_time:after_s=5") == {
        "type": "limit_time", "attributes": {"after_s": 5}}
    assert toxic_table_from_spec("stall:stall_s=1.5,stream=upstream") == {
        "type": "stall", "stream": "upstream", "attributes": {"stall_s": 1.5}}
    assert toxic_table_from_spec("corrupt:probability=0.01,seed=7,after_s=2") == {
        "type": "corrupt", "seed": 7, "attributes": {"probability": 0.01},
        "conditions": {"after_s": 2}}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midway", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=20)


def test_cli_checks_the_new_toxics_and_the_seed() -> None:
    ok = run_cli("127.0.0.1:0", "127.0.0.1:1", "--seed", "42",
                 "--toxic", "limit_time:after_s=5", "--toxic", "stall:stall_s=0.5",
                 "--toxic", "corrupt:probability=0.01,seed=3", "--check")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("127.0.0.1:0", "127.0.0.1:1", "--toxic", "stall:stall_s=soon", "--check")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("midway: --toxic 'stall:stall_s=soon': attributes.stall_s: "
                                  "must be a number (seconds), got 'soon'")


def test_proxy_seed_seeds_every_toxic_unless_it_has_its_own() -> None:
    config = proxy_with({"type": "latency", "name": "a"},
                        {"type": "latency", "name": "b", "seed": 7},
                        {"type": "latency", "name": "c", "at_s": 5}, seed=99)
    assert [spec.seed for spec in config.toxics] == [99, 7, 99]
    assert [t.seed for t in toxics_of(config)] == [99, 7]
    assert build_toxic(config.toxics[2]).seed == 99  # the timeline's toxics too


def test_no_seed_means_a_drawn_one() -> None:
    config = proxy_with({"type": "latency"})
    assert config.seed == 0 and config.toxics[0].seed is None
    toxic = build_toxic(config.toxics[0])
    assert not toxic.seed_given and toxic.seed >= 1


def test_seed_in_defaults_applies_to_every_proxy() -> None:
    config = config_from_dict({"defaults": {"seed": 5}, "proxy": {"p": {
        "listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", "toxics": [{"type": "noop"}]}}})
    assert config.proxies[0].toxics[0].seed == 5


@pytest.mark.parametrize(("table", "path"), [
    ({"type": "latency", "seed": "x"}, "proxy.p.toxics[0].seed"),
    ({"type": "latency", "seed": -1}, "proxy.p.toxics[0].seed"),
    ({"type": "latency", "seed": 1.5}, "proxy.p.toxics[0].seed"),
])
def test_bad_toxic_seed_names_its_key(table: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        proxy_with(table)
    assert info.value.path == path


def test_bad_proxy_seed_names_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        proxy_with(seed=-3)
    assert info.value.path == "proxy.p.seed"
