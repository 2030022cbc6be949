"""The access log's writer: a regular file on the loop, a pipe from a thread that a
stalled reader cannot stop the proxy with (issue: a never-read ``--access-log -``
pipe froze every proxy after 64 KiB)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

import pytest

from midway.core import accesslog
from midway.core.accesslog import AccessLog

from ..metrics.support import closed

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def test_a_regular_file_gets_every_line_at_once(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    for n in range(3):
        log.connection_closed(closed(bytes_up=n))
    assert [json.loads(line)["bytes_up"] for line in path.read_text().splitlines()] == [0, 1, 2]
    log.close()


def test_a_stalled_pipe_drops_lines_instead_of_blocking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO whose reader reads nothing: the pipe fills, the writer thread waits,
    the queue fills, and then each further line is dropped, counted and logged,
    with connection_closed returning at once every time."""
    monkeypatch.setattr(accesslog, "QUEUE_LINES", 5)
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        log = AccessLog(str(fifo))
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)  # one page: full after a few lines
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "midway"):
            for n in range(200):
                log.connection_closed(closed(bytes_up=n))
        assert time.monotonic() - started < 5  # never waited on the reader
        assert 0 < log.dropped < 200
        assert any(f"access log: the reader of {fifo} is 5 lines behind" in r.getMessage()
                   for r in caplog.records)
        # What got through is whole lines, in order, from the first connection on.
        deadline, got = time.monotonic() + 5, b""
        while time.monotonic() < deadline and got.count(b"\n") < 200 - log.dropped:
            try:
                got += os.read(reader, 65536)
            except BlockingIOError:
                time.sleep(0.01)
        ups = [json.loads(line)["bytes_up"] for line in got.splitlines()]
        assert len(ups) == 200 - log.dropped
        assert ups == sorted(ups) and ups[0] == 0
        log.close()
    finally:
        os.close(reader)
