"""The least Python a TCP proxy can run per connection: a yardstick, not a proxy.

`python bench/floor.py LISTEN_PORT UPSTREAM_PORT` forwards 127.0.0.1:LISTEN_PORT to
127.0.0.1:UPSTREAM_PORT with one `select.epoll`, no asyncio and nothing else: no timeouts,
no flow control, no half-close, no balancing, no counters, no logs.  A `send` that does not
take everything loses the rest, so it is only fit for `bench/conncost.py --proxy floor`,
whose 16-byte echoes never fill a socket buffer.  What it costs per connection is the floor
under any Python proxy on this machine: the distance from it to midway is what midway's
connection handling costs, and the distance from it to HAProxy is what CPython costs.
"""

from __future__ import annotations

import select
import socket
import sys


def main(listen_port: int, upstream_port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(1024)
    listener.setblocking(False)
    upstream = ("127.0.0.1", upstream_port)
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    peer: dict[int, int] = {}
    connecting: set[int] = set()

    def close(fd: int) -> None:
        for one in (fd, peer.get(fd)):
            if one is not None and one in socks:
                socks.pop(one).close()  # the kernel drops it from the epoll
                peer.pop(one, None)

    while True:
        for fd, _ in poll.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        client, _ = listener.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    server = socket.socket(type=socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    server.connect_ex(upstream)
                    c, s = client.fileno(), server.fileno()
                    socks[c], socks[s], peer[c], peer[s] = client, server, s, c
                    connecting.add(s)
                    poll.register(s, select.EPOLLOUT)
            elif fd in connecting:
                connecting.discard(fd)
                poll.modify(fd, select.EPOLLIN)
                poll.register(peer[fd], select.EPOLLIN)
            elif fd in socks:
                try:
                    data = socks[fd].recv(65536)
                except OSError:
                    data = b""
                if data:
                    socks[peer[fd]].send(data)
                else:
                    close(fd)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
