"""The dump element and its writer: exact lines for text, hex and binary data,
colour only on a terminal, and a bounded queue that skips instead of blocking."""

from __future__ import annotations

import os
import pty
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest

from midway.chain.dump import DumpElement, DumpWriter, open_dump_writer
from midway.chain.dumpfmt import DumpFormatter

from .harness import FakeOutput, make_info, run

T = 1714566896.789  # 2024-05-01 12:34:56.789 UTC
STAMP = "2024-05-01 12:34:56.789"


@pytest.fixture
def out_file(tmp_path: Path) -> Iterator[tuple[Path, DumpWriter]]:
    path = tmp_path / "dump.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    writer = DumpWriter(fd, target=str(path), owned=True)
    yield path, writer
    writer.close()


def dump_element(writer: DumpWriter, mode: str = "auto", max_bytes: int | None = 4096,
                 color: bool = False) -> DumpElement:
    formatter = DumpFormatter(mode=mode, color=color, max_bytes=max_bytes, tz=UTC)  # type: ignore[arg-type]
    return DumpElement(formatter, writer, wall=lambda: T)


def drive(element: DumpElement, script: list[tuple[str, bytes | None]], reason: str = "eof",
          detail: str = "") -> dict[str, FakeOutput]:
    """Run chunks (None: EOF) through the element's stages; return the outputs."""
    info = make_info()
    info.upstream = "127.0.0.1:6379"
    info.started_at = T - 1.5
    attachment = element.attach(info)
    outs = {d: FakeOutput(direction=d, info=info) for d in ("upstream", "downstream")}  # type: ignore[misc]

    async def main() -> None:
        for direction, chunk in script:
            stage = attachment.stage(direction)  # type: ignore[arg-type]
            assert stage is not None
            stage.start(outs[direction])
            if chunk is None:
                await stage.eof(outs[direction])
            else:
                await stage.data(chunk, outs[direction])

    run(main())
    info.close_detail = detail
    assert attachment.on_close is not None
    attachment.on_close(info, reason)
    return outs


def test_text_chunks_with_open_eof_and_close_lines(out_file: tuple[Path, DumpWriter]) -> None:
    path, writer = out_file
    element = dump_element(writer, "text")
    outs = drive(element, [
        ("upstream", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("downstream", b"HTTP/1.1 200 OK\r\n\r\nhi\x1b[2J"),
        ("upstream", None),
        ("downstream", None),
    ])
    writer.close()
    assert outs["upstream"].sent == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert outs["downstream"].sent == b"HTTP/1.1 200 OK\r\n\r\nhi\x1b[2J"
    assert outs["upstream"].kinds == ["send", "eof"]
    assert path.read_text() == (
        f"{STAMP} #1 open: client 127.0.0.1:40000 → proxy test → upstream 127.0.0.1:6379\n"
        f"{STAMP} #1 client → server 27 bytes\n"
        "GET / HTTP/1.1\\r\n"
        "Host: x\\r\n"
        "\\r\n"
        f"{STAMP} #1 client ← server 25 bytes\n"
        "HTTP/1.1 200 OK\\r\n"
        "\\r\n"
        "hi\\x1b[2J\n"
        f"{STAMP} #1 client → server end of stream (FIN)\n"
        f"{STAMP} #1 client ← server end of stream (FIN)\n"
        f"{STAMP} #1 closed (eof) after 1.500 s: client → server 27 bytes,"
        " client ← server 25 bytes\n"
    )


def test_hex_mode_is_hexdump_c(out_file: tuple[Path, DumpWriter]) -> None:
    path, writer = out_file
    drive(dump_element(writer, "hex"), [("upstream", b"hello world\n")])
    writer.close()
    lines = path.read_text().splitlines()
    assert lines[1:] == [
        f"{STAMP} #1 client → server 12 bytes",
        "00000000  68 65 6c 6c 6f 20 77 6f  72 6c 64 0a              |hello world.|",
        "0000000c",
        f"{STAMP} #1 closed (eof) after 1.500 s: client → server 12 bytes,"
        " client ← server 0 bytes",
    ]


def test_auto_mode_picks_per_chunk_and_shows_the_close_detail(
        out_file: tuple[Path, DumpWriter]) -> None:
    path, writer = out_file
    drive(dump_element(writer, "auto", max_bytes=4), [
        ("upstream", b"PING\r\n"),
        ("downstream", bytes([0, 1, 2, 255, 254])),
    ], reason="reset", detail="client: connection reset by peer")
    writer.close()
    assert path.read_text().splitlines()[1:] == [
        f"{STAMP} #1 client → server 6 bytes",
        "PING",
        "... 2 more bytes not shown",
        f"{STAMP} #1 client ← server 5 bytes",
        "00000000  00 01 02 ff                                       |....|",
        "00000004",
        "... 1 more byte not shown",
        f"{STAMP} #1 closed (reset: client: connection reset by peer) after 1.500 s:"
        " client → server 6 bytes, client ← server 5 bytes",
    ]


def test_no_colour_when_the_output_is_not_a_terminal(tmp_path: Path) -> None:
    r, w = os.pipe()
    writer = DumpWriter(w, target="pipe", owned=True)
    assert writer.color is False
    element = DumpElement.open(str(tmp_path / "f.txt"))
    assert element.writer.color is False and element.formatter.color is False
    element.close()
    drive(dump_element(writer, color=writer.color), [("upstream", b"\x00binary"),
                                                      ("downstream", b"text\n")])
    writer.close()
    text = os.read(r, 100_000)
    os.close(r)
    assert b"binary" in text and b"\x1b" not in text


def test_colour_on_a_terminal_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    controller, terminal = pty.openpty()
    try:
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert DumpWriter(terminal, target="tty", owned=False).color is True
        monkeypatch.setenv("NO_COLOR", "1")
        assert DumpWriter(terminal, target="tty", owned=False).color is False
    finally:
        os.close(controller)
        os.close(terminal)


def test_a_stalled_output_never_blocks_and_skipped_chunks_are_counted() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:  # fill the pipe so that the writer's thread blocks on its first write
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    writer = DumpWriter(w, target="pipe", owned=True, max_chars=10_000)
    element = dump_element(writer, "hex")
    chunk = bytes(range(256)) * 16  # 4 KiB: ~20 KB of hexdump each
    started = time.monotonic()
    drive(element, [("upstream", chunk)] * 200)
    elapsed = time.monotonic() - started
    assert elapsed < 5  # nothing waited for the stalled pipe
    assert writer.skipped_total >= 190  # only what fit in 10 000 characters was formatted
    queued = writer._queued
    assert queued < 10_000 + 25_000  # bounded: the limit plus at most one chunk's text

    # The reader catches up: the next line is preceded by what was skipped.
    os.set_blocking(r, False)
    seen = bytearray()
    deadline = time.monotonic() + 10
    while b"#1 closed" not in seen and time.monotonic() < deadline:
        try:
            seen += os.read(r, 1 << 20)
        except BlockingIOError:
            time.sleep(0.01)
        if writer._queued == 0 and b"#1 closed" not in seen:
            writer.write("after\n")
            writer.write("#1 closed\n")
    writer.close()
    os.close(r)
    text = seen.decode(errors="replace")
    assert "dump output fell behind:" in text
    assert "chunks (" in text and "bytes of traffic) not shown" in text


def test_a_flood_skips_chunks_but_keeps_every_open_eof_and_close_line() -> None:
    """The queue is full: the flood's chunks are skipped, but the connection's
    open, end-of-stream and close lines (the byte totals a user looks for after a
    flood) are still written, and the notice counts only the skipped chunks."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:  # fill the pipe so that the writer's thread blocks on its first write
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    writer = DumpWriter(w, target="pipe", owned=True, max_chars=10_000)
    chunk = bytes(range(256)) * 16  # 4 KiB: ~20 KB of hexdump each
    drive(dump_element(writer, "hex"),
          [("upstream", chunk)] * 50 + [("upstream", None), ("downstream", None)])
    seen = bytearray()
    reader = threading.Thread(target=lambda: seen.extend(_read_to_eof(r)))
    reader.start()
    writer.close(timeout_s=10)
    reader.join(10)
    os.close(r)
    text = seen.decode(errors="replace")
    assert "#1 open: client" in text
    assert "#1 client → server end of stream (FIN)" in text
    assert "#1 client ← server end of stream (FIN)" in text
    assert "#1 closed (eof) after 1.500 s: client → server 204800 bytes" in text
    shown = text.count("#1 client → server 4096 bytes")
    assert 0 < shown < 50
    assert f"fell behind: {50 - shown} chunks ({(50 - shown) * 4096} bytes" in text


def _read_to_eof(fd: int) -> bytes:
    data = bytearray()
    while chunk := os.read(fd, 1 << 20):
        data += chunk
    return bytes(data)


def test_writers_are_shared_per_target_and_closed_by_the_last_user(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.txt")
    a = open_dump_writer(path)
    b = open_dump_writer(os.path.relpath(path))
    assert a is b and a.users == 2
    a.write("one\n")
    a.release()
    b.write("two\n")
    b.release()
    assert a.users == 0
    assert Path(path).read_text() == "one\ntwo\n"
    c = open_dump_writer(path)  # a fresh writer after the last release, appending
    assert c is not a
    c.write("three\n")
    c.release()
    assert Path(path).read_text() == "one\ntwo\nthree\n"


def test_a_write_error_stops_the_dump_once(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(r)  # writes now fail with EPIPE
    writer = DumpWriter(w, target="gone", owned=True)
    writer.write("lost\n")
    writer.close()
    assert writer.has_room() is False
    writer.write("also lost\n")  # no error, no effect
