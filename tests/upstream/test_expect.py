"""The check reply matcher over bytes alone: whole, at every split point, byte by
byte, with trailing data, past the limit, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from midway.upstream.expect import ExpectMatcher, Verdict

PASS, FAIL, MORE = Verdict.PASS, Verdict.FAIL, Verdict.NEED_MORE
REPLY = b"+PONG\r\n"


def feed_all(m: ExpectMatcher, pieces: list[bytes]) -> Verdict:
    v = m.verdict
    for p in pieces:
        v = m.feed(p)
    return v


def test_whole_reply() -> None:
    assert ExpectMatcher(b"+PONG").feed(REPLY) is PASS


@pytest.mark.parametrize("cut", range(len(REPLY) + 1))
def test_every_split_point(cut: int) -> None:
    m = ExpectMatcher(b"+PONG")
    first = m.feed(REPLY[:cut])
    assert first is (PASS if cut >= 5 else MORE)
    assert m.feed(REPLY[cut:]) is PASS


@pytest.mark.parametrize("i", range(1, 12))
@pytest.mark.parametrize("j", range(1, 12))
def test_every_three_way_split_with_leading_noise(i: int, j: int) -> None:
    reply = b"$4\r\nPONG+PONG\r\n"
    a, b = min(i, j), max(i, j)
    assert feed_all(ExpectMatcher(b"+PONG"), [reply[:a], reply[a:b], reply[b:]]) is PASS


def test_byte_by_byte_and_trailing_data() -> None:
    m = ExpectMatcher(b"+PONG")
    verdicts = [m.feed(bytes([c])) for c in REPLY + b"garbage"]
    assert verdicts[:4] == [MORE] * 4 and set(verdicts[4:]) == {PASS}


def test_a_wrong_reply_fails_at_eof_quoting_it() -> None:
    m = ExpectMatcher(b"+PONG")
    assert m.feed(b"-NOAUTH Authentication required.\r\n") is MORE
    assert m.eof() is FAIL
    assert m.reason == "closed before sending b'+PONG' (reply b'-NOAUTH Authentication required.\\r\\n')"


def test_silence_fails_at_the_deadline() -> None:
    m = ExpectMatcher(b"+PONG")
    assert m.timed_out() is FAIL
    assert m.reason == "no b'+PONG' in the reply within the timeout (no reply)"


def test_the_verdict_is_final() -> None:
    m = ExpectMatcher(b"OK")
    m.feed(b"OK")
    assert m.eof() is PASS and m.timed_out() is PASS and m.feed(b"x") is PASS
    f = ExpectMatcher(b"OK")
    f.eof()
    assert f.feed(b"OK") is FAIL


def test_empty_expect_passes_without_reading() -> None:
    assert ExpectMatcher(b"").verdict is PASS


def test_the_match_must_end_within_the_limit() -> None:
    assert ExpectMatcher(b"OK", limit=10).feed(b"x" * 8 + b"OK") is PASS
    m = ExpectMatcher(b"OK", limit=10)
    assert m.feed(b"x" * 9 + b"OK") is FAIL
    assert m.reason == "no b'OK' in the first 10 bytes of the reply (reply b'xxxxxxxxxO')"
    long = ExpectMatcher(b"OK", limit=100)
    assert long.feed(b"x" * 60) is MORE and long.feed(b"x" * 60) is FAIL
    assert long.reason.endswith(f"(reply {b'x' * 40!r}...)")  # quotes the start only


def test_memory_stays_bounded_on_a_long_reply() -> None:
    m = ExpectMatcher(b"needle", limit=10**9)
    for _ in range(1000):
        assert m.feed(b"hay" * 1000) is MORE
        assert len(m._tail) <= 5 and len(m._head) <= 40
    assert m.feed(b"nee") is MORE and m.feed(b"dle") is PASS


def test_expect_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than the 4-byte reply limit"):
        ExpectMatcher(b"hello", limit=4)


@given(reply=st.binary(max_size=60), expect=st.binary(min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 60), max_size=6), limit=st.integers(4, 70))
def test_fuzz_agrees_with_a_plain_search(reply: bytes, expect: bytes, cuts: list[int],
                                         limit: int) -> None:
    bounds = sorted({0, len(reply), *(c for c in cuts if c <= len(reply))})
    m = ExpectMatcher(expect, limit=limit)
    for a, b in zip(bounds, bounds[1:], strict=False):
        m.feed(reply[a:b])
    assert (m.eof() is PASS) == (expect in reply[:limit])
