"""Bytes written as hex in a configuration value (``send_hex``, ``expect_hex``):
two hex digits a byte, either case, with ASCII whitespace allowed between bytes
but not inside one, as HAProxy's ``tcp-check send-binary`` takes them and as
:meth:`bytes.fromhex` reads them.  The parser exists for its messages: it names
the first character that is not a hex digit, or a lone last digit, and gives an
example; :meth:`bytes.fromhex` says only "non-hexadecimal number found"."""

from __future__ import annotations

__all__ = ["parse_hex", "HEX_EXAMPLE"]

HEX_EXAMPLE = "00 00 00 08 04 d2 16 2f"
"""PostgreSQL's SSLRequest, the example docs/balancing.md gives."""

_DIGITS = frozenset("0123456789abcdefABCDEF")
_SPACE = frozenset(" \t\n\r\x0b\x0c")
"""ASCII whitespace, as :meth:`bytes.fromhex` skips it (``str.isspace`` would
also take Unicode's)."""


def parse_hex(text: str) -> bytes:
    """The bytes ``text`` spells; whitespace alone (or nothing) is ``b""``.
    Raises :class:`ValueError` quoting ``text`` and naming what is wrong."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] in _SPACE:
            i += 1
            continue
        pair = text[i:i + 2]
        bad = next((j for j, c in enumerate(pair) if c not in _DIGITS), None)
        if bad is not None:
            raise ValueError(f"{text!r}: {pair[bad]!r} at character {i + bad + 1} is not a hex "
                             f"digit (two digits a byte, e.g. {HEX_EXAMPLE!r})")
        if len(pair) == 1:
            raise ValueError(f"{text!r}: the last byte has one digit, {pair!r} (two digits "
                             f"a byte, e.g. {HEX_EXAMPLE!r})")
        out.append(int(pair, 16))
        i += 2
    return bytes(out)
