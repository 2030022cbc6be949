"""The ``message`` condition: the counter (midway.chain.toxics.message) at every
split point of framed messages and against a count over the whole stream, and
toxics behind it driven with bytes under a fake clock (exact bytes passed, the
other stream's count, framings, a stream that breaks its framing, validation)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from midway.chain.toxics import Conditions, ToxicError, make_toxic
from midway.chain.toxics.config import toxic_table_from_spec
from midway.chain.toxics.message import MessageCounter

from .harness import EOF, FakeOutput, run, run_stage
from .test_trigger import stages

pytestmark = pytest.mark.timeout(30)

LINES = [b"GET a\r\n", b"GET bb\r\n", b"SET c 1\r\n", b"GET d\r\n"]
STREAM = b"".join(LINES)
THIRD = len(LINES[0]) + len(LINES[1])  # where the 3rd message begins


def split(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def found(counter: MessageCounter, chunks: list[bytes]) -> int | None:
    """The stream offset that the counter reported (chunk start + offset)."""
    pos = 0
    for chunk in chunks:
        at = counter.feed(chunk)
        if at is not None:
            assert 0 <= at < len(chunk)  # by the chunk holding that first byte
            assert counter.feed(b"more") is None  # reported once
            return pos + at
        pos += len(chunk)
    return None


@pytest.mark.parametrize("cuts", [(), *((c,) for c in range(1, len(STREAM))),
                                  *itertools.combinations(range(THIRD - 3, THIRD + 3), 2)])
def test_the_third_line_is_found_at_its_first_byte_wherever_the_stream_is_cut(
    cuts: tuple[int, ...]
) -> None:
    chunks = split(STREAM, cuts)
    counter = MessageCounter(3, "line")
    at = found(counter, chunks)
    assert at == THIRD == counter.start


def test_a_chunk_that_ends_on_the_boundary_reports_at_the_next_one() -> None:
    counter = MessageCounter(3, "line")
    assert counter.feed(STREAM[:THIRD]) is None  # two whole lines: the 3rd not begun
    assert counter.start is None
    assert counter.feed(STREAM[THIRD:]) == 0
    assert counter.start == THIRD


def test_the_first_message_is_the_first_byte() -> None:
    counter = MessageCounter(1)
    assert counter.feed(b"x") == 0


def test_fewer_messages_never_trigger() -> None:
    counter = MessageCounter(6, "line")  # four lines and the start of a fifth
    assert all(counter.feed(bytes([b])) is None for b in STREAM + b"partial")
    assert counter.start is None and counter.error is None


LENGTH_MESSAGES = [b"\x00\x02hi", b"\x00\x00", b"\x00\x05hello", b"\x00\x01!"]


@pytest.mark.parametrize("cut", range(1, len(b"".join(LENGTH_MESSAGES))))
def test_length_prefixed_messages_at_every_split(cut: int) -> None:
    data = b"".join(LENGTH_MESSAGES)
    counter = MessageCounter(4, "length:2:big")
    assert found(counter, split(data, (cut,))) == len(data) - len(LENGTH_MESSAGES[3])


def test_fixed_size_messages() -> None:
    counter = MessageCounter(3, "fixed:4")
    assert found(counter, [b"abc", b"defgh", b"ijkl"]) == 8


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"") + b"\n"),
                      min_size=1, max_size=8),
       n=st.integers(1, 9), cuts=st.lists(st.integers(0, 120), max_size=6))
def test_the_start_is_the_sum_of_the_earlier_messages(
    lines: list[bytes], n: int, cuts: list[int]
) -> None:
    data = b"".join(lines)
    chunks = split(data, tuple(sorted({c for c in cuts if 0 < c < len(data)})))
    expected = sum(len(line) for line in lines[:n - 1]) if n <= len(lines) else None
    assert found(MessageCounter(n, "line"), chunks) == expected


def test_a_stream_that_breaks_its_framing_gives_up() -> None:
    counter = MessageCounter(3, "line", max_size=8)
    assert counter.feed(b"ok\n" + b"x" * 20) is None
    assert counter.error is not None and "limit" in counter.error
    assert counter.feed(b"\nthird\n") is None


# -- toxics behind the condition -------------------------------------------------


@pytest.mark.parametrize("cut", range(0, len(STREAM)))
def test_reset_at_the_third_request_passes_the_first_two_whole_at_any_split(cut: int) -> None:
    up, _ = stages("reset_peer", message=3)
    assert up is not None
    chunks = split(STREAM, (cut,)) if cut else [STREAM]
    out = run(run_stage(up, [(0.0, c) for c in chunks], out=FakeOutput(direction="upstream")))
    assert out.sent == STREAM[:THIRD]  # not one byte of the third
    assert out.kinds[-1] == "reset"


def test_latency_from_the_third_message_on() -> None:
    up, _ = stages("latency", attributes={"latency": 500}, message=3, framing=r"line:\r\n")
    assert up is not None
    out = run(run_stage(up, [(0.0, STREAM[:THIRD + 2]), (1.0, STREAM[THIRD + 2:]), (2.0, EOF)]))
    assert out.sends == [(0.0, STREAM[:THIRD]), (0.5, STREAM[THIRD:THIRD + 2]),
                         (1.5, STREAM[THIRD + 2:])]


def test_replies_after_the_clients_second_request_are_delayed() -> None:
    # message_stream: count the client's requests, delay the replies.
    async def main() -> FakeOutput:
        up, down = stages("latency", stream="downstream", attributes={"latency": 500},
                          message=2, message_stream="upstream")
        assert up is not None and down is not None
        out = FakeOutput()
        up_out = FakeOutput(out.clock, direction="upstream")
        await up.data(LINES[0], up_out)
        await down.data(b"+1\r\n", out)          # the reply to the 1st: on time
        await up.data(LINES[1], up_out)          # the 2nd request's first byte: fires
        assert up_out.sent == LINES[0] + LINES[1]  # the watched stream is untouched
        return await run_stage(down, [(1.0, b"+2\r\n")], out=out)

    out = run(main())
    assert out.sends == [(0.0, b"+1\r\n"), (1.5, b"+2\r\n")]


def test_for_s_ends_a_message_triggered_toxic() -> None:
    up, _ = stages("latency", attributes={"latency": 300}, message=2, for_s=1)
    assert up is not None
    out = run(run_stage(up, [(0.0, b"a\nb\n"), (2.0, b"c\n"), (3.0, EOF)]))
    assert out.sends == [(0.0, b"a\n"), (0.3, b"b\n"), (2.0, b"c\n")]


def test_a_broken_framing_is_logged_and_the_toxic_never_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    up, _ = stages("reset_peer", message=2, framing="length:1:inclusive")
    assert up is not None
    with caplog.at_level(logging.WARNING, logger="midway"):
        out = run(run_stage(up, [(0.0, b"\x00abc"), (1.0, b"\x02x"), (2.0, EOF)]))
    assert out.sent == b"\x00abc\x02x" and out.kinds[-1] == "eof"
    assert sum("will not apply" in r.getMessage() for r in caplog.records) == 1


def test_message_conditions_round_trip() -> None:
    raw = {"message": 3, "message_stream": "downstream", "framing": "length:4:big", "for_s": 2.0}
    c = Conditions.from_mapping(raw)
    assert Conditions.from_mapping(c.to_json()) == c
    assert c.to_json() == raw


@pytest.mark.parametrize(("conditions", "field", "fragment"), [
    ({"message": 0}, "conditions.message", "at least 1"),
    ({"message": "3"}, "conditions.message", "integer"),
    ({"message": 2, "framing": "lines"}, "conditions.framing", "unknown kind"),
    ({"message": 2, "framing": 4}, "conditions.framing", "string"),
    ({"framing": "line"}, "conditions.framing", "needs a message"),
    ({"message_stream": "upstream"}, "conditions.message_stream", "needs a message"),
    ({"message": 2, "message_stream": "up"}, "conditions.message_stream", "upstream"),
    ({"message": 2, "match": "x"}, "conditions.message", "not both"),
    ({"for_s": 1}, "conditions.for_s", "match or message"),
])
def test_bad_message_conditions_name_the_setting(
    conditions: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(ToxicError) as info:
        make_toxic("latency", conditions=conditions)
    assert info.value.field == field
    assert fragment in info.value.message


def test_toxic_flag_takes_message_conditions() -> None:
    assert toxic_table_from_spec(
        r"reset_peer:stream=upstream,message=3,framing=line:\r\n,message_stream=upstream"
    ) == {"type": "reset_peer", "stream": "upstream",
          "conditions": {"message": 3, "framing": r"line:\r\n", "message_stream": "upstream"}}
