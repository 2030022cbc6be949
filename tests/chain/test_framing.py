"""Framers fed whole, byte by byte, in random splits, and with trailing data."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest

from midway.chain.framing import (
    DEFAULT_MAX_SIZE,
    FixedFramer,
    Framer,
    FrameTooLarge,
    FramingError,
    LengthPrefixFramer,
    LineFramer,
    make_framer,
)
from midway.errors import MidwayError


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_splits(data: bytes, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 7)
        out.append(data[pos : pos + n])
        pos += n
    return out


CHUNKINGS: list[Callable[[bytes], list[bytes]]] = [whole, bytewise, random_splits]


def run(framer: Framer, chunks: Iterable[bytes]) -> list[bytes]:
    messages: list[bytes] = []
    for chunk in chunks:
        messages.extend(framer.feed(chunk))
    return messages


# --- LineFramer --------------------------------------------------------------


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_lines_with_trailing_garbage(chunking: Callable[[bytes], list[bytes]]) -> None:
    stream = b"PING\nSET a 1\n\nGET a\npartial-with-no-end"
    framer = LineFramer()
    messages = run(framer, chunking(stream))
    assert messages == [b"PING\n", b"SET a 1\n", b"\n", b"GET a\n"]
    assert framer.pending() == b"partial-with-no-end"
    assert b"".join(messages) + framer.pending() == stream


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_multibyte_delimiter_split_anywhere(chunking: Callable[[bytes], list[bytes]]) -> None:
    stream = b"EHLO x\r\nMAIL FROM:<a@b>\r\n\rnot-an-end\n\r\r\ntail\r"
    framer = LineFramer(b"\r\n")
    messages = run(framer, chunking(stream))
    assert messages == [b"EHLO x\r\n", b"MAIL FROM:<a@b>\r\n", b"\rnot-an-end\n\r\r\n"]
    assert framer.pending() == b"tail\r"


def test_pending_does_not_consume() -> None:
    framer = LineFramer()
    framer.feed(b"abc")
    assert framer.pending() == b"abc"
    assert framer.feed(b"\n") == [b"abc\n"]
    assert framer.pending() == b""


def test_line_at_exactly_max_size_passes_one_more_byte_fails() -> None:
    framer = LineFramer(max_size=8)
    assert framer.feed(b"1234567\n") == [b"1234567\n"]
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(b"12345678\n")
    assert info.value.size == 9
    assert info.value.max_size == 8


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_line_without_end_is_rejected_before_exceeding_max(
    chunking: Callable[[bytes], list[bytes]],
) -> None:
    framer = LineFramer(max_size=16)
    with pytest.raises(FrameTooLarge):
        for chunk in chunking(b"ok\n" + b"x" * 100):
            framer.feed(chunk)
            # Bounded memory: never more than max_size - 1 bytes held.
            assert len(framer.pending()) < 16


def test_too_large_keeps_messages_completed_in_the_same_feed() -> None:
    framer = LineFramer(max_size=10)
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(b"a\nbb\n" + b"c" * 50)
    assert info.value.complete == [b"a\n", b"bb\n"]
    assert isinstance(info.value, MidwayError)


def test_framer_is_spent_after_an_error() -> None:
    framer = LineFramer(max_size=4)
    with pytest.raises(FrameTooLarge):
        framer.feed(b"toolong")
    with pytest.raises(FramingError, match="earlier error"):
        framer.feed(b"\n")
    assert framer.pending() == b""


def test_line_framer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LineFramer(b"")
    with pytest.raises(ValueError):
        LineFramer(b"\r\n", max_size=1)


# --- LengthPrefixFramer ------------------------------------------------------


def _frame(body: bytes, size: int, order: str, inclusive: bool = False) -> bytes:
    value = len(body) + (size if inclusive else 0)
    return value.to_bytes(size, order) + body  # type: ignore[arg-type]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("size", [1, 2, 4, 8])
@pytest.mark.parametrize("order", ["big", "little"])
@pytest.mark.parametrize("inclusive", [False, True])
def test_length_prefix_roundtrip(
    chunking: Callable[[bytes], list[bytes]], size: int, order: str, inclusive: bool
) -> None:
    bodies = [b"hello", b"", b"x" * 200, b"\x00\x01\x02"]
    frames = [_frame(b, size, order, inclusive) for b in bodies]
    garbage = _frame(b"incomplete body", size, order, inclusive)[:-3]
    stream = b"".join(frames) + garbage
    framer = LengthPrefixFramer(size, order, inclusive)  # type: ignore[arg-type]
    messages = run(framer, chunking(stream))
    assert messages == frames
    assert framer.pending() == garbage


def test_length_prefix_split_inside_prefix() -> None:
    framer = LengthPrefixFramer(4, "big")
    assert framer.feed(b"\x00\x00") == []
    assert framer.pending() == b"\x00\x00"
    assert framer.feed(b"\x00\x03ab") == []
    assert framer.feed(b"c\x00") == [b"\x00\x00\x00\x03abc"]
    assert framer.pending() == b"\x00"


def test_length_prefix_too_large_is_refused_at_the_prefix() -> None:
    framer = LengthPrefixFramer(4, "big", max_size=1000)
    with pytest.raises(FrameTooLarge) as info:
        framer.feed((2**31).to_bytes(4, "big"))  # nothing of the body yet
    assert info.value.size == 2**31 + 4


def test_length_prefix_max_size_counts_the_prefix() -> None:
    framer = LengthPrefixFramer(2, "big", max_size=10)
    assert framer.feed(_frame(b"x" * 8, 2, "big")) == [_frame(b"x" * 8, 2, "big")]
    with pytest.raises(FrameTooLarge):
        framer.feed(_frame(b"x" * 9, 2, "big"))


def test_inclusive_length_smaller_than_prefix_is_an_error() -> None:
    framer = LengthPrefixFramer(4, "big", includes_prefix=True)
    ok = _frame(b"ok", 4, "big", inclusive=True)
    with pytest.raises(FramingError, match="smaller than the prefix") as info:
        framer.feed(ok + b"\x00\x00\x00\x02")
    assert not isinstance(info.value, FrameTooLarge)
    assert info.value.complete == [ok]


@pytest.mark.parametrize(
    "kwargs",
    [{"prefix_size": 3}, {"byteorder": "middle"}, {"prefix_size": 4, "max_size": 3}],
)
def test_length_prefix_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LengthPrefixFramer(**kwargs)  # type: ignore[arg-type]


# --- FixedFramer -------------------------------------------------------------


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_fixed(chunking: Callable[[bytes], list[bytes]]) -> None:
    stream = bytes(range(50))
    framer = FixedFramer(16)
    messages = run(framer, chunking(stream))
    assert messages == [stream[0:16], stream[16:32], stream[32:48]]
    assert framer.pending() == stream[48:]
    assert framer.max_size == 16


def test_fixed_rejects_zero() -> None:
    with pytest.raises(ValueError):
        FixedFramer(0)


def test_feeding_nothing_is_harmless() -> None:
    for framer in (LineFramer(), LengthPrefixFramer(), FixedFramer(3)):
        assert framer.feed(b"") == []
        assert framer.pending() == b""


# --- make_framer -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("line", "LineFramer(delimiter=b'\\n', max_size=1048576)"),
        ("line:\\r\\n", "LineFramer(delimiter=b'\\r\\n', max_size=1048576)"),
        ("line:\r\n", "LineFramer(delimiter=b'\\r\\n', max_size=1048576)"),
        ("line:\\x00", "LineFramer(delimiter=b'\\x00', max_size=1048576)"),
        ("line:a:b", "LineFramer(delimiter=b'a:b', max_size=1048576)"),
        ("line:\\\\", "LineFramer(delimiter=b'\\\\', max_size=1048576)"),
        (
            "length:4",
            "LengthPrefixFramer(prefix_size=4, byteorder='big', includes_prefix=False,"
            " max_size=1048576)",
        ),
        (
            "length:2:little",
            "LengthPrefixFramer(prefix_size=2, byteorder='little', includes_prefix=False,"
            " max_size=1048576)",
        ),
        (
            "length:8:big:inclusive",
            "LengthPrefixFramer(prefix_size=8, byteorder='big', includes_prefix=True,"
            " max_size=1048576)",
        ),
        ("fixed:16", "FixedFramer(size=16)"),
    ],
)
def test_make_framer(spec: str, expected: str) -> None:
    assert repr(make_framer(spec)) == expected


def test_make_framer_passes_max_size() -> None:
    framer = make_framer("line", max_size=64)
    assert framer.max_size == 64
    assert DEFAULT_MAX_SIZE == 1 << 20


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty framing spec"),
        ("lines", "unknown kind 'lines'"),
        ("line:", "the delimiter is empty"),
        ("line:\\q", "unknown escape"),
        ("line:ab\\", "lone backslash"),
        ("length", "give the prefix size"),
        ("length:3", "must be 1, 2, 4 or 8"),
        ("length:four", "'four' is not a number"),
        ("length:4:sideways", "unknown option 'sideways'"),
        ("fixed", "give the size"),
        ("fixed:0", "at least 1"),
        ("fixed:x", "'x' is not a number"),
    ],
)
def test_make_framer_errors_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make_framer(spec)
    if spec:
        assert repr(spec) in str(info.value)
