"""``send_hex``/``expect_hex`` values: every byte in either case, whitespace
between bytes, and each mistake named with the text and the place; fuzzed against
:meth:`bytes.fromhex`, which accepts exactly the same texts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from midway.config.hexbytes import parse_hex

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def test_every_byte_in_either_case() -> None:
    for value in range(256):
        assert parse_hex(f"{value:02x}") == parse_hex(f"{value:02X}") == bytes([value])
    assert parse_hex("".join(f"{v:02x}" for v in range(256))) == bytes(range(256))


@pytest.mark.parametrize("text", [
    "00 00 00 08 04 d2 16 2f", "0000000804D2162F", "00000008 04d2162f",
    " 00\t00\n00 08\r\n04 d2  16 2f ",
])
def test_whitespace_between_bytes_and_case_do_not_matter(text: str) -> None:
    assert parse_hex(text) == SSL_REQUEST


def test_nothing_or_whitespace_alone_is_no_bytes() -> None:
    assert parse_hex("") == parse_hex(" \t\n") == b""


@pytest.mark.parametrize(("text", "message"), [
    ("0g", "'0g': 'g' at character 2 is not a hex digit (two digits a byte, "
           "e.g. '00 00 00 08 04 d2 16 2f')"),
    ("0x16", "'0x16': 'x' at character 2 is not a hex digit"),
    ("4 e", "'4 e': ' ' at character 2 is not a hex digit"),  # a byte split in two
    ("00 0", "'00 0': the last byte has one digit, '0'"),
    ("00 ٠٠", "'00 ٠٠': '٠' at character 4 is not a hex digit"),  # Arabic-Indic zeros
    ("00\u00a016", "'00\\xa016': '\\xa0' at character 3 is not a hex digit"),  # not ASCII space
])
def test_a_mistake_is_named_with_the_text_and_the_place(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hex(text)
    assert str(info.value).startswith(message)


@given(st.binary(max_size=64), st.lists(st.sampled_from(["", " ", "\t", "\n", "  "]),
                                        min_size=65, max_size=65), st.booleans())
def test_any_bytes_written_any_way_come_back(data: bytes, gaps: list[str], upper: bool) -> None:
    pairs = [f"{b:02X}" if upper else f"{b:02x}" for b in data]
    text = gaps[0] + "".join(pair + gap for pair, gap in zip(pairs, gaps[1:], strict=False))
    assert parse_hex(text) == data


@given(st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF \t\n\x0b\x0c\rxg\u00a0٠"),
               max_size=24) | st.text(max_size=12))
def test_it_accepts_what_fromhex_accepts_and_names_the_rest(text: str) -> None:
    try:
        expected = bytes.fromhex(text)
    except ValueError:
        with pytest.raises(ValueError) as info:
            parse_hex(text)
        assert str(info.value).startswith(repr(text) + ": ")
    else:
        assert parse_hex(text) == expected
