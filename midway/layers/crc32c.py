"""CRC-32C (Castagnoli), the checksum of the PROXY protocol v2's ``PP2_TYPE_CRC32C`` TLV.

The standard library's ``zlib.crc32``/``binascii.crc32`` compute CRC-32 with the
IEEE polynomial; the PROXY protocol (proxy-protocol.txt §2.2.3) asks for CRC-32C
"as described in RFC 4960, Appendix B", i.e. the Castagnoli polynomial
0x1EDC6F41, bit-reflected (0x82F63B78), initial value and final XOR 0xFFFFFFFF.
This is the classic one-table, byte-at-a-time algorithm: PROXY headers are a few
hundred bytes at most, so the table (256 words, built once at import) is the
whole optimisation needed.  Checked against RFC 3720 §B.4's test vectors in
tests/layers/test_crc32c.py.
"""

from __future__ import annotations

__all__ = ["crc32c"]

# RFC 3720 §B.4 / RFC 4960 Appendix B: the Castagnoli polynomial, bit-reflected.
_POLY_REFLECTED = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
