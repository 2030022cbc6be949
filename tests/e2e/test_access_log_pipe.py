"""The access log on a pipe nobody reads: the proxy goes on (it froze once the
pipe's 64 KiB filled, when records were written on the event loop)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from ..helpers import proxy_process, threaded_echo


@pytest.mark.one_mode
def test_a_never_read_standard_output_does_not_stop_the_proxy() -> None:
    """``--access-log -`` with standard output a pipe nobody reads (the test's
    own): 400 connections, about 250 KB of records, four times a pipe's buffer,
    all served; the lines wait for the reader, and are there when it reads."""
    with threaded_echo() as up, proxy_process("127.0.0.1:0", f"127.0.0.1:{up}",
                                            "--access-log", "-") as mw:
        for n in range(400):
            with socket.create_connection(("127.0.0.1", mw.port), timeout=5) as client:
                client.sendall(b"ping %d\n" % n)
                assert client.recv(100) == b"ping %d\n" % n
        assert mw.proc.stdout is not None
        os.set_blocking(mw.proc.stdout.fileno(), False)
        deadline, got = time.monotonic() + 10, b""
        while time.monotonic() < deadline and got.count(b"\n") < 400:
            try:
                got += os.read(mw.proc.stdout.fileno(), 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
    lines = got.splitlines()
    assert len(lines) == 400
    assert all(json.loads(line)["reason"] == "eof" for line in lines)
