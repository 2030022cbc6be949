"""The capture elements driven directly: which bytes land on which TCP leg, FIN
and RST from the right side, nothing for legs without addresses, rotation."""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from midway.chain.base import ConnectionInfo
from midway.chain.pcap import PcapCapture
from midway.core.clock import FakeClock

from ..helpers import needs
from .harness import FakeOutput, run

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason=needs("tshark", apt="tshark"))

T0 = 1714566896.0
CLIENT = ("192.0.2.10", 50123)
LISTENER = ("192.0.2.1", 6380)
MIDWAY = ("198.51.100.1", 40404)
SERVER = ("198.51.100.7", 6379)


def info(client: tuple[str, int] | None = CLIENT) -> ConnectionInfo:
    return ConnectionInfo(
        id=1, proxy="p", client="x", listener="y", upstream="z", started_at=T0,
        client_addr=client, local_addr=LISTENER if client else None,
        upstream_addr=SERVER, upstream_local_addr=MIDWAY,
    )


def tshark(path: Path, *args: str) -> list[str]:
    assert TSHARK is not None
    result = subprocess.run([TSHARK, "-n", "-r", str(path), *args], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def fields(path: Path, display_filter: str, *names: str) -> list[str]:
    args = ["-Y", display_filter, "-T", "fields"]
    for name in names:
        args += ["-e", name]
    return tshark(path, *args)


def payload(path: Path, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """Every TCP payload byte sent from ``src`` to ``dst``, in file order."""
    rows = fields(path, f"ip.src == {src[0]} && tcp.srcport == {src[1]} && "
                        f"ip.dst == {dst[0]} && tcp.dstport == {dst[1]} && tcp.len > 0",
                  "tcp.payload")
    return b"".join(bytes.fromhex(row.replace(":", "")) for row in rows)


class Connection:
    """Head and tail attached to one connection, with a fake output per stage."""

    def __init__(self, capture: PcapCapture, conn: ConnectionInfo) -> None:
        self.info = conn
        self.head = capture.head.attach(conn)
        self.tail = capture.tail.attach(conn)

    async def through(self, direction: str, data: bytes | None) -> None:
        """One chunk (None: EOF) through head, then (as the chain would) tail."""
        for attachment in (self.head, self.tail):
            assert attachment is not None
            stage = attachment.stage(direction)  # type: ignore[arg-type]
            assert stage is not None
            out = FakeOutput(direction=direction, info=self.info)  # type: ignore[arg-type]
            stage.start(out)
            if data is None:
                await stage.eof(out)
            else:
                await stage.data(data, out)
                assert out.sent == data

    def close(self, reason: str, *, reset: bool = False, first_close: str = "client",
              reset_by: str | None = None) -> None:
        self.info.reset, self.info.first_close = reset, first_close
        self.info.reset_by = reset_by if reset_by is not None or not reset else first_close
        assert self.head is not None and self.head.on_close is not None
        self.head.on_close(self.info, reason)


def capture(path: Path) -> PcapCapture:
    return PcapCapture.open(str(path), wall=lambda: T0 + 1, rng=random.Random(1))


def test_each_leg_carries_its_own_bytes_with_handshake_and_fins(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    cap = capture(path)
    conn = Connection(cap, info())

    async def main() -> None:
        await conn.through("upstream", b"*1\r\n$4\r\nPING\r\n")
        await conn.through("downstream", b"+PONG\r\n")
        await conn.through("upstream", None)
        await conn.through("downstream", None)

    run(main())
    conn.close("eof")
    cap.close()
    # Two conversations, each with SYN, SYN-ACK, then FIN both ways; no complaint.
    assert fields(path, "tcp.flags.syn == 1 && tcp.flags.ack == 0", "tcp.srcport") == [
        str(CLIENT[1]), str(MIDWAY[1])]
    assert sorted(fields(path, "tcp.flags.fin == 1", "tcp.srcport")) == sorted(
        str(p) for p in (CLIENT[1], LISTENER[1], MIDWAY[1], SERVER[1]))
    assert fields(path, "_ws.malformed || _ws.expert.severity >= warning || tcp.analysis.flags",
                  "frame.number") == []
    assert payload(path, CLIENT, LISTENER) == b"*1\r\n$4\r\nPING\r\n"
    assert payload(path, MIDWAY, SERVER) == b"*1\r\n$4\r\nPING\r\n"
    assert payload(path, SERVER, MIDWAY) == b"+PONG\r\n"
    assert payload(path, LISTENER, CLIENT) == b"+PONG\r\n"
    # The client's SYN carries the time it was accepted.
    assert fields(path, "frame.number == 1", "frame.time_epoch")[0].startswith(str(int(T0)))


def test_a_change_between_head_and_tail_shows_as_a_difference_between_legs(
        tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    cap = capture(path)
    conn = Connection(cap, info())
    assert conn.head is not None and conn.tail is not None

    async def main() -> None:
        out = FakeOutput(direction="upstream", info=conn.info)
        assert conn.head is not None and conn.tail is not None
        head_up, tail_up = conn.head.upstream, conn.tail.upstream
        assert head_up is not None and tail_up is not None
        await head_up.data(b"get secret\n", out)
        await tail_up.data(b"GET SECRET\n", out)  # what a hook made of it

    run(main())
    conn.close("shutdown")
    cap.close()
    assert payload(path, CLIENT, LISTENER) == b"get secret\n"
    assert payload(path, MIDWAY, SERVER) == b"GET SECRET\n"
    # An ordinary close: midway's FIN on each leg (the peers' were never seen).
    assert sorted(fields(path, "tcp.flags.fin == 1", "tcp.srcport")) == sorted(
        [str(LISTENER[1]), str(MIDWAY[1])])


def test_the_head_dates_a_chunk_by_the_wall_clock_time_it_was_read(tmp_path: Path) -> None:
    """uvloop's loop clock counts whole milliseconds: a reply read 100 µs after
    midway sent the request, across a tick of that clock, looks 1 ms old on it.
    Dated from it, the reply would precede its request in the capture; dated by
    the wall clock read with it, it follows by its 100 µs."""
    path = tmp_path / "t.pcap"
    wall = [T0 + 1.0]
    cap = PcapCapture.open(str(path), wall=lambda: wall[0], rng=random.Random(1))
    conn = Connection(cap, info())
    assert conn.head is not None and conn.tail is not None
    head_down, tail_up = conn.head.downstream, conn.tail.upstream
    assert head_down is not None and tail_up is not None

    async def main() -> None:
        await tail_up.data(b"PING\r\n", FakeOutput(direction="upstream", info=conn.info))
        out = FakeOutput(clock=FakeClock(start=1.001), direction="downstream", info=conn.info)
        out.received_at = 1.000            # the loop clock's tick before: "1 ms ago"
        out.received_wall = T0 + 1.0001    # really read 100 µs after the request
        wall[0] = T0 + 1.0002              # and reaching the head 100 µs later
        await head_down.data(b"+PONG\r\n", out)

    run(main())
    conn.close("eof")
    cap.close()
    request, reply = (float(t) for t in fields(
        path, f"tcp.port == {SERVER[1]} && tcp.len > 0", "frame.time_epoch"))
    assert request == pytest.approx(T0 + 1.0, abs=1e-6)
    assert reply == pytest.approx(T0 + 1.0001, abs=1e-6)


@pytest.mark.parametrize(("reset_by", "rst_from"), [
    ("client", [CLIENT[1], MIDWAY[1]]),      # client reset; midway resets the upstream
    ("upstream", [LISTENER[1], SERVER[1]]),  # server reset; midway resets the client
    ("proxy", [LISTENER[1], MIDWAY[1]]),     # midway aborted both
])
@pytest.mark.parametrize("first_close", ["client", "upstream", "proxy"])
def test_a_reset_is_an_rst_from_the_side_that_reset(
        tmp_path: Path, reset_by: str, rst_from: list[int], first_close: str) -> None:
    """Whoever closed first (a FIN before the reset): the RST is the resetter's."""
    path = tmp_path / "r.pcap"
    cap = capture(path)
    conn = Connection(cap, info())

    async def main() -> None:
        await conn.through("upstream", b"hello")

    run(main())
    conn.close("reset", reset=True, first_close=first_close, reset_by=reset_by)
    cap.close()
    assert sorted(int(p) for p in fields(path, "tcp.flags.reset == 1", "tcp.srcport")) == \
        sorted(rst_from)


def test_a_unix_client_leg_is_not_recorded_the_upstream_leg_is(tmp_path: Path) -> None:
    path = tmp_path / "u.pcap"
    cap = capture(path)
    conn = Connection(cap, info(client=None))

    async def main() -> None:
        await conn.through("upstream", b"abc")

    run(main())
    conn.close("eof")
    cap.close()
    assert set(fields(path, "", "tcp.srcport")) == {str(MIDWAY[1]), str(SERVER[1])}
    assert payload(path, MIDWAY, SERVER) == b"abc"


def test_nothing_is_written_for_a_connection_whose_stages_never_started(
        tmp_path: Path) -> None:
    path = tmp_path / "n.pcap"
    cap = capture(path)
    conn = Connection(cap, info())
    conn.close("rejected")
    cap.close()
    assert path.stat().st_size == 24  # the file header alone
    assert tshark(path) == []


def test_rotation_keeps_every_file_readable(tmp_path: Path) -> None:
    path = tmp_path / "rot.pcap"
    cap = PcapCapture.open(str(path), max_bytes=2000, keep=3, wall=lambda: T0)

    async def main() -> None:
        for i in range(20):
            conn = Connection(cap, info(client=("192.0.2.10", 50000 + i)))
            await conn.through("upstream", b"x" * 100)
            conn.close("eof")

    run(main())
    cap.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["rot.pcap", "rot.pcap.1", "rot.pcap.2", "rot.pcap.3"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 2000
        assert fields(tmp_path / name, "_ws.malformed", "frame.number") == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that fills up (mounting needs root)."""
    where = tmp_path / "tiny"
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                            capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0:
        pytest.skip(needs(f"root, to mount a small tmpfs ({result.stderr.strip()})"))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], timeout=10, check=False)


def test_a_capture_on_a_full_disk_stops_after_a_whole_record(
        tiny_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tiny_disk / "full.pcap"
    cap = capture(path)

    async def main() -> None:
        for i in range(200):  # 200 x 1000 bytes: three times the room
            conn = Connection(cap, info(client=("192.0.2.10", 50000 + i)))
            await conn.through("upstream", os.urandom(1000))
            conn.close("eof")

    with caplog.at_level(logging.ERROR, logger="midway"):
        run(main())
    cap.close()
    assert [r.message for r in caplog.records if "pcap" in r.message] == [
        f"pcap: cannot write {path} (No space left on device); the capture stopped, "
        "traffic goes on"]
    assert path.stat().st_size > 32 * 1024  # it did fill the disk
    # tshark fails on a file cut in the middle of a packet; this one reads whole.
    frames = fields(path, "frame", "frame.number")
    assert len(frames) > 100 and fields(path, "_ws.malformed", "frame.number") == []
