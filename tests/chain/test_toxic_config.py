"""Toxics in the configuration (TOML tables, ``--toxic`` flags), the timeline under
a fake clock, and the live toxic set with its handles, without sockets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from midway.chain.base import Element
from midway.chain.registry import build_elements
from midway.chain.toxics import Toxic, ToxicError, make_toxic
from midway.chain.toxics.config import build_toxic, toxic_table_from_spec
from midway.chain.toxics.live import (
    ToxicExists,
    ToxicHandle,
    ToxicNotFound,
    add_toxic,
    get_toxic,
    list_toxics,
    remove_toxic,
    reset_toxics,
    update_toxic,
)
from midway.config.load import config_from_dict, load_config
from midway.config.schema import ProxyConfig, ToxicSpec
from midway.core.clock import FakeClock
from midway.errors import ConfigError
from midway.timeline import Timeline, schedule

REPO = Path(__file__).resolve().parents[2]


def proxy_with(*toxics: dict[str, Any]) -> ProxyConfig:
    table = {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", "toxics": list(toxics)}
    return config_from_dict({"proxy": {"p": table}}).proxies[0]


def config_error(*toxics: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"proxy": {"p": {"listen": "127.0.0.1:0", "upstreams": "h:1",
                                          "toxics": list(toxics)}}})
    return info.value


# -- TOML ----------------------------------------------------------------------


def test_toml_toxics_with_timeline(tmp_path: Path) -> None:
    path = tmp_path / "midway.toml"
    path.write_text("""
[proxy.redis]
listen = "127.0.0.1:6380"
upstreams = "127.0.0.1:6379"

[[proxy.redis.toxics]]
type = "latency"
attributes = { latency = 100, jitter = 10 }

[[proxy.redis.toxics]]
type = "timeout"
name = "outage"
stream = "upstream"
toxicity = 0.5
conditions = { client_cidr = ["10.0.0.0/8"], first_n = 3 }
at_s = 5
until_s = 20
""")
    latency, outage = load_config(path).proxies[0].toxics
    assert latency == ToxicSpec(type="latency", name="latency_downstream",
                                attributes=(("jitter", 10), ("latency", 100)))
    assert (outage.name, outage.stream, outage.toxicity, outage.at_s, outage.until_s) == (
        "outage", "upstream", 0.5, 5.0, 20.0)
    assert dict(outage.conditions) == {"client_cidr": ("10.0.0.0/8",), "first_n": 3}
    rebuilt = build_toxic(outage)
    assert rebuilt.conditions.first_n == 3 and rebuilt.toxicity == 0.5


def test_only_toxics_present_from_the_start_are_built_with_the_proxy() -> None:
    config = proxy_with({"type": "latency", "name": "a"},
                        {"type": "latency", "name": "b", "until_s": 3},
                        {"type": "latency", "name": "c", "at_s": 1})
    assert [e.name for e in build_elements(config)] == ["a", "b"]


@pytest.mark.parametrize("toxic, path, words", [
    ({"type": "latency", "attributes": {"latency": -1}},
     "proxy.p.toxics[0].attributes.latency", "negative"),
    ({"type": "latency", "attributes": {"latence": 1}},
     "proxy.p.toxics[0].attributes.latence", "unknown attribute"),
    ({"type": "walrus"}, "proxy.p.toxics[0].type", "unknown toxic type"),
    ({"attributes": {}}, "proxy.p.toxics[0].type", "missing"),
    ({"type": "latency", "strem": "upstream"}, "proxy.p.toxics[0].strem", "'stream'"),
    ({"type": "latency", "stream": "up"}, "proxy.p.toxics[0].stream", "upstream"),
    ({"type": "latency", "toxicity": 1.5}, "proxy.p.toxics[0].toxicity", "0 to 1"),
    ({"type": "latency", "conditions": {"first_n": 0}},
     "proxy.p.toxics[0].conditions.first_n", "at least 1"),
    ({"type": "latency", "conditions": {"client_cidr": ["10.0.0.0/33"]}},
     "proxy.p.toxics[0].conditions.client_cidr[0]", "CIDR"),
    ({"type": "latency", "at_s": -1}, "proxy.p.toxics[0].at_s", "negative"),
    ({"type": "latency", "at_s": 5, "until_s": 5}, "proxy.p.toxics[0].until_s", "after at_s"),
    ({"type": "latency", "until_s": "soon"}, "proxy.p.toxics[0].until_s", "seconds"),
    ("latency", "proxy.p.toxics[0]", "table"),
    ({"type": "latency", "name": "a/b"}, "proxy.p.toxics[0].name", "a toxic name is 1-64"),
    ({"type": "latency", "name": "x" * 65}, "proxy.p.toxics[0].name", "got 65 characters"),
    ({"type": "latency", "name": "log\nline"}, "proxy.p.toxics[0].name", "control characters"),
])
def test_bad_toml_toxic_names_its_key(toxic: Any, path: str, words: str) -> None:
    exc = config_error(toxic)
    assert exc.path == path
    assert words in exc.message


@pytest.mark.parametrize(("toxic", "words"), [
    ({"type": "latency", "latency": 300}, "an attribute of latency: attributes = { latency = 300 }"),
    ({"type": "bandwidth", "rate": 10}, "an attribute of bandwidth: attributes = { rate = 10 }"),
    ({"type": "timeout", "first_n": 2}, "a condition: conditions = { first_n = 2 }"),
    ({"type": "latency", "tpye": "x"}, "unknown key; did you mean 'type'?"),
])
def test_a_toxic_attribute_or_condition_written_flat_says_where_it_goes(
        toxic: Any, words: str) -> None:
    """``--toxic latency:latency=300`` is flat; a table written the same way got
    only "unknown key", not where the key belongs."""
    exc = config_error(toxic)
    assert exc.path == f"proxy.p.toxics[0].{next(k for k in toxic if k != 'type')}"
    assert words in exc.message, exc.message


def test_toxics_must_be_a_list_and_belong_to_a_proxy() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"proxy": {"p": {"listen": ":1", "upstreams": "h:1",
                                          "toxics": {"type": "latency"}}}})
    assert info.value.path == "proxy.p.toxics"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"defaults": {"toxics": []}})
    assert info.value.path == "defaults.toxics"


def test_names_may_repeat_only_in_separate_time_windows() -> None:
    exc = config_error({"type": "latency"}, {"type": "latency", "attributes": {"latency": 5}})
    assert exc.path == "proxy.p.toxics[1].name"
    exc = config_error({"type": "latency", "until_s": 10}, {"type": "latency", "at_s": 5})
    assert exc.path == "proxy.p.toxics[1].name"
    config = proxy_with({"type": "latency", "until_s": 5},
                        {"type": "latency", "at_s": 5, "until_s": 9},
                        {"type": "latency", "at_s": 9})
    assert len(config.toxics) == 3


# -- command line --------------------------------------------------------------


def test_toxic_flag_becomes_a_toml_table() -> None:
    assert toxic_table_from_spec("latency:latency=100,jitter=10,stream=downstream") == {
        "type": "latency", "stream": "downstream", "attributes": {"latency": 100, "jitter": 10}}
    assert toxic_table_from_spec("timeout") == {"type": "timeout"}
    assert toxic_table_from_spec(
        "bandwidth:rate=50,toxicity=0.5,name=slow,at_s=1.5,until_s=3,first_n=2,"
        "client_cidr=10.0.0.0/8,client_cidr=::1/128") == {
        "type": "bandwidth", "name": "slow", "toxicity": 0.5, "at_s": 1.5, "until_s": 3,
        "attributes": {"rate": 50},
        "conditions": {"first_n": 2, "client_cidr": ["10.0.0.0/8", "::1/128"]}}
    # Not a number: kept as text, for the validation to name the attribute.
    assert toxic_table_from_spec("latency:latency=lots")["attributes"] == {"latency": "lots"}


@pytest.mark.parametrize(("text", "value", "whole"), [
    ("100", 100, 100), ("+7", 7, 7), ("-3", -3, -3),
    # A fraction or an exponent, where a whole number is expected, stays text: the
    # validation then quotes it as typed ("got '1e3'", not "got 1000.0").
    ("0.5", 0.5, "0.5"), (".5", 0.5, ".5"), ("2.", 2.0, "2."), ("1e3", 1000.0, "1e3"),
    # What int() or float() would also take, and a flag should not: text.
    ("1_000", "1_000", "1_000"), ("1_0.5", "1_0.5", "1_0.5"), ("0x10", "0x10", "0x10"),
    ("inf", "inf", "inf"), ("nan", "nan", "nan"),
    ("\u0661\u0662", "\u0661\u0662", "\u0661\u0662"),  # Arabic-Indic digits
])
def test_a_flag_number_is_plain_decimal(text: str, value: object, whole: object) -> None:
    table = toxic_table_from_spec(f"corrupt:probability={text},toxicity={text},first_n={text},"
                                  f"seed={text}")
    numbers = [table["attributes"]["probability"], table["toxicity"]]
    assert [(v, type(v)) for v in numbers] == [(value, type(value))] * 2
    whole_numbers = [table["conditions"]["first_n"], table["seed"]]
    assert [(v, type(v)) for v in whole_numbers] == [(whole, type(whole))] * 2


@pytest.mark.parametrize(("spec", "message"), [
    ("latency:latency=1_000", "attributes.latency: must be an integer (milliseconds), got '1_000'"),
    ("corrupt:probability=0_5", "attributes.probability: must be a number"),
    ("latency:toxicity=1_0", "toxicity: must be a number from 0 to 1, got '1_0'"),
    ("latency:first_n=1_0", "conditions.first_n: must be an integer of at least 1, got '1_0'"),
    ("latency:latency=1e3", "attributes.latency: must be an integer (milliseconds), got '1e3'"),
    ("bandwidth:rate=2.0", "attributes.rate: must be an integer (KB/s), got '2.0'"),
    ("latency:first_n=1e1", "conditions.first_n: must be an integer of at least 1, got '1e1'"),
    ("latency:latency=1,seed=1e3", "seed: expected a whole number of at least 0, got '1e3'"),
])
def test_a_flag_number_it_refuses_is_named_by_its_key_as_typed(spec: str,
                                                               message: str) -> None:
    from midway.cli import build_parser, config_from_args

    with pytest.raises(ConfigError) as info:
        config_from_args(build_parser().parse_args(["127.0.0.1:0", "127.0.0.1:1", "--toxic", spec]))
    assert str(info.value).startswith(f"--toxic {spec!r}: {message}"), info.value


@pytest.mark.parametrize("spec", [":latency=1", "latency:latency", "latency:=3",
                                  "latency:latency=1,latency=2"])
def test_malformed_toxic_flag(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        toxic_table_from_spec(spec)
    assert spec in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midway", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=20)


def test_cli_toxic_errors_name_the_flag() -> None:
    result = run_cli("127.0.0.1:0", "127.0.0.1:1", "--toxic", "latency:latency=lots", "--check")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "midway: --toxic 'latency:latency=lots': attributes.latency: must be an integer "
        "(milliseconds), got 'lots'")
    result = run_cli("127.0.0.1:0", "127.0.0.1:1", "--toxic", "latency:name=a/b", "--check")
    assert result.returncode == 2
    assert "--toxic 'latency:name=a/b': name: a toxic name is 1-64" in result.stderr
    result = run_cli("127.0.0.1:0", "127.0.0.1:1", "--toxic", "latency:latency=5",
                     "--toxic", "slicer:average_size=10,delay=1", "--check")
    assert result.returncode == 0, result.stderr


# -- the timeline --------------------------------------------------------------


class FakeProxy:
    """A live proxy reduced to its element list (what the toxic set needs)."""

    def __init__(self, elements: list[Element] | None = None) -> None:
        self.elements: list[Element] = list(elements or [])
        self.log: list[tuple[str, str]] = []

    def add_element(self, element: Element, index: int | None = None) -> None:
        self.elements.append(element)
        self.log.append(("add", element.name))

    def remove_element(self, element: Element) -> None:
        self.elements.remove(element)
        self.log.append(("remove", element.name))

    def replace_element(self, old: Element, new: Element) -> None:
        self.elements[self.elements.index(old)] = new
        self.log.append(("replace", new.name))


def test_schedule_orders_events_removals_first() -> None:
    config = proxy_with({"type": "latency", "name": "a", "until_s": 5},
                        {"type": "latency", "name": "a", "at_s": 5, "until_s": 8},
                        {"type": "timeout", "name": "b", "at_s": 2})
    events = [(e.at_s, e.action, e.spec.name) for e in schedule(config.toxics)]
    assert events == [(2.0, "add", "b"), (5.0, "remove", "a"), (5.0, "add", "a"),
                      (8.0, "remove", "a")]


def test_timeline_plays_on_a_fake_clock() -> None:
    config = proxy_with({"type": "latency", "name": "early", "until_s": 3},
                        {"type": "latency", "name": "late", "at_s": 2, "until_s": 6})
    host = FakeProxy(build_elements(config))
    clock = FakeClock(100.0)

    async def main() -> None:
        timeline = Timeline(host, config.toxics, clock=clock)
        task = asyncio.create_task(timeline.run())
        await clock.advance(1.999)
        assert [e.name for e in host.elements] == ["early"]
        await clock.advance(0.001)
        assert [e.name for e in host.elements] == ["early", "late"]
        await clock.advance(1.0)
        assert [e.name for e in host.elements] == ["late"]
        await clock.advance(3.0)
        assert host.elements == []
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    assert host.log == [("add", "late"), ("remove", "early"), ("remove", "late")]


def test_timeline_leaves_toxics_it_did_not_add() -> None:
    """A timed toxic removed or replaced through the API is not the timeline's any
    more; a name taken at add time is skipped."""
    config = proxy_with({"type": "latency", "name": "x", "until_s": 2},
                        {"type": "latency", "name": "y", "at_s": 1, "until_s": 3})
    host = FakeProxy(build_elements(config))
    clock = FakeClock()

    async def main() -> None:
        timeline = Timeline(host, config.toxics, clock=clock)
        remove_toxic(host, "x")
        stranger = add_toxic(host, make_toxic("latency", name="x"))
        add_toxic(host, make_toxic("timeout", name="y"))
        task = asyncio.create_task(timeline.run())
        await clock.advance(5)
        await asyncio.wait_for(task, 1)
        assert host.elements[0] is stranger
        assert [(e.name, e.type) for e in host.elements if isinstance(e, Toxic)] == [
            ("x", "latency"), ("y", "timeout")]

    asyncio.run(main())


def test_a_dropped_toxic_goes_now_and_the_timeline_never_brings_it_back() -> None:
    """The admin API's DELETE of a timed toxic: that one window leaves the
    scenario; the others (the same name later included) play on, on time."""
    config = proxy_with({"type": "latency", "name": "a", "at_s": 1, "until_s": 3},
                        {"type": "latency", "name": "a", "at_s": 4, "until_s": 6},
                        {"type": "timeout", "name": "b", "at_s": 2},
                        {"type": "timeout", "name": "c", "at_s": 5})
    host = FakeProxy(build_elements(config))
    clock = FakeClock()

    async def main() -> None:
        timeline = Timeline(host, config.toxics, clock=clock)
        task = asyncio.create_task(timeline.run())
        await clock.advance(1.5)
        assert [e.name for e in host.elements] == ["a"]
        timeline.drop(config.toxics[0])
        timeline.drop(config.toxics[3])  # not added yet: it never will be
        assert host.elements == []
        await clock.advance(1.0)
        assert [e.name for e in host.elements] == ["b"]
        await clock.advance(2.0)  # at 4 s: the second window of "a"
        assert [e.name for e in host.elements] == ["b", "a"]
        await clock.advance(3.0)
        assert [e.name for e in host.elements] == ["b"]
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    assert host.log == [("add", "a"), ("remove", "a"), ("add", "b"), ("add", "a"),
                        ("remove", "a")]


# -- the live toxic set ----------------------------------------------------------


class Other(Element):
    name = "hook"

    def attach(self, info: Any) -> None:
        return None


def test_live_toxic_set() -> None:
    other = Other()
    host = FakeProxy([other])
    down = add_toxic(host, make_toxic("latency", attributes={"latency": 10, "jitter": 2}))
    up = add_toxic(host, make_toxic("bandwidth", stream="upstream", attributes={"rate": 5}))
    assert list_toxics(host) == [up, down]
    with pytest.raises(ToxicExists):
        add_toxic(host, make_toxic("timeout", name="hook"))
    with pytest.raises(ToxicExists):
        add_toxic(host, make_toxic("timeout", name="latency_downstream"))
    updated = update_toxic(host, "latency_downstream", toxicity=0.25, attributes={"latency": 20})
    assert updated.attributes.to_json() == {"latency": 20, "jitter": 2}
    assert updated.toxicity == 0.25 and get_toxic(host, "latency_downstream") is updated
    assert host.elements.index(updated) == 1  # same place in the chain
    with pytest.raises(ToxicError):
        update_toxic(host, "latency_downstream", attributes={"latency": -1})
    assert get_toxic(host, "latency_downstream") is updated
    with pytest.raises(ToxicNotFound):
        remove_toxic(host, "nope")
    reset_toxics(host)
    assert host.elements == [other]


def test_toxic_handle_removes_once_and_updates() -> None:
    host = FakeProxy()
    with ToxicHandle(host, add_toxic(host, make_toxic("latency"))) as handle:
        assert handle.active and handle.name == "latency_downstream"
        new = handle.update(latency=50)
        assert handle.toxic is new and new.attributes.to_json()["latency"] == 50
    assert not handle.active and host.elements == []
    handle.remove()  # already gone: nothing happens
    with pytest.raises(ToxicNotFound):
        handle.update(latency=1)
    calls: list[str] = []

    def runner(fn: Any) -> Any:
        calls.append("on the loop")
        return fn()

    handle = ToxicHandle(host, add_toxic(host, make_toxic("timeout")), runner)
    handle.remove()
    assert calls and host.elements == []
