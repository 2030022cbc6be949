"""The plan between two targets (pure): each kind of difference lands in the part
of the plan that says what it costs, and a reload's target keeps what the API
made."""

from __future__ import annotations

import dataclasses
from typing import Any

from midway.config.load import config_from_dict
from midway.config.schema import Config, ProxyConfig, ToxicSpec
from midway.config.target import Target
from midway.control.plan import plan
from midway.control.plane import merge_reload


def proxy(name: str = "web", **options: Any) -> ProxyConfig:
    table = {"listen": "127.0.0.1:8000", "upstreams": "127.0.0.1:9000", **options}
    return config_from_dict({"proxy": {name: table}}).proxies[0]


def target(*proxies: ProxyConfig, disabled: frozenset[str] = frozenset(),
           **server: Any) -> Target:
    base = config_from_dict({"server": server}) if server else Config()
    return Target(dataclasses.replace(base, proxies=proxies), disabled)


def latency(ms: int, name: str = "slow", **fields: Any) -> ToxicSpec:
    return ToxicSpec("latency", name, attributes=(("latency", ms),), **fields)


def test_nothing_differs_nothing_to_do() -> None:
    steps = plan(target(proxy()), target(proxy()))
    assert (steps.add, steps.remove, steps.change, steps.restart_needed) == ([], [], [], [])


def test_added_and_removed_proxies() -> None:
    steps = plan(target(proxy("a"), proxy("b", listen="127.0.0.1:8001")),
                 target(proxy("b", listen="127.0.0.1:8001"), proxy("c", listen="127.0.0.1:8002"),
                        disabled=frozenset({"c"})))
    assert steps.remove == ["a"]
    assert [(p.name, enabled) for p, enabled in steps.add] == [("c", False)]
    assert steps.change == []


def test_upstreams_and_timeouts_are_settings_for_new_connections() -> None:
    (change,) = plan(target(proxy()), target(proxy(upstreams=["127.0.0.1:9001"],
                                                   connect_timeout_s=1.5))).change
    assert change.settings and not change.listen and not change.elements
    assert not change.toxics and change.enable is None


def test_only_a_new_address_rebinds_and_port_0_keeps_the_bound_port() -> None:
    (moved,) = plan(target(proxy()), target(proxy(listen="127.0.0.1:8001"))).change
    assert moved.listen and not moved.settings
    # The running proxy was asked on port 0 and bound 43210: 0 again keeps it.
    running = proxy(listen="127.0.0.1:43210")
    steps = plan(target(running), target(proxy(listen="127.0.0.1:0")))
    assert steps.change == []


def test_elements_are_rebuilt_by_kind_and_hooks_at_every_reload() -> None:
    (change,) = plan(target(proxy()), target(proxy(dump="hex"))).change
    assert (change.dump, change.capture, change.hooks) == (True, False, False)
    (change,) = plan(target(proxy()), target(proxy(pcap="/tmp/x.pcap"))).change
    assert (change.dump, change.capture, change.hooks) == (False, True, False)
    hooked = proxy(hooks=["examples.rewrite:rewrite"])
    assert plan(target(hooked), target(hooked)).change == []
    (change,) = plan(target(hooked), target(hooked), reload=True).change
    assert change.hooks and not change.settings  # re-imported, the module may have changed


def test_a_reload_reads_the_tls_files_of_an_unchanged_proxy_again() -> None:
    # A renewed certificate is a new file under the same name: only a reload says so.
    for tls in [{"tls_cert": "/etc/midway/site.pem"}, {"upstream_tls": True}]:
        same = proxy(**tls)
        assert plan(target(same), target(same)).change == []  # an API change: not read
        (change,) = plan(target(same), target(same), reload=True).change
        assert change.certificates and not change.settings and not change.listen
    assert plan(target(proxy()), target(proxy()), reload=True).change == []


def test_toxics_by_name_in_place_or_replaced() -> None:
    old = proxy(toxics=[])
    before = dataclasses.replace(old, toxics=(latency(100, "a"), latency(100, "b"),
                                              latency(100, "c")))
    after = dataclasses.replace(old, toxics=(
        latency(200, "a"),                                  # attributes: in place
        latency(100, "b", stream="upstream"),               # stream: replaced
        latency(100, "d"),                                  # new
    ))
    (change,) = plan(target(before), target(after)).change
    toxics = change.toxics
    assert [t.name for t in toxics.update] == ["a"]
    assert [t.name for t in toxics.replace] == ["b"]
    assert [t.name for t in toxics.add] == ["d"]
    assert toxics.remove == ["c"]
    assert not toxics.timeline and not change.settings


def test_timed_toxics_restart_the_timeline() -> None:
    plain = dataclasses.replace(proxy(), toxics=(latency(1, "a"),))
    timed = dataclasses.replace(proxy(), toxics=(latency(1, "a"), latency(1, "t", at_s=5.0)))
    (change,) = plan(target(plain), target(timed)).change
    assert change.toxics.timeline and not change.toxics.add


def test_timed_toxics_taken_out_by_the_api_are_dropped_and_the_timeline_plays_on() -> None:
    one, two, three = (latency(1, name, at_s=at) for name, at in (("t", 1.0), ("u", 2.0),
                                                                  ("v", 3.0)))
    before = dataclasses.replace(proxy(), toxics=(latency(1, "a"), one, two, three))
    after = dataclasses.replace(proxy(), toxics=(latency(1, "a"), two))
    (change,) = plan(target(before), target(after)).change
    assert (change.toxics.drop, change.toxics.timeline) == ([one, three], False)
    # A reload plays the file's scenario from the start; so does any other change.
    (change,) = plan(target(before), target(after), reload=True).change
    assert (change.toxics.drop, change.toxics.timeline) == ([], True)
    changed = dataclasses.replace(proxy(), toxics=(latency(2, "t", at_s=1.0), two))
    (change,) = plan(target(before), target(changed)).change
    assert (change.toxics.drop, change.toxics.timeline) == ([], True)


def test_enable_disable_and_reset() -> None:
    (change,) = plan(target(proxy()), target(proxy(), disabled=frozenset({"web"}))).change
    assert change.enable is False
    (change,) = plan(target(proxy()), target(proxy()), reset=frozenset({"web"})).change
    assert change.reset and change.enable is None


def test_server_keys_that_need_a_restart_keep_their_running_value() -> None:
    steps = plan(target(workers=2, drain_timeout_s=30),
                 target(workers=4, drain_timeout_s=5, loop="asyncio"))
    assert steps.restart_needed == ["workers", "loop"]
    assert steps.server.workers == 2 and steps.server.loop == "auto"
    assert steps.server.drain_timeout_s == 5  # applied live


def test_a_reload_keeps_what_the_api_made_and_the_file_wins_on_its_own() -> None:
    file_before = Config(proxies=(proxy("web", toxics=[]),))
    api_toxic, file_toxic = latency(5, "api"), latency(7, "slow")
    running = target(
        dataclasses.replace(file_before.proxies[0], listen=proxy().listen,
                            toxics=(latency(9, "slow"), api_toxic)),  # API changed "slow"
        proxy("made-by-api", listen="127.0.0.1:8100"),
        disabled=frozenset({"web"}),
    )
    file_now = Config(proxies=(dataclasses.replace(proxy("web", upstreams=["127.0.0.1:9009"]),
                                                   toxics=(file_toxic,)),))
    merged = merge_reload(running, file_before, file_now)
    web = merged.proxy("web")
    assert web is not None
    assert [str(u) for u in web.upstreams] == ["127.0.0.1:9009"]
    assert list(web.toxics) == [file_toxic, api_toxic]  # the file's version of "slow"
    assert merged.proxy("made-by-api") is not None
    assert merged.disabled == {"web"}
    # A proxy the file had and no longer has goes; one the API made stays.
    gone = merge_reload(running, file_before, Config())
    assert [p.name for p in gone.config.proxies] == ["made-by-api"]


def test_a_proxy_that_gives_up_an_address_is_changed_before_the_one_taking_it() -> None:
    """Whatever the order of the file: the taker would bind an address still held."""
    old = target(proxy("a", listen="127.0.0.1:8000"),
                 proxy("b", listen=["127.0.0.1:8001", "127.0.0.1:8002"]),
                 proxy("c", listen="127.0.0.1:8003"))
    new = target(proxy("a", listen=["127.0.0.1:8000", "[::]:8002"]),  # overlaps b's
                 proxy("b", listen="127.0.0.1:8001"),
                 proxy("c", listen="127.0.0.1:8004"))
    assert [c.new.name for c in plan(old, new).change] == ["b", "a", "c"]
    # Back again: a gives up, b takes; already in order.
    assert [c.new.name for c in plan(new, old).change] == ["a", "b", "c"]


def test_two_proxies_swapping_addresses_keep_the_file_order() -> None:
    old = target(proxy("a", listen="127.0.0.1:8000"), proxy("b", listen="127.0.0.1:8001"))
    new = target(proxy("a", listen="127.0.0.1:8001"), proxy("b", listen="127.0.0.1:8000"))
    assert [c.new.name for c in plan(old, new).change] == ["a", "b"]
