"""Toxics driven directly with bytes under a fake clock: exact timings, order,
byte-exactness, live removal, bounded memory, conditions and validation."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Mapping
from typing import Any

import pytest

from midway.chain.base import Stage
from midway.chain.toxics import TOXICS, Conditions, Toxic, ToxicError, make_toxic
from midway.chain.toxics.base import AfterGate, ToxicStage
from midway.chain.toxics.slicer import slice_points
from midway.core.clock import FakeClock
from midway.errors import MidwayError

from .harness import EOF, FakeOutput, Feeder, loop_gaps, make_info, run, run_stage

pytestmark = pytest.mark.timeout(30)

approx: Any = pytest.approx


def toxic(type: str, stream: str = "downstream", seed: int = 1, **attributes: Any) -> Toxic[Any]:
    return make_toxic(type, stream=stream, attributes=attributes, rng=random.Random(seed))


def toxic_with(type_name: str, attrs: dict[str, int]) -> Toxic[Any]:
    return make_toxic(type_name, attributes=attrs, rng=random.Random(1))


def stage_of(t: Toxic[Any], sequence: int = 1) -> Stage:
    att = t.attach(make_info(sequence))
    assert att is not None
    stage = att.stage(t.stream)
    assert stage is not None
    return stage


def times(out: FakeOutput) -> list[float]:
    return [t for t, _ in out.sends]


def chunks_at(*pairs: tuple[float, bytes | None]) -> list[tuple[float, bytes | None]]:
    return list(pairs)


def random_script(seed: int, n: int = 30) -> tuple[list[tuple[float, bytes | None]], bytes]:
    rnd = random.Random(seed)
    t = 0.0
    script: list[tuple[float, bytes | None]] = []
    for i in range(n):
        t += rnd.choice([0.0, 0.001, 0.02, 0.3])
        script.append((t, bytes([i % 256]) * rnd.randint(1, 3000)))
    return script, b"".join(c for _, c in script if c)


# -- registry, construction, JSON ---------------------------------------------------

EXPECTED_ATTRIBUTES = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slow_close": {"delay": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slicer": {"average_size": 1, "size_variation": 0, "delay": 0},
    "limit_data": {"bytes": 0},
    "blackhole": {},
    "noop": {},
    "limit_time": {"after_s": 0.0},
    "stall": {"stall_s": 0.0},
    "corrupt": {"probability": 0.0},
}


def test_registry_has_every_toxic_type() -> None:
    assert set(TOXICS) == set(EXPECTED_ATTRIBUTES)
    for name, cls in TOXICS.items():
        assert cls.type == name


@pytest.mark.parametrize("type_name", sorted(EXPECTED_ATTRIBUTES))
def test_to_json_has_toxiproxy_shape_and_every_default(type_name: str) -> None:
    attrs = {"average_size": 1} if type_name == "slicer" else {}
    t = make_toxic(type_name, attributes=attrs)
    assert t.to_json() == {
        "name": f"{type_name}_downstream",
        "type": type_name,
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": EXPECTED_ATTRIBUTES[type_name],
    }


def test_to_json_reflects_settings() -> None:
    t = make_toxic(
        "latency",
        name="slow",
        stream="upstream",
        toxicity=0.25,
        attributes={"latency": 1000},
        conditions={"first_n": 2},
    )
    assert t.to_json() == {
        "name": "slow",
        "type": "latency",
        "stream": "upstream",
        "toxicity": 0.25,
        "attributes": {"latency": 1000, "jitter": 0},
    }
    assert t.conditions.to_json() == {"first_n": 2}


def test_default_name_follows_toxiproxy() -> None:
    assert make_toxic("timeout", stream="upstream").name == "timeout_upstream"
    assert make_toxic("bandwidth").name == "bandwidth_downstream"


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"type": "latencyy"}, "type", "unknown toxic type 'latencyy'"),
        ({"type": "latency", "attributes": {"latnecy": 1}}, "attributes.latnecy", "unknown"),
        ({"type": "latency", "attributes": {"jitter": -5}}, "attributes.jitter", "negative"),
        ({"type": "latency", "attributes": {"latency": "100"}}, "attributes.latency", "integer"),
        ({"type": "latency", "attributes": {"latency": 1.5}}, "attributes.latency", "integer"),
        ({"type": "latency", "attributes": {"latency": True}}, "attributes.latency", "integer"),
        ({"type": "bandwidth", "attributes": {"rate": -1}}, "attributes.rate", "negative"),
        ({"type": "timeout", "attributes": {"timeout": None}}, "attributes.timeout", "integer"),
        ({"type": "limit_data", "attributes": {"bytes": -1}}, "attributes.bytes", "negative"),
        ({"type": "blackhole", "attributes": {"x": 1}}, "attributes.x", "unknown"),
        ({"type": "slicer"}, "attributes.average_size", "at least 1"),
        (
            {"type": "slicer", "attributes": {"average_size": 8, "size_variation": 8}},
            "attributes.size_variation",
            "smaller than average_size",
        ),
        ({"type": "latency", "attributes": [("latency", 1)]}, "attributes", "mapping"),
        ({"type": "latency", "stream": "up"}, "stream", '"upstream" or "downstream"'),
        ({"type": "latency", "stream": "Downstream"}, "stream", "upstream"),
        ({"type": "latency", "toxicity": 1.01}, "toxicity", "0 to 1"),
        ({"type": "latency", "toxicity": -0.1}, "toxicity", "0 to 1"),
        ({"type": "latency", "toxicity": float("nan")}, "toxicity", "0 to 1"),
        ({"type": "latency", "toxicity": "1"}, "toxicity", "0 to 1"),
        ({"type": "latency", "name": ""}, "name", "a toxic name is 1-64"),
        ({"type": "latency", "conditions": {"first_n": 0}}, "conditions.first_n", "at least 1"),
        ({"type": "latency", "conditions": {"every_nth": 2.0}}, "conditions.every_nth", "integer"),
        ({"type": "latency", "conditions": {"after_s": -1}}, "conditions.after_s", "negative"),
        ({"type": "latency", "conditions": {"after_s": "1"}}, "conditions.after_s", "number"),
        ({"type": "latency", "conditions": {"nth": 1}}, "conditions.nth", "unknown condition"),
        (
            {"type": "latency", "conditions": {"client_cidr": ["10.0.0.0/8", "10.0.0/99"]}},
            "conditions.client_cidr[1]",
            "not a CIDR",
        ),
        ({"type": "latency", "conditions": {"client_cidr": 10}}, "conditions.client_cidr", "CIDR"),
    ],
)
def test_validation_errors_name_the_setting(
    kwargs: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(ToxicError) as info:
        make_toxic(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MidwayError)


def test_valid_edge_values_are_accepted() -> None:
    assert make_toxic("latency", toxicity=0).toxicity == 0.0
    assert make_toxic("latency", toxicity=1).toxicity == 1.0
    t = make_toxic("slicer", attributes={"average_size": 1, "size_variation": 0})
    assert t.attributes.to_json() == {"average_size": 1, "size_variation": 0, "delay": 0}


def test_attributes_validate_when_built_directly() -> None:
    from midway.chain.toxics.latency import LatencyAttributes

    with pytest.raises(ToxicError, match="attributes.latency"):
        LatencyAttributes(latency=-1)


# -- attach: stream, toxicity, conditions -------------------------------------------


@pytest.mark.parametrize("stream", ["upstream", "downstream"])
def test_attach_puts_a_stage_on_its_stream_only(stream: str) -> None:
    att = make_toxic("latency", stream=stream).attach(make_info())
    assert att is not None
    other = "downstream" if stream == "upstream" else "upstream"
    assert isinstance(att.stage(stream), ToxicStage)  # type: ignore[arg-type]
    assert att.stage(other) is None  # type: ignore[arg-type]


def test_each_attach_makes_fresh_state() -> None:
    t = toxic("limit_data", bytes=10)
    assert stage_of(t) is not stage_of(t)


def test_toxicity_one_always_applies_and_zero_never() -> None:
    always = make_toxic("latency", toxicity=1.0, rng=random.Random(3))
    never = make_toxic("latency", toxicity=0.0, rng=random.Random(3))
    infos = [make_info(i) for i in range(1, 501)]
    assert all(always.attach(i) is not None for i in infos)
    assert all(never.attach(i) is None for i in infos)


def test_toxicity_is_a_per_connection_draw_from_the_injected_rng() -> None:
    def pattern(seed: int) -> list[bool]:
        t = make_toxic("latency", toxicity=0.3, rng=random.Random(seed))
        return [t.attach(make_info(i)) is not None for i in range(1, 1001)]

    first = pattern(42)
    assert first == pattern(42)
    assert 250 <= sum(first) <= 350
    expected_rng = random.Random(42)
    assert first == [expected_rng.random() < 0.3 for _ in range(1000)]


def applies(conditions: Mapping[str, object], **info: Any) -> bool:
    t = make_toxic("latency", conditions=conditions)
    return t.attach(make_info(**info)) is not None


def test_client_cidr_condition() -> None:
    cidrs = {"client_cidr": ["10.0.0.0/8", "2001:db8::/32"]}
    assert applies(cidrs, client_addr=("10.1.2.3", 5000))
    assert not applies(cidrs, client_addr=("11.1.2.3", 5000))
    assert applies(cidrs, client_addr=("2001:db8::7", 5000))
    assert not applies(cidrs, client_addr=("2001:db9::7", 5000))
    assert applies(cidrs, client_addr=("::ffff:10.9.9.9", 5000))
    assert not applies(cidrs, client_addr=None)  # unix socket client
    assert not applies(cidrs, client_addr=("not-an-ip", 5000))
    assert applies({"client_cidr": "127.0.0.1"}, client_addr=("127.0.0.1", 1))
    assert not applies({"client_cidr": "127.0.0.1"}, client_addr=("127.0.0.2", 1))
    assert applies({}, client_addr=None)


def test_first_n_and_every_nth_conditions() -> None:
    first = make_toxic("latency", conditions={"first_n": 3})
    assert [first.attach(make_info(i)) is not None for i in range(1, 7)] == [
        True, True, True, False, False, False,
    ]  # fmt: skip
    nth = make_toxic("latency", conditions={"every_nth": 3})
    assert [nth.attach(make_info(i)) is not None for i in range(1, 10)] == [
        False, False, True, False, False, True, False, False, True,
    ]  # fmt: skip
    both = make_toxic("latency", conditions={"every_nth": 2, "first_n": 5})
    assert [s for s in range(1, 11) if both.attach(make_info(s))] == [2, 4]


class FixedDraw(random.Random):
    """A random source whose ``random()`` returns a chosen value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("toxicity", "draw", "expected"),
    [(0.0, 0.0, False), (0.5, 0.4999, True), (0.5, 0.5, False), (1.0, 0.9999999, True)],
)
def test_toxicity_applies_when_the_draw_is_below_it(
    toxicity: float, draw: float, expected: bool
) -> None:
    t = make_toxic("latency", toxicity=toxicity, rng=FixedDraw(draw))
    assert (t.attach(make_info()) is not None) is expected


def test_conditions_are_checked_before_the_toxicity_draw() -> None:
    rng = random.Random(5)
    t = make_toxic("latency", toxicity=0.5, rng=rng, conditions={"first_n": 1})
    state = rng.getstate()
    assert t.attach(make_info(2)) is None
    assert rng.getstate() == state


def test_conditions_round_trip() -> None:
    raw = {"client_cidr": ["10.0.0.0/8"], "first_n": 4, "every_nth": 2, "after_s": 1.5}
    c = Conditions.from_mapping(raw)
    assert Conditions.from_mapping(c.to_json()) == c
    assert c.to_json() == raw
    assert Conditions.from_mapping(None) == Conditions()
    assert Conditions.from_mapping({"client_cidr": "10.1.2.3/8"}).to_json() == {
        "client_cidr": ["10.0.0.0/8"]
    }


def test_after_s_counts_from_creation_on_the_given_clock() -> None:
    async def main() -> FakeOutput:
        clock = FakeClock(start=100.0)
        t = make_toxic(
            "latency", attributes={"latency": 500}, conditions={"after_s": 2}, clock=clock
        )
        stage = stage_of(t)
        assert isinstance(stage, AfterGate)
        script = chunks_at((100.5, b"a"), (101.99, b"b"), (102.0, b"c"), (103.0, b"d"))
        return await run_stage(stage, script, out=FakeOutput(clock), until=110.0)

    out = run(main())
    assert out.sends == [
        (100.5, b"a"),
        (101.99, b"b"),
        (approx(102.5), b"c"),
        (approx(103.5), b"d"),
    ]


def test_after_s_without_a_clock_counts_from_first_use() -> None:
    async def main() -> FakeOutput:
        clock = FakeClock(start=50.0)
        t = make_toxic("latency", attributes={"latency": 100}, conditions={"after_s": 1})
        assert t.created_at is None
        script = chunks_at((55.0, b"a"), (55.5, b"b"), (56.0, b"c"), (57.0, EOF))
        out = await run_stage(stage_of(t), script, out=FakeOutput(clock), until=60.0)
        assert t.created_at == 55.0
        return out

    out = run(main())
    assert out.sends == [(55.0, b"a"), (55.5, b"b"), (approx(56.1), b"c")]
    assert out.events[-1].kind == "eof" and out.events[-1].time == approx(57.0)


def test_after_s_gate_passes_eof_unchanged_before_activation() -> None:
    async def main() -> FakeOutput:
        clock = FakeClock()
        t = make_toxic("slow_close", attributes={"delay": 1000}, conditions={"after_s": 5})
        t.created_at = 0.0
        return await run_stage(stage_of(t), [(1.0, EOF)], out=FakeOutput(clock), until=10)

    assert run(main()).events[0].time == 1.0


def test_after_s_gate_hands_removal_to_an_active_toxic() -> None:
    async def main() -> FakeOutput:
        clock = FakeClock()
        t = make_toxic("timeout", conditions={"after_s": 1}, clock=clock)
        script = [(0.5, b"early"), (2.0, b"dropped")]
        return await run_stage(stage_of(t), script, out=FakeOutput(clock), remove_at=3.0)

    out = run(main())
    assert [(e.kind, e.time) for e in out.events] == [("send", 0.5), ("close", 3.0)]


def test_after_s_gate_removal_before_activation_does_nothing() -> None:
    async def main() -> FakeOutput:
        clock = FakeClock()
        t = make_toxic("timeout", conditions={"after_s": 10}, clock=clock)
        return await run_stage(stage_of(t), [(0.5, b"a")], out=FakeOutput(clock), remove_at=3.0)

    assert [(e.kind, e.time) for e in run(main()).events] == [("send", 0.5)]


# -- latency ----------------------------------------------------------------------


def test_latency_delays_each_chunk_from_its_arrival() -> None:
    stage = stage_of(toxic("latency", latency=200))
    script = chunks_at((0.0, b"one"), (0.05, b"two"), (0.1, b"three"), (0.1, EOF))
    out = run(run_stage(stage, script))
    assert out.sends == [(approx(0.2), b"one"), (approx(0.25), b"two"), (approx(0.3), b"three")]
    assert out.kinds == ["send", "send", "send", "eof"]
    assert out.events[-1].time == approx(0.3)


def test_latency_is_not_cumulative_on_a_stream() -> None:
    stage = stage_of(toxic("latency", latency=100))
    script = [(i * 0.01, bytes([i])) for i in range(50)]
    out = run(run_stage(stage, script))
    assert times(out) == [approx(0.1 + i * 0.01) for i in range(50)]
    assert out.sent == bytes(range(50))


def test_latency_with_jitter_draws_per_chunk_from_the_rng() -> None:
    stage = stage_of(toxic("latency", seed=7, latency=100, jitter=40))
    script = [(float(i), b"x%d" % i) for i in range(200)]
    out = run(run_stage(stage, script, until=500))
    delays = [t - i for i, t in enumerate(times(out))]
    assert all(0.06 - 1e-9 <= d <= 0.139 + 1e-9 for d in delays)
    assert len({round(d, 3) for d in delays}) > 40
    rng = random.Random(7)
    rng.random()  # the toxicity draw made by attach()
    assert [round(d * 1000) for d in delays] == [100 + rng.randrange(80) - 40 for _ in range(200)]


def test_latency_jitter_never_reorders() -> None:
    stage = stage_of(toxic("latency", seed=3, latency=10, jitter=10))
    script = [(i * 0.001, bytes([i])) for i in range(100)]
    out = run(run_stage(stage, script))
    assert out.sent == bytes(range(100))
    assert times(out) == sorted(times(out))


def test_latency_removal_mid_sleep_sends_at_once_and_loses_nothing() -> None:
    stage = stage_of(toxic("latency", latency=1000))
    script = chunks_at((0.0, b"a"), (0.1, b"b"), (0.2, b"c"), (0.6, b"d"), (0.7, EOF))
    out = run(run_stage(stage, script, remove_at=0.5))
    assert out.sends == [(0.5, b"a"), (0.5, b"b"), (0.5, b"c"), (0.6, b"d")]
    assert out.kinds[-1] == "eof"


# -- bandwidth --------------------------------------------------------------------


def test_bandwidth_kb_is_1000_bytes_and_large_chunks_go_in_100ms_slices() -> None:
    stage = stage_of(toxic("bandwidth", rate=1))
    out = run(run_stage(stage, [(0.0, b"x" * 250)]))
    assert out.sends == [
        (approx(0.1), b"x" * 100),
        (approx(0.2), b"x" * 100),
        (approx(0.25), b"x" * 50),
    ]


def test_bandwidth_rate_holds_for_a_burst() -> None:
    stage = stage_of(toxic("bandwidth", rate=10))  # 10 000 bytes/s
    script = [(0.0, bytes([i]) * 500) for i in range(8)]
    out = run(run_stage(stage, script))
    assert times(out) == [approx(0.05 * (i + 1)) for i in range(8)]
    assert out.sent == b"".join(c for _, c in script)


def test_bandwidth_splits_a_big_chunk_exactly() -> None:
    stage = stage_of(toxic("bandwidth", rate=10))
    data = bytes(range(256)) * 40  # 10 240 bytes
    out = run(run_stage(stage, [(0.0, data)]))
    assert [len(d) for _, d in out.sends] == [1000] * 10 + [240]
    assert times(out) == [approx(0.1 * i) for i in range(1, 11)] + [approx(1.024)]
    assert out.sent == data


def test_bandwidth_idle_time_earns_no_credit() -> None:
    stage = stage_of(toxic("bandwidth", rate=10))
    out = run(run_stage(stage, [(0.0, b"a" * 500), (1.0, b"b" * 500)]))
    assert times(out) == [approx(0.05), approx(1.05)]


def test_bandwidth_rate_zero_stalls_until_removed() -> None:
    stage = stage_of(toxic("bandwidth", rate=0))
    script = chunks_at((0.0, b"held"), (1.0, b"queued"), (2.0, EOF))
    out = run(run_stage(stage, script, remove_at=7200.0, until=8000.0))
    assert out.sends == [(7200.0, b"held"), (7200.0, b"queued")]
    assert out.kinds == ["send", "send", "eof"]


def test_bandwidth_removal_mid_slices_sends_the_rest_at_once() -> None:
    stage = stage_of(toxic("bandwidth", rate=1))
    data = bytes(range(250)) * 4
    out = run(run_stage(stage, [(0.0, data), (0.5, b"tail")], remove_at=0.35))
    assert [(round(t, 6), len(d)) for t, d in out.sends] == [
        (0.1, 100), (0.2, 100), (0.3, 100), (0.35, 700), (0.5, 4),
    ]  # fmt: skip
    assert out.sent == data + b"tail"


# -- slow_close -------------------------------------------------------------------


def test_slow_close_delays_only_the_eof() -> None:
    stage = stage_of(toxic("slow_close", delay=1500))
    out = run(run_stage(stage, chunks_at((0.0, b"a"), (0.2, b"b"), (1.0, EOF))))
    assert out.events[0].time == 0.0 and out.events[1].time == 0.2
    assert out.kinds == ["send", "send", "eof"]
    assert out.events[2].time == approx(2.5)


def test_slow_close_zero_delay_passes_eof_at_once() -> None:
    out = run(run_stage(stage_of(toxic("slow_close")), [(3.0, EOF)]))
    assert [(e.kind, e.time) for e in out.events] == [("eof", 3.0)]


def test_slow_close_removal_passes_the_eof_on_at_once() -> None:
    stage = stage_of(toxic("slow_close", delay=10_000))
    out = run(run_stage(stage, chunks_at((0.0, b"a"), (1.0, EOF)), remove_at=4.0))
    assert [(e.kind, e.time) for e in out.events] == [("send", 0.0), ("eof", 4.0)]


# -- timeout ----------------------------------------------------------------------


def test_timeout_drops_data_and_closes_after_the_timeout() -> None:
    stage = stage_of(toxic("timeout", timeout=1000))
    out = run(run_stage(stage, [(0.0, b"lost")]))
    assert out.kinds == ["close"]
    assert out.events[0].time == approx(1.0)
    assert "timeout" in out.events[0].reason


def test_timeout_timer_restarts_on_every_dropped_chunk() -> None:
    stage = stage_of(toxic("timeout", timeout=1000))
    out = run(run_stage(stage, [(0.0, b"a"), (0.5, b"b"), (0.9, b"c")]))
    assert out.kinds == ["close"]
    assert out.events[0].time == approx(1.9)


def test_timeout_start_arms_the_timer_without_any_data() -> None:
    async def main() -> FakeOutput:
        out = FakeOutput(FakeClock(start=3.0))
        stage = stage_of(toxic("timeout", timeout=250))
        assert isinstance(stage, ToxicStage)
        stage.start(out)
        stage.start(out)  # idempotent
        await out.clock.advance(1.0)
        return out

    out = run(main())
    assert [(e.kind, e.time) for e in out.events] == [("close", approx(3.25))]


def test_timeout_zero_drops_data_and_never_closes() -> None:
    async def main() -> tuple[FakeOutput, int]:
        stage = stage_of(toxic("timeout", timeout=0))
        out = await run_stage(stage, [(0.0, b"a"), (5.0, b"b")], until=100_000.0)
        return out, out.clock.sleepers

    out, sleepers = run(main())
    assert out.events == []
    assert sleepers == 0


def test_timeout_passes_eof_and_stops_its_timer() -> None:
    stage = stage_of(toxic("timeout", timeout=1000))
    out = run(run_stage(stage, [(0.0, b"a"), (0.5, EOF)], until=10.0))
    assert [(e.kind, e.time) for e in out.events] == [("eof", 0.5)]


def test_timeout_removal_closes_the_connection_like_toxiproxy() -> None:
    stage = stage_of(toxic("timeout", timeout=0))
    out = run(run_stage(stage, [(0.0, b"a"), (1.0, b"b")], remove_at=2.0, until=3.0))
    assert out.kinds == ["close"]
    assert out.events[0].time == 2.0
    assert "removed" in out.events[0].reason


def test_timeout_close_cancels_the_timer() -> None:
    async def main() -> FakeOutput:
        out = FakeOutput()
        stage = stage_of(toxic("timeout", timeout=1000))
        await Feeder(stage, out).feed([(0.0, b"a")])
        await out.clock.advance(0.5)
        stage.close()
        await asyncio.sleep(0)
        assert out.clock.sleepers == 0
        await out.clock.advance(10.0)
        return out

    assert run(main()).events == []


# -- reset_peer -------------------------------------------------------------------


def test_reset_peer_zero_resets_on_the_first_chunk() -> None:
    stage = stage_of(toxic("reset_peer"))
    out = run(run_stage(stage, [(0.3, b"first"), (0.3, b"second")]))
    assert out.kinds == ["reset"]
    assert out.events[0].time == 0.3


def test_reset_peer_resets_timeout_after_the_first_chunk_arrived() -> None:
    stage = stage_of(toxic("reset_peer", timeout=500))
    out = run(run_stage(stage, [(0.2, b"a"), (0.3, b"b"), (2.0, b"c"), (2.5, EOF)]))
    assert [(e.kind, e.time) for e in out.events] == [("reset", approx(0.7))]


def test_reset_peer_waits_for_data_not_for_the_connection() -> None:
    stage = stage_of(toxic("reset_peer", timeout=100))
    out = run(run_stage(stage, [(50.0, b"a")]))
    assert [(e.kind, e.time) for e in out.events] == [("reset", approx(50.1))]


def test_reset_peer_triggered_by_eof() -> None:
    stage = stage_of(toxic("reset_peer", timeout=100))
    out = run(run_stage(stage, [(1.0, EOF)]))
    assert [(e.kind, e.time) for e in out.events] == [("reset", approx(1.1))]


def test_reset_peer_removal_cancels_the_reset_and_loses_nothing() -> None:
    stage = stage_of(toxic("reset_peer", timeout=1000))
    script = chunks_at((0.0, b"a"), (0.1, b"b"), (0.9, b"c"), (1.5, EOF))
    out = run(run_stage(stage, script, remove_at=0.5))
    assert out.kinds == ["send", "send", "send", "eof"]
    assert out.sends == [(0.5, b"a"), (0.5, b"b"), (0.9, b"c")]


# -- slicer -----------------------------------------------------------------------


@pytest.mark.parametrize(("average", "variation"), [(1, 0), (3, 2), (10, 0), (10, 9), (64, 16)])
def test_slice_points_bounds_and_order(average: int, variation: int) -> None:
    rng = random.Random(average * 100 + variation)
    for size in [1, 2, average, average + variation, average + variation + 1, 1000, 4096]:
        ends = list(slice_points(size, average, variation, rng))
        sizes = [b - a for a, b in zip([0, *ends], ends, strict=False)]
        assert ends[-1] == size
        assert all(1 <= s <= average + variation for s in sizes), (size, sizes)
        if size <= average + variation:
            assert ends == [size]


def test_slice_points_is_deterministic_for_a_seed() -> None:
    a = list(slice_points(5000, 20, 10, random.Random(9)))
    assert a == list(slice_points(5000, 20, 10, random.Random(9)))
    assert a != list(slice_points(5000, 20, 10, random.Random(10)))


def test_slice_points_without_variation_halves() -> None:
    assert list(slice_points(16, 4, 0, random.Random(0))) == [4, 8, 12, 16]
    assert list(slice_points(0, 4, 0, random.Random(0))) == []


def test_slicer_reassembles_and_respects_bounds() -> None:
    stage = stage_of(toxic("slicer", average_size=7, size_variation=3))
    script, data = random_script(11)
    out = run(run_stage(stage, [*script, (script[-1][0], EOF)]))
    assert out.sent == data
    assert all(1 <= len(d) <= 10 for _, d in out.sends)
    assert len(out.sends) > len(script)
    assert out.kinds[-1] == "eof"


def test_slicer_waits_delay_microseconds_after_each_piece() -> None:
    stage = stage_of(toxic("slicer", average_size=4, delay=1000))
    out = run(run_stage(stage, [(0.0, b"abcdefghijklmnop"), (0.0, b"qrst")]))
    assert out.sends == [
        (0.0, b"abcd"),
        (approx(0.001), b"efgh"),
        (approx(0.002), b"ijkl"),
        (approx(0.003), b"mnop"),
        (approx(0.004), b"qrst"),
    ]


def test_slicer_removal_sends_the_rest_in_one_piece() -> None:
    stage = stage_of(toxic("slicer", average_size=4, delay=100_000))
    out = run(run_stage(stage, [(0.0, b"abcdefghijklmnop")], remove_at=0.15))
    assert out.sends == [(0.0, b"abcd"), (approx(0.1), b"efgh"), (0.15, b"ijklmnop")]


# -- limit_data -------------------------------------------------------------------


def test_limit_data_passes_exactly_n_bytes_then_closes() -> None:
    stage = stage_of(toxic("limit_data", bytes=10))
    script = [(0.0, b"abcd"), (1.0, b"efgh"), (2.0, b"ijkl"), (3.0, b"mnop"), (4.0, EOF)]
    out = run(run_stage(stage, script))
    assert out.sent == b"abcdefghij"
    assert out.kinds == ["send", "send", "send", "close"]
    assert out.events[-1].time == 2.0
    assert "limit_data" in out.events[-1].reason


def test_limit_data_closes_on_an_exact_boundary() -> None:
    stage = stage_of(toxic("limit_data", bytes=8))
    out = run(run_stage(stage, [(0.0, b"abcd"), (1.0, b"efgh"), (2.0, b"more")]))
    assert out.kinds == ["send", "send", "close"]
    assert out.sent == b"abcdefgh"
    assert out.events[-1].time == 1.0


def test_limit_data_zero_closes_on_first_data() -> None:
    out = run(run_stage(stage_of(toxic("limit_data", bytes=0)), [(0.5, b"x")]))
    assert [(e.kind, e.time) for e in out.events] == [("close", 0.5)]


def test_limit_data_passes_eof_below_the_limit() -> None:
    out = run(run_stage(stage_of(toxic("limit_data", bytes=100)), [(0.0, b"ab"), (1.0, EOF)]))
    assert out.kinds == ["send", "eof"]


def test_limit_data_counts_per_connection() -> None:
    t = toxic("limit_data", bytes=3)
    first = run(run_stage(stage_of(t), [(0.0, b"ab"), (1.0, b"cd")]))
    second = run(run_stage(stage_of(t), [(0.0, b"xy")]))
    assert first.sent == b"abc" and first.kinds[-1] == "close"
    assert second.sent == b"xy" and second.kinds == ["send"]


# -- blackhole --------------------------------------------------------------------


def test_blackhole_passes_nothing_and_keeps_the_connection_open() -> None:
    async def main() -> tuple[FakeOutput, Feeder]:
        out = FakeOutput()
        feeder = Feeder(stage_of(toxic("blackhole")), out)
        task = asyncio.ensure_future(feeder.feed([(0.0, b"a"), (1.0, b"b"), (2.0, EOF)]))
        await out.clock.advance(100_000.0)
        assert not task.done()
        task.cancel()
        return out, feeder

    out, feeder = run(main())
    assert out.events == []
    assert feeder.calls == 1  # it holds one chunk; the relay holds the rest


def test_blackhole_removal_delivers_everything_in_order() -> None:
    stage = stage_of(toxic("blackhole"))
    script = chunks_at((0.0, b"a"), (1.0, b"b"), (2.0, EOF))
    out = run(run_stage(stage, script, remove_at=9000.0, until=9001.0))
    assert out.sends == [(9000.0, b"a"), (9000.0, b"b")]
    assert out.kinds == ["send", "send", "eof"]


def test_blackhole_holds_the_eof_too() -> None:
    out = run(run_stage(stage_of(toxic("blackhole")), [(0.0, EOF)], remove_at=50.0))
    assert [(e.kind, e.time) for e in out.events] == [("eof", 50.0)]


# -- properties across toxics ------------------------------------------------------

LOSSLESS = [
    ("latency", {"latency": 150, "jitter": 50}),
    ("bandwidth", {"rate": 20}),
    ("bandwidth", {"rate": 0}),
    ("slicer", {"average_size": 100, "size_variation": 50, "delay": 2000}),
    ("slow_close", {"delay": 300}),
    ("blackhole", {}),
    ("reset_peer", {"timeout": 100_000}),
    ("stall", {"stall_s": 3}),
]


@pytest.mark.parametrize(("type_name", "attrs"), LOSSLESS)
@pytest.mark.parametrize("remove_at", [0.0005, 0.35, 2.0, 5.0])
def test_removal_at_any_moment_loses_duplicates_and_reorders_nothing(
    type_name: str, attrs: dict[str, int], remove_at: float
) -> None:
    script, data = random_script(int(remove_at * 1000) + len(type_name))
    script.append((script[-1][0] + 0.01, EOF))
    stage = stage_of(toxic_with(type_name, attrs))
    out = run(run_stage(stage, script, remove_at=remove_at, until=1000.0))
    assert out.sent == data
    assert out.kinds[-1] == "eof" and out.kinds.count("eof") == 1
    assert times(out) == sorted(times(out))


FLOWING = [(t, a) for t, a in LOSSLESS if t not in ("blackhole", "reset_peer") and a != {"rate": 0}]


@pytest.mark.parametrize(("type_name", "attrs"), FLOWING)
def test_flowing_toxics_deliver_every_byte_without_removal(
    type_name: str, attrs: dict[str, int]
) -> None:
    script, data = random_script(99)
    stage = stage_of(toxic_with(type_name, attrs))
    out = run(run_stage(stage, [*script, (script[-1][0], EOF)], until=1000.0))
    assert out.sent == data
    assert out.kinds[-1] == "eof"


@pytest.mark.parametrize(("type_name", "attrs"), LOSSLESS)
def test_a_stage_holds_at_most_one_chunk(type_name: str, attrs: dict[str, int]) -> None:
    async def main() -> int:
        script, _ = random_script(5, n=20)
        biggest = max(len(c) for _, c in script if c)
        out = FakeOutput()
        feeder = Feeder(stage_of(toxic_with(type_name, attrs)), out)
        task = asyncio.ensure_future(feeder.feed(script))
        worst = 0
        for _ in range(400):
            await out.clock.advance(0.01)
            worst = max(worst, feeder.given - len(out.sent))
        task.cancel()
        assert worst <= biggest
        return worst

    worst = run(main())
    if type_name != "slow_close":
        assert worst > 0  # the sampling did see data held


def test_slicer_lets_the_loop_run_between_pieces(real_slices: float) -> None:
    """64 KiB cut into single bytes: other tasks still run every few ms."""
    stage = stage_of(toxic("slicer", average_size=1))
    chunk = bytes(range(256)) * 256

    async def main() -> FakeOutput:
        out = FakeOutput()
        async with loop_gaps() as gaps:
            await stage.data(chunk, out)
        assert len(gaps) > 5
        # The median, not the maximum: a loaded machine may preempt the whole
        # process now and then, which no yielding can prevent.
        assert statistics.median(gaps) < 0.01, gaps
        return out

    out = run(main())
    assert out.sent == chunk and len(out.sends) == len(chunk)
