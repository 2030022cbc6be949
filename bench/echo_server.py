"""A tiny single-threaded echo server (selectors/epoll): the backend for the ping-pong and
idle-connection scenarios. Run as `python bench/echo_server.py PORT`; exits by itself after
--lifetime seconds in case nobody stops it.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import time


def serve(port: int, lifetime: float) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:
                _accept(sel, sock)
            else:
                _echo(sel, sock)


def _accept(sel: selectors.BaseSelector, listener: socket.socket) -> None:
    for _ in range(256):
        try:
            conn, _addr = listener.accept()
        except BlockingIOError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, "conn")


def _echo(sel: selectors.BaseSelector, conn: socket.socket) -> None:
    try:
        data = conn.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        sel.unregister(conn)
        conn.close()
        return
    # Replies are tiny (1 byte per round trip), so the send buffer never fills; block briefly
    # rather than carry write buffers around.
    conn.setblocking(True)
    conn.settimeout(5.0)
    try:
        conn.sendall(data)
    except OSError:
        sel.unregister(conn)
        conn.close()
        return
    conn.setblocking(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    serve(args.port, args.lifetime)


if __name__ == "__main__":
    main()
