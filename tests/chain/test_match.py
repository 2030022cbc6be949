"""The stream matcher (midway.chain.toxics.match): every split point of the
pattern, several splits at once, the window's bounds, anchors at the window's
cut, and a hypothesis check against a search over the whole stream."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from midway.chain.toxics.match import MATCH_WINDOW, StreamMatcher


def feed_all(m: StreamMatcher, chunks: list[bytes]) -> tuple[int, int] | None:
    """(index of the chunk that reported the match, offset in it), or None."""
    for i, chunk in enumerate(chunks):
        at = m.feed(chunk)
        if at is not None:
            return i, at
    return None


def split(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


STREAM = b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$1\r\na\r\n*1\r\n$4\r\nEXEC\r\n*1\r\n$4\r\nPING\r\n"
PATTERN = rb"EXEC\r\n"
START = STREAM.index(b"EXEC")
END = START + len(b"EXEC\r\n")


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_one_split_anywhere_reports_the_exact_start(cut: int) -> None:
    m = StreamMatcher(PATTERN)
    found = feed_all(m, split(STREAM, (cut,)))
    assert m.start == START
    # The chunk that completes the match reports it, at the match's first byte
    # in that chunk, or 0 when the match began in the chunk before.
    expected_chunk = 0 if cut >= END else 1
    expected_offset = START if cut >= END else max(0, START - cut)
    assert found == (expected_chunk, expected_offset)


@pytest.mark.parametrize("cuts", list(itertools.combinations(range(START - 1, END + 2), 2)))
def test_two_splits_around_and_inside_the_pattern(cuts: tuple[int, int]) -> None:
    m = StreamMatcher(PATTERN)
    chunks = split(STREAM, cuts)
    found = feed_all(m, chunks)
    assert found is not None and m.start == START
    index, offset = found
    chunk_start = sum(len(c) for c in chunks[:index])
    chunk_end = chunk_start + len(chunks[index])
    assert chunk_start < END <= chunk_end  # reported by the chunk holding its last byte
    assert offset == max(0, START - chunk_start)


def test_one_byte_at_a_time() -> None:
    m = StreamMatcher(PATTERN)
    found = feed_all(m, [bytes([b]) for b in STREAM])
    assert found == (END - 1, 0)
    assert m.start == START


def test_no_match_and_after_the_match_nothing_more() -> None:
    m = StreamMatcher(rb"DISCARD")
    assert feed_all(m, split(STREAM, (10, 20))) is None
    assert m.start is None and m.fed == len(STREAM)
    m = StreamMatcher(rb"\r\n")
    assert m.feed(b"a\r\nb\r\n") == 1
    assert m.feed(b"\r\n") is None  # reported once
    assert m.start == 1 and m.tail == b""


def test_a_match_as_long_as_the_window_plus_one_is_found_across_a_split() -> None:
    body = b"<" + b"x" * (MATCH_WINDOW - 1) + b">"  # MATCH_WINDOW + 1 bytes
    data = b"junk" + body
    for cut in (5, len(data) - 1):
        m = StreamMatcher(rb"<x*>")
        assert feed_all(m, split(data, (cut,))) == (1, 0)
        assert m.start == 4


def test_a_longer_match_split_beyond_the_window_is_missed() -> None:
    body = b"<" + b"x" * MATCH_WINDOW + b">"  # MATCH_WINDOW + 2 bytes
    m = StreamMatcher(rb"<x*>")
    assert feed_all(m, [b"junk" + body[:-1], body[-1:]]) is None
    assert StreamMatcher(rb"<x*>").feed(b"junk" + body) == 4  # in one chunk: found


def test_small_window() -> None:
    m = StreamMatcher(rb"abcd", window=2)
    assert feed_all(m, [b"zzabc", b"d"]) is None  # needs 3 bytes of history
    m = StreamMatcher(rb"abcd", window=3)
    assert feed_all(m, [b"zzabc", b"d"]) == (1, 0)
    assert m.start == 2
    m = StreamMatcher(rb"abcd", window=2)
    assert feed_all(m, [b"zzab", b"cd"]) == (1, 0)


def test_caret_matches_only_at_the_real_start_of_the_stream() -> None:
    m = StreamMatcher(rb"^ab", window=4)
    assert m.feed(b"ab") == 0
    m = StreamMatcher(rb"^ab", window=4)
    # After the cut the window begins at "ab", which is not the stream's start.
    assert feed_all(m, [b"zzzzzz", b"ab", b"cd"]) is None
    m = StreamMatcher(rb"(?m)^EXEC", window=4)
    assert feed_all(m, [b"zzzzz\n", b"EXEC"]) == (1, 0)  # the guard byte is the \n


def test_lookbehind_sees_the_byte_before_the_window() -> None:
    m = StreamMatcher(rb"(?<!x)ab", window=2)
    assert feed_all(m, [b"qqqx", b"ab"]) is None
    m = StreamMatcher(rb"(?<!x)ab", window=2)
    assert feed_all(m, [b"qqqy", b"ab"]) == (1, 0)


def test_str_patterns_are_utf8_and_bad_ones_raise() -> None:
    assert StreamMatcher("é").feed("café".encode()) == 3
    with pytest.raises(re.error):
        StreamMatcher("(")
    with pytest.raises(ValueError):
        StreamMatcher("a", window=-1)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=300),
    needle=st.binary(min_size=1, max_size=6),
    where=st.integers(min_value=0, max_value=300),
    cuts=st.lists(st.integers(min_value=1, max_value=310), max_size=8),
)
def test_agrees_with_a_search_of_the_whole_stream(
    data: bytes, needle: bytes, where: int, cuts: list[int]
) -> None:
    stream = data[:where] + needle + data[where:]
    pattern = re.escape(needle)
    chunks = split(stream, tuple(sorted({c for c in cuts if c < len(stream)})))
    m = StreamMatcher(pattern, window=16)
    found = feed_all(m, chunks)
    expected = re.search(pattern, stream)
    assert expected is not None
    # The earliest match to complete is reported; for a literal needle its end
    # is the earliest end, and no earlier-starting match is missed.
    ends = [i for i in range(len(stream)) if stream.startswith(needle, i)]
    first = min(ends, key=lambda i: i + len(needle))
    assert m.start == first
    assert found is not None
    index, offset = found
    chunk_start = sum(len(c) for c in chunks[:index])
    assert offset == max(0, first - chunk_start)
