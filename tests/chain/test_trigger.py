"""Content-triggered toxics (conditions.match, match_stream, for_s) driven with
bytes under a fake clock: exact byte positions at every split point, a trigger
seen on the other direction, the for_s window, and validation."""

from __future__ import annotations

from typing import Any

import pytest

from midway.chain.base import Stage
from midway.chain.toxics import Conditions, ToxicError, make_toxic
from midway.chain.toxics.config import toxic_table_from_spec

from .harness import EOF, FakeOutput, make_info, run, run_stage

pytestmark = pytest.mark.timeout(30)

approx: Any = pytest.approx

STREAM = b"MULTI\r\nSET a 1\r\nINCR b\r\nEXEC\r\nPING\r\n"
START = STREAM.index(b"EXEC")


def stages(type_name: str, stream: str = "upstream", attributes: dict[str, Any] | None = None,
           **conditions: Any) -> tuple[Stage | None, Stage | None]:
    """(upstream stage, downstream stage) of one connection."""
    t = make_toxic(type_name, stream=stream, attributes=attributes, conditions=conditions, seed=1)
    att = t.attach(make_info())
    assert att is not None
    return att.upstream, att.downstream


@pytest.mark.parametrize("cut", range(0, len(STREAM)))
def test_reset_at_exec_passes_every_byte_before_it_at_any_split(cut: int) -> None:
    up, _ = stages("reset_peer", match=r"EXEC\r\n")
    assert up is not None
    chunks = [STREAM[:cut], STREAM[cut:]] if cut else [STREAM]
    out = run(run_stage(up, [(0.0, c) for c in chunks if c], out=FakeOutput(direction="upstream")))
    # Before the match: untouched; from its first byte (or, if it began in a chunk
    # already passed, from the chunk that completes it): the toxic.
    end_of_match = START + len(b"EXEC\r\n")
    passed = START if cut <= START or cut >= end_of_match else cut
    assert out.sent == STREAM[:passed]
    assert out.kinds[-1] == "reset"


def test_without_a_match_nothing_happens() -> None:
    up, _ = stages("reset_peer", match=r"DISCARD")
    assert up is not None
    out = run(run_stage(up, [(0.0, STREAM), (1.0, EOF)]))
    assert out.sent == STREAM and out.kinds[-1] == "eof"


def test_the_toxic_applies_for_the_rest_of_the_connection() -> None:
    up, _ = stages("latency", attributes={"latency": 500}, match="SET")
    assert up is not None
    out = run(run_stage(up, [(0.0, b"GET x\r\nSET y\r\n"), (1.0, b"GET z\r\n"), (2.0, EOF)]))
    assert out.sends == [(0.0, b"GET x\r\n"), (0.5, b"SET y\r\n"), (1.5, b"GET z\r\n")]


def test_replies_before_a_match_on_the_other_stream_pass_untouched() -> None:
    # "add 500 ms of latency to every reply after the client sends MULTI"
    async def main() -> tuple[FakeOutput, FakeOutput]:
        up, down = stages("latency", stream="downstream", attributes={"latency": 500},
                          match="MULTI", match_stream="upstream")
        assert up is not None and down is not None
        up_out = FakeOutput(direction="upstream")
        down_out = FakeOutput(up_out.clock)
        replies = await run_stage(down, [(0.0, b"+OK\r\n")], out=down_out, until=1.0)
        requests = await run_stage(up, [(1.0, b"PING\r\nMULTI\r\n")], out=up_out, until=2.0)
        return requests, replies

    requests, replies = run(main())
    assert requests.sends == [(1.0, b"PING\r\nMULTI\r\n")]  # the watched stream is untouched
    assert replies.sends == [(0.0, b"+OK\r\n")]


def test_cross_stream_trigger_applies_from_the_next_chunk() -> None:
    async def main() -> FakeOutput:
        up, down = stages("latency", stream="downstream", attributes={"latency": 500},
                          match="MULTI", match_stream="upstream")
        assert up is not None and down is not None
        out = FakeOutput()
        await up.data(b"MULTI\r\n", FakeOutput(out.clock, direction="upstream"))
        return await run_stage(down, [(0.0, b"+OK\r\n"), (1.0, b"+QUEUED\r\n")], out=out)

    out = run(main())
    assert out.sends == [(0.5, b"+OK\r\n"), (1.5, b"+QUEUED\r\n")]


def test_for_s_ends_the_toxic_that_long_after_the_match() -> None:
    up, _ = stages("latency", attributes={"latency": 300}, match="GO", for_s=2)
    assert up is not None
    script = [(0.0, b"a"), (1.0, b"GO"), (2.0, b"b"), (3.5, b"c"), (4.0, EOF)]
    out = run(run_stage(up, script))
    assert out.sends == [(0.0, b"a"), (1.3, b"GO"), (2.3, b"b"), (3.5, b"c")]
    assert [e.time for e in out.events if e.kind == "eof"] == [4.0]


def test_for_s_on_a_timer_toxic_cancels_its_timer() -> None:
    up, _ = stages("limit_time", attributes={"after_s": 5}, match="GO", for_s=1)
    assert up is not None
    out = run(run_stage(up, [(0.0, b"GO"), (2.0, b"x")], until=20.0))
    assert out.sent == b"GOx" and out.first("close") is None


def test_removal_after_the_match_flushes_what_the_toxic_holds() -> None:
    up, _ = stages("blackhole", match="B")
    assert up is not None
    out = run(run_stage(up, [(0.0, b"aaBcc"), (1.0, b"dd"), (2.0, EOF)], remove_at=5.0))
    assert out.sends == [(0.0, b"aa"), (5.0, b"Bcc"), (5.0, b"dd")]
    assert out.kinds[-1] == "eof"


def test_match_with_after_s_and_the_conditions_round_trip() -> None:
    raw = {"match": r"EXEC\r\n", "match_stream": "downstream", "for_s": 1.5, "after_s": 2}
    c = Conditions.from_mapping(raw)
    assert Conditions.from_mapping(c.to_json()) == c
    assert c.to_json() == {**raw, "after_s": 2.0}


@pytest.mark.parametrize(("conditions", "field", "fragment"), [
    ({"match": "("}, "conditions.match", "not a regular expression"),
    ({"match": ""}, "conditions.match", "non-empty"),
    ({"match": 5}, "conditions.match", "regular expression"),
    ({"for_s": 1}, "conditions.for_s", "needs a match or message"),
    ({"match_stream": "upstream"}, "conditions.match_stream", "needs a match"),
    ({"match": "a", "match_stream": "up"}, "conditions.match_stream", "upstream"),
    ({"match": "a", "for_s": -1}, "conditions.for_s", "negative"),
])
def test_bad_match_conditions_name_the_setting(
    conditions: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(ToxicError) as info:
        make_toxic("latency", conditions=conditions)
    assert info.value.field == field
    assert fragment in info.value.message


def test_toxic_flag_keeps_the_pattern_as_text() -> None:
    assert toxic_table_from_spec(r"reset_peer:stream=upstream,match=EXEC\r\n,for_s=2") == {
        "type": "reset_peer", "stream": "upstream",
        "conditions": {"match": r"EXEC\r\n", "for_s": 2}}
