"""CRC-32C against the test vectors of RFC 3720 §B.4 (and the common check value)."""

from __future__ import annotations

import pytest

from midway.layers.crc32c import crc32c

# RFC 3720 §B.4 lists each CRC as the bytes sent (least significant first).
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000" "14000000000004000000001400000018"
    "28000000000000000200000000000000"
)


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (bytes(32), "aa36918a"),
        (b"\xff" * 32, "43aba862"),
        (bytes(range(32)), "4e79dd46"),
        (bytes(range(31, -1, -1)), "5cdb3f11"),
        (ISCSI_READ_PDU, "563a96d9"),
    ],
    ids=["zeros", "ones", "incrementing", "decrementing", "iscsi-read-pdu"],
)
def test_rfc3720_vectors(data: bytes, wire: str) -> None:
    assert crc32c(data).to_bytes(4, "little").hex() == wire


def test_check_value_and_continuation() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's "check" for CRC-32C
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")
    assert crc32c(b"") == 0
