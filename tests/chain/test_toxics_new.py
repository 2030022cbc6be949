"""midway's own toxics (limit_time, stall, corrupt) and seeded randomness, driven
directly with bytes under a fake clock."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest

from midway.chain.base import Stage
from midway.chain.toxics import ToxicError, make_toxic
from midway.chain.toxics.base import ToxicStage
from midway.chain.toxics.corrupt import CorruptStage, next_gap
from midway.core.clock import FakeClock

from .harness import EOF, FakeOutput, Feeder, make_info, run, run_stage

pytestmark = pytest.mark.timeout(30)

approx: Any = pytest.approx


def stage_of(type_name: str, sequence: int = 1, seed: int | None = 1, **attributes: Any) -> Stage:
    t = make_toxic(type_name, attributes=attributes, seed=seed)
    att = t.attach(make_info(sequence))
    assert att is not None
    stage = att.stage(t.stream)
    assert stage is not None
    return stage


# -- limit_time -----------------------------------------------------------------


def test_limit_time_passes_data_then_closes_at_the_deadline_from_start() -> None:
    async def main() -> FakeOutput:
        out = FakeOutput(FakeClock(start=10.0))
        stage = stage_of("limit_time", after_s=2.5)
        stage.start(out)  # the relay installs the stage as the connection opens
        script = [(10.0, b"a"), (11.0, b"b"), (12.4, b"c"), (12.6, b"late")]
        return await run_stage(stage, script, out=out, until=20.0)

    out = run(main())
    assert out.sends == [(10.0, b"a"), (11.0, b"b"), (12.4, b"c")]
    close = out.first("close")
    assert close is not None and close.time == approx(12.5)
    assert "limit_time" in close.reason and "2.5 s" in close.reason


def test_limit_time_closes_a_busy_connection_too() -> None:
    # Toxiproxy's PR #195 bug: steady traffic kept the connection open.  Here a
    # chunk every 100 ms does not move the deadline.
    stage = stage_of("limit_time", after_s=1)
    script = [(i * 0.1, b"x") for i in range(30)]
    out = run(run_stage(stage, script, until=5.0))
    assert out.first("close") is not None
    assert out.first("close").time == approx(1.0)  # type: ignore[union-attr]
    assert all(t < 1.0 for t, _ in out.sends)
    assert out.kinds.count("close") == 1


def test_limit_time_without_start_counts_from_the_first_chunk() -> None:
    stage = stage_of("limit_time", after_s=2)
    out = run(run_stage(stage, [(5.0, b"a"), (6.0, b"b")], until=20.0))
    assert out.sends == [(5.0, b"a"), (6.0, b"b")]
    assert out.first("close").time == approx(7.0)  # type: ignore[union-attr]


def test_limit_time_zero_closes_at_once_and_drops_the_chunk() -> None:
    out = run(run_stage(stage_of("limit_time", after_s=0), [(1.0, b"a")], until=2.0))
    assert out.kinds == ["close"]


def test_limit_time_passes_eof_and_keeps_counting() -> None:
    stage = stage_of("limit_time", after_s=3)
    out = run(run_stage(stage, [(0.0, b"a"), (1.0, EOF)], until=10.0))
    assert [(e.kind, e.time) for e in out.events] == [
        ("send", 0.0), ("eof", 1.0), ("close", approx(3.0)),
    ]  # fmt: skip


def test_limit_time_removal_cancels_the_close() -> None:
    stage = stage_of("limit_time", after_s=3)
    out = run(run_stage(stage, [(0.0, b"a"), (4.0, b"b")], remove_at=2.0, until=10.0))
    assert out.sent == b"ab"
    assert out.first("close") is None


# -- stall ------------------------------------------------------------------------


def test_stall_holds_everything_then_resumes_in_order() -> None:
    async def main() -> tuple[FakeOutput, Feeder]:
        out = FakeOutput()
        stage = stage_of("stall", stall_s=5)
        stage.start(out)
        feeder = Feeder(stage, out)
        task = asyncio.ensure_future(
            feeder.feed([(1.0, b"a"), (2.0, b"b"), (3.0, EOF)]))
        await out.clock.advance(4.9)
        assert out.events == [] and feeder.calls == 1  # one chunk held, the rest unread
        await out.clock.advance(10.0)
        assert task.done()
        return out, feeder

    out, _ = run(main())
    assert out.sends == [(5.0, b"a"), (5.0, b"b")]
    assert out.kinds == ["send", "send", "eof"]


def test_stall_is_over_for_good_after_stall_s() -> None:
    stage = stage_of("stall", stall_s=1)
    out = run(run_stage(stage, [(0.0, b"a"), (0.5, b"b"), (3.0, b"c"), (7.0, EOF)]))
    assert out.sends == [(1.0, b"a"), (1.0, b"b"), (3.0, b"c")]
    assert [(e.kind, e.time) for e in out.events][-1] == ("eof", 7.0)


def test_stall_counts_from_the_first_chunk_without_start() -> None:
    out = run(run_stage(stage_of("stall", stall_s=2), [(10.0, b"a"), (11.0, b"b")]))
    assert out.sends == [(12.0, b"a"), (12.0, b"b")]


def test_stall_removal_mid_stall_releases_what_it_holds_in_order() -> None:
    stage = stage_of("stall", stall_s=100)
    script = [(0.0, b"a"), (1.0, b"b"), (2.0, EOF)]
    out = run(run_stage(stage, script, remove_at=10.0, until=11.0))
    assert out.sends == [(10.0, b"a"), (10.0, b"b")]
    assert out.kinds == ["send", "send", "eof"]


def test_stall_zero_does_not_stall() -> None:
    out = run(run_stage(stage_of("stall", stall_s=0), [(1.0, b"a"), (2.0, EOF)]))
    assert [(e.kind, e.time) for e in out.events] == [("send", 1.0), ("eof", 2.0)]


# -- corrupt ----------------------------------------------------------------------


def bit_flips(before: bytes, after: bytes) -> list[int]:
    """Positions that differ, each checked to differ by exactly one bit."""
    assert len(before) == len(after)
    positions = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    for i in positions:
        assert bin(before[i] ^ after[i]).count("1") == 1, f"byte {i} changed by more than a bit"
    return positions


DATA = random.Random(4).randbytes(200_000)


def test_corrupt_flips_one_bit_in_about_the_given_share_of_bytes() -> None:
    out = run(run_stage(stage_of("corrupt", probability=0.01), [(0.0, DATA), (1.0, EOF)]))
    flipped = bit_flips(DATA, out.sent)
    assert 1700 <= len(flipped) <= 2300  # 2000 expected; 7 standard deviations apart
    assert out.kinds == ["send", "eof"]


def test_corrupt_probability_one_flips_every_byte_and_zero_none() -> None:
    every = run(run_stage(stage_of("corrupt", probability=1), [(0.0, DATA[:5000])]))
    assert len(bit_flips(DATA[:5000], every.sent)) == 5000
    none = run(run_stage(stage_of("corrupt", probability=0), [(0.0, DATA[:5000])]))
    assert none.sent == DATA[:5000]


def test_corrupt_positions_do_not_depend_on_chunk_boundaries() -> None:
    whole = run(run_stage(stage_of("corrupt", probability=0.003), [(0.0, DATA)]))
    cuts = sorted(random.Random(8).sample(range(1, len(DATA)), 300))
    pieces = [DATA[a:b] for a, b in zip([0, *cuts], [*cuts, len(DATA)], strict=True)]
    split = run(run_stage(stage_of("corrupt", probability=0.003),
                          [(i * 0.001, p) for i, p in enumerate(pieces)]))
    assert split.sent == whole.sent
    assert [len(d) for _, d in split.sends] == [len(p) for p in pieces]  # boundaries kept


def test_corrupt_positions_repeat_with_the_seed_and_differ_without() -> None:
    def flips(seed: int, sequence: int = 1) -> list[int]:
        stage = stage_of("corrupt", sequence=sequence, seed=seed, probability=0.001)
        assert isinstance(stage, CorruptStage)
        return bit_flips(DATA, stage.corrupt(DATA))

    assert flips(5) == flips(5)
    assert flips(5) != flips(6)
    assert flips(5, sequence=1) != flips(5, sequence=2)  # each connection its own


def test_next_gap_is_geometric() -> None:
    rng = random.Random(3)
    gaps = [next_gap(0.1, rng) for _ in range(20_000)]
    assert min(gaps) == 0
    assert sum(gaps) / len(gaps) == approx(9.0, rel=0.05)  # (1 - p) / p
    assert next_gap(1.0, rng) == 0


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_name", "attrs", "field", "fragment"),
    [
        ("limit_time", {"after_s": -1}, "attributes.after_s", "negative"),
        ("limit_time", {"after_s": "5"}, "attributes.after_s", "number"),
        ("limit_time", {"after_s": float("inf")}, "attributes.after_s", "number"),
        ("stall", {"stall_s": True}, "attributes.stall_s", "number"),
        ("stall", {"stall": 1}, "attributes.stall", "unknown"),
        ("corrupt", {"probability": 1.5}, "attributes.probability", "at most 1"),
        ("corrupt", {"probability": -0.1}, "attributes.probability", "negative"),
    ],
)
def test_new_toxics_validate_their_attributes(
    type_name: str, attrs: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(ToxicError) as info:
        make_toxic(type_name, attributes=attrs)
    assert info.value.field == field
    assert fragment in info.value.message


def test_number_attributes_accept_integers_and_report_floats() -> None:
    t = make_toxic("stall", attributes={"stall_s": 2})
    assert t.to_json()["attributes"] == {"stall_s": 2.0}
    assert make_toxic("corrupt", attributes={"probability": 0.25}).attributes.probability == 0.25


# -- seeds --------------------------------------------------------------------------


def jitter_schedule(seed: int | None, connections: int = 5, toxicity: float = 1.0,
                    **kwargs: Any) -> list[list[float] | None]:
    """Per connection, the delays (ms) of 50 chunks under latency 100 ± 50 ms, or
    ``None`` where the toxicity draw skipped the connection."""
    t = make_toxic("latency", toxicity=toxicity, attributes={"latency": 100, "jitter": 50},
                   seed=seed, **kwargs)
    schedule: list[list[float] | None] = []
    for sequence in range(1, connections + 1):
        att = t.attach(make_info(sequence))
        if att is None:
            schedule.append(None)
            continue
        stage = att.stage("downstream")
        script = [(float(i), b"x") for i in range(50)]
        out = run(run_stage(stage, script, until=100.0))  # type: ignore[arg-type]
        schedule.append([round((at - i) * 1000, 3) for i, (at, _) in enumerate(out.sends)])
    return schedule


def test_equal_seeds_give_identical_schedules_and_different_seeds_differ() -> None:
    a = jitter_schedule(1234, toxicity=0.6, connections=12)
    assert a == jitter_schedule(1234, toxicity=0.6, connections=12)
    assert a != jitter_schedule(1235, toxicity=0.6, connections=12)
    assert None in a and any(s is not None for s in a)  # the toxicity draw is seeded too


def test_a_connections_draws_do_not_depend_on_other_connections() -> None:
    # Connection 3 sees the same delays whether or not connections 1 and 2 ran
    # first and however much traffic they carried: one generator per connection.
    t = make_toxic("latency", attributes={"latency": 100, "jitter": 50}, seed=9)
    alone = jitter_schedule(9, connections=3)[2]
    att = t.attach(make_info(3))
    assert att is not None
    stage = att.stage("downstream")
    assert isinstance(stage, ToxicStage)
    out = run(run_stage(stage, [(float(i), b"x") for i in range(50)], until=100.0))
    assert [round((at - i) * 1000, 3) for i, (at, _) in enumerate(out.sends)] == alone


def test_the_seed_depends_on_the_toxic_name() -> None:
    assert jitter_schedule(7, name="a") != jitter_schedule(7, name="b")


def test_without_a_seed_one_is_drawn_logged_once_and_replays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = make_toxic("latency", name="slow", attributes={"latency": 100, "jitter": 50})
    with caplog.at_level(logging.INFO, logger="midway"):
        for sequence in (1, 2):
            t.attach(make_info(sequence))
    lines = [r.getMessage() for r in caplog.records if "seed" in r.getMessage()]
    assert lines == [f"toxic 'slow': random seed {t.seed} (give seed = {t.seed} to replay this run)"]
    assert jitter_schedule(None, name="slow", connections=3) != jitter_schedule(
        t.seed, name="slow", connections=3)  # a fresh draw (1 in 2**32 to collide)
    replay = make_toxic("latency", name="slow", attributes={"latency": 100, "jitter": 50},
                        seed=t.seed)
    assert replay.seed == t.seed


def test_no_log_line_when_the_seed_is_given(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="midway"):
        make_toxic("latency", seed=3).attach(make_info())
    assert not [r for r in caplog.records if "seed" in r.getMessage()]


def test_an_injected_rng_is_shared_and_no_seed_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(1)
    with caplog.at_level(logging.INFO, logger="midway"):
        t = make_toxic("latency", toxicity=0.5, rng=rng)
        t.attach(make_info(1))
    assert t.connection_rng(1) is rng and t.connection_rng(2) is rng
    assert not caplog.records


def test_seed_must_be_an_integer() -> None:
    with pytest.raises(ToxicError) as info:
        make_toxic("latency", seed="x")  # type: ignore[arg-type]
    assert info.value.field == "seed"
