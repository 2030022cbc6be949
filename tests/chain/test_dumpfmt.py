"""The live dump's text: exact output for text, hex and auto modes, colour on/off."""

from __future__ import annotations

import random
import shutil
import subprocess
from datetime import UTC

import pytest

from midway.chain.dumpfmt import (
    DEFAULT_MAX_BYTES,
    DumpFormatter,
    escape_text,
    format_timestamp,
    hexdump,
    looks_like_text,
)

from ..helpers import needs

T = 1714566896.789  # 2024-05-01 12:34:56.789 UTC
HEXDUMP = shutil.which("hexdump")

HELLO_HEX = [
    "00000000  68 65 6c 6c 6f 20 77 6f  72 6c 64 0a 74 68 69 73  |hello world.this|",
    "00000010  20 69 73 20 61 20 74 65  73 74 20 6f 66 20 68 65  | is a test of he|",
    "00000020  78 64 75 6d 70 00 01 02  ff                       |xdump....|",
    "00000029",
]
HELLO = b"hello world\nthis is a test of hexdump\x00\x01\x02\xff"


def fmt(**kwargs: object) -> DumpFormatter:
    return DumpFormatter(tz=UTC, **kwargs)  # type: ignore[arg-type]


# --- hexdump -----------------------------------------------------------------


def test_hexdump_known_output() -> None:
    assert hexdump(HELLO) == HELLO_HEX


def test_hexdump_squeezes_repeated_lines_like_hexdump() -> None:
    assert hexdump(bytes(100)) == [
        "00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|",
        "*",
        "00000060  00 00 00 00                                       |....|",
        "00000064",
    ]
    assert hexdump(b"") == []


_rng = random.Random(1)
HEX_SAMPLES = [
    HELLO,
    b"x",
    bytes(range(256)),
    bytes(16),
    bytes(32),
    bytes(33),
    bytes(16) + b"A" * 32 + bytes(16) + b"A" * 16,
    b"ab" * 100 + b"c",
    bytes(_rng.getrandbits(8) for _ in range(1000)),
]


@pytest.mark.skipif(HEXDUMP is None, reason=needs("hexdump", apt="bsdextrautils"))
@pytest.mark.parametrize("data", HEX_SAMPLES, ids=range(len(HEX_SAMPLES)))
def test_hexdump_matches_the_real_hexdump_C(data: bytes) -> None:
    assert HEXDUMP is not None
    real = subprocess.run(
        [HEXDUMP, "-C"], input=data, capture_output=True, check=True
    ).stdout.decode("ascii")
    assert hexdump(data) == real.splitlines()


# --- text --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"plain text\n", "plain text\n"),
        (b"GET / HTTP/1.1\r\n", "GET / HTTP/1.1\\r\n"),
        (b"tab\there", "tab\there"),
        (b"back\\slash", "back\\\\slash"),
        (b"nul\x00 bel\x07 esc\x1b[2J del\x7f", "nul\\x00 bel\\x07 esc\\x1b[2J del\\x7f"),
        ("café ☕ 日本".encode(), "café ☕ 日本"),
        (b"bad utf-8 \xff\xc3", "bad utf-8 \\xff\\xc3"),
        ("C1 csi \u009b bidi \u202e".encode(), "C1 csi \\u009b bidi \\u202e"),
        ("tag \U000e0041".encode(), "tag \\U000e0041"),
        ("line sep \u2028".encode(), "line sep \\u2028"),
    ],
)
def test_escape_text(data: bytes, shown: str) -> None:
    assert escape_text(data) == shown


def test_escaped_text_is_unambiguous() -> None:
    # A literal backslash-x sequence and the byte it would stand for differ.
    assert escape_text(b"\\x00") != escape_text(b"\x00")
    assert escape_text(b"\xc2\x9b") != escape_text(b"\x9b")


def test_text_chunk_exact() -> None:
    out = fmt(mode="text").chunk(12, "upstream", T, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out == (
        "2024-05-01 12:34:56.789 #12 client → server 27 bytes\nGET / HTTP/1.1\\r\nHost: a\\r\n\\r\n"
    )


def test_text_chunk_without_final_newline_still_ends_the_line() -> None:
    out = fmt(mode="text").chunk(3, "downstream", T, b"+OK")
    assert out == "2024-05-01 12:34:56.789 #3 client ← server 3 bytes\n+OK\n"


def test_text_mode_escapes_binary() -> None:
    out = fmt(mode="text").chunk(1, "downstream", T, b"\x00\x01\n\xff")
    assert out.splitlines()[1:] == ["\\x00\\x01", "\\xff"]


def test_singular_byte() -> None:
    assert "1 byte\n" in fmt(mode="text").chunk(1, "upstream", T, b"x")


# --- hex and auto ------------------------------------------------------------


def test_hex_chunk_exact() -> None:
    out = fmt(mode="hex").chunk(7, "downstream", T, HELLO)
    assert out == "\n".join(["2024-05-01 12:34:56.789 #7 client ← server 41 bytes", *HELLO_HEX, ""])


@pytest.mark.parametrize(
    ("data", "textual"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", True),
        ("naïve résumé".encode(), True),
        ("日本語".encode()[1:-1], True),  # a character cut at each end of the chunk
        (b"*3\r\n$3\r\nSET\r\n", True),
        (b"\x00\x00\x00\x05hello", False),  # NUL: binary
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # TLS ClientHello
        (b"ab\xffcd", False),  # not UTF-8
        (b"\x01\x02\x03 mostly control \x04\x05\x06", False),
        (b"\x80", False),  # nothing but a stray continuation byte
    ],
)
def test_looks_like_text(data: bytes, textual: bool) -> None:
    assert looks_like_text(data) is textual


def test_auto_picks_per_chunk() -> None:
    f = fmt(mode="auto")
    assert f.chunk(1, "upstream", T, b"PING\r\n").splitlines()[1] == "PING\\r"
    assert f.chunk(1, "downstream", T, HELLO).splitlines()[1:] == HELLO_HEX


# --- truncation --------------------------------------------------------------


def test_max_bytes_truncates_and_says_how_much() -> None:
    out = fmt(mode="text", max_bytes=5).chunk(2, "upstream", T, b"0123456789")
    assert out.splitlines() == [
        "2024-05-01 12:34:56.789 #2 client → server 10 bytes",
        "01234",
        "... 5 more bytes not shown",
    ]


def test_max_bytes_hex_shows_offsets_of_the_shown_part() -> None:
    out = fmt(mode="hex", max_bytes=16).chunk(2, "upstream", T, bytes(range(20)))
    assert out.splitlines()[1:] == [
        "00000000  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|",
        "00000010",
        "... 4 more bytes not shown",
    ]


def test_max_bytes_zero_and_none() -> None:
    assert fmt(max_bytes=0).chunk(1, "upstream", T, b"abc").splitlines() == [
        "2024-05-01 12:34:56.789 #1 client → server 3 bytes",
        "... 3 more bytes not shown",
    ]
    big = b"a" * (DEFAULT_MAX_BYTES + 10)
    assert "not shown" in fmt().chunk(1, "upstream", T, big)
    assert "not shown" not in fmt(max_bytes=None).chunk(1, "upstream", T, big)


# --- colour ------------------------------------------------------------------

HOSTILE = b"\x1b]0;pwned\x07\x1b[2J\x9b2J" + "\u009b".encode() + b"text\n"


@pytest.mark.parametrize("mode", ["text", "hex", "auto"])
def test_no_escape_byte_anywhere_when_colour_is_off(mode: str) -> None:
    f = fmt(mode=mode)
    out = f.chunk(1, "upstream", T, HOSTILE) + f.chunk(1, "downstream", T, HOSTILE)
    out += f.opened(1, T, client="\x1b[31m1.2.3.4:5", upstream="x\x1b", proxy="p\x1b")
    out += f.closed(1, T, reason="boom\x1b[0m", bytes_up=1, bytes_down=2, duration_s=1)
    assert "\x1b" not in out
    assert "\u009b" not in out
    assert all(ch.isprintable() or ch == "\n" for ch in out)


def test_colour_differs_per_direction_and_resets_every_line() -> None:
    f = fmt(mode="text", color=True)
    up = f.chunk(1, "upstream", T, b"a\nb\n")
    down = f.chunk(1, "downstream", T, b"a\nb\n")
    assert up.splitlines() == [
        "\x1b[1;31m2024-05-01 12:34:56.789 #1 client → server 4 bytes\x1b[0m",
        "\x1b[31ma\x1b[0m",
        "\x1b[31mb\x1b[0m",
    ]
    assert down.splitlines()[1] == "\x1b[36ma\x1b[0m"
    # The only escape sequences are ours: the data's ESC is still escaped.
    hostile = f.chunk(1, "upstream", T, b"\x1b[2J")
    assert hostile.splitlines()[1] == "\x1b[31m\\x1b[2J\x1b[0m"


# --- open / close / time -----------------------------------------------------


def test_open_and_close_lines() -> None:
    f = fmt()
    assert f.opened(12, T, client="127.0.0.1:50000", upstream="10.0.0.2:80", proxy="web") == (
        "2024-05-01 12:34:56.789 #12 open: client 127.0.0.1:50000 → proxy web"
        " → upstream 10.0.0.2:80\n"
    )
    assert f.opened(12, T, client="[::1]:5", upstream=None, proxy="web").endswith(
        "upstream (not connected)\n"
    )
    assert f.closed(
        12, T + 1.5, reason="client closed", bytes_up=1, bytes_down=2048, duration_s=1.5
    ) == (
        "2024-05-01 12:34:58.289 #12 closed (client closed) after 1.500 s:"
        " client → server 1 byte, client ← server 2048 bytes\n"
    )


def test_timestamp_truncates_to_milliseconds() -> None:
    assert format_timestamp(0.9999, UTC) == "1970-01-01 00:00:00.999"
    assert format_timestamp(T, UTC) == "2024-05-01 12:34:56.789"


@pytest.mark.parametrize("kwargs", [{"mode": "binary"}, {"max_bytes": -1}])
def test_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DumpFormatter(**kwargs)  # type: ignore[arg-type]
