"""Log every Redis command that goes through midway, with the start of its reply.

Run it from the repository root, with Redis listening on 6379::

    python -m midway 127.0.0.1:6380 127.0.0.1:6379 --hook examples.redis_logger:RedisLogger
    redis-cli -p 6380 SET greeting hello
    redis-cli -p 6380 GET greeting

and midway logs, on standard error::

    ... midway INFO redis #1 127.0.0.1:51234: SET greeting hello -> +OK
    ... midway INFO redis #2 127.0.0.1:51236: GET greeting -> "hello"

How: clients send RESP arrays of bulk strings (``*2\\r\\n$3\\r\\nGET\\r\\n...``)
or inline commands (``GET greeting\\r\\n``).  ``framing = "line:\\r\\n"`` hands
the hook whole lines however TCP cut them, and per-connection state (a new
``RedisLogger`` per connection) puts each command back together, values that
contain CRLF included.  Replies are matched to commands in order, so pipelined
commands are logged correctly.  The hook returns ``None``: the traffic is not
changed.
"""

from __future__ import annotations

import logging
import re
from collections import deque

from midway.chain.hooks import HookContext

log = logging.getLogger("midway.examples.redis")

SHOWN = 60
"""Characters of an argument or reply logged; longer ones are cut with '...'."""

# RESP types whose items follow (how many per announced count); RESP3's map and
# attribute types carry key/value pairs.
_AGGREGATES = {b"*": 1, b"~": 1, b">": 1, b"%": 2, b"|": 2}
_BLOBS = (b"$", b"=", b"!")  # a length line, then that many bytes and CRLF


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _show(value: bytes) -> str:
    """``value`` safe for a log line: control characters escaped (a value with
    a newline must not forge a second line), cut to :data:`SHOWN`."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1],
                        value.decode("utf-8", "backslashreplace"))
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


class _Reader:
    """Reassembles RESP values from whole lines.  ``feed`` returns a complete
    top-level value's summary (a list of its strings for a command, the first
    line or the string for a reply), or ``None`` while one is incomplete."""

    def __init__(self) -> None:
        self.blob_left = -1  # bytes (CRLF included) of a bulk string still expected
        self.blob = bytearray()
        self.counts: list[int] = []  # items still expected, per open aggregate
        self.parts: list[bytes] = []
        self.head = b""

    def feed(self, line: bytes) -> tuple[bytes, list[bytes]] | None:
        if self.blob_left >= 0:  # inside a bulk string: lines are its content
            self.blob += line
            self.blob_left -= len(line)
            if self.blob_left > 0:
                return None
            self.blob_left = -1
            return self._item(bytes(self.blob[:-2]))
        kind, body = line[:1], line[1:].rstrip(b"\r\n")
        if not self.counts and not self.parts:
            self.head = line.rstrip(b"\r\n")
        if kind in _AGGREGATES:
            n = int(body) * _AGGREGATES[kind]
            if n > 0:
                self.counts.append(n)
                return None
            return self._item(None)
        if kind in _BLOBS:
            n = int(body)
            if n < 0:
                return self._item(None)
            self.blob_left, self.blob = n + 2, bytearray()
            return None
        if not self.counts and kind not in b"+-:_,#(" or kind == b"":  # inline command
            return self.head, line.split()
        return self._item(body if kind in (b"+", b"-") else None)

    def _item(self, value: bytes | None) -> tuple[bytes, list[bytes]] | None:
        if value is not None:
            self.parts.append(value)
        while self.counts:
            self.counts[-1] -= 1
            if self.counts[-1] > 0:
                return None
            self.counts.pop()
        head, parts = self.head, self.parts
        self.parts = []
        return head, parts


class RedisLogger:
    """One per connection: the commands sent and not yet answered."""

    framing = "line:\r\n"

    def __init__(self) -> None:
        self.commands = _Reader()
        self.replies = _Reader()
        self.waiting: deque[str] = deque()
        self.lost = False

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None:
        if self.lost:
            return None
        try:
            self._log(direction, data, ctx)
        except ValueError:  # not RESP after all: stop logging, never break the traffic
            self.lost = True
            log.warning("redis #%d %s: cannot parse %s data; not logging this connection",
                        ctx.id, ctx.client, direction)
        return None

    def _log(self, direction: str, data: bytes, ctx: HookContext) -> None:
        if direction == "upstream":
            command = self.commands.feed(data)
            if command is not None and command[1]:
                words = command[1]
                self.waiting.append(" ".join([words[0].decode("ascii", "replace").upper(),
                                              *(_show(w) for w in words[1:])]))
        else:
            reply = self.replies.feed(data)
            if reply is not None:
                head, parts = reply
                if head.startswith(b">"):
                    return  # a push message (RESP3), not an answer
                shown = f'"{_show(parts[0])}"' if head.startswith(b"$") and parts else _show(head)
                command_text = self.waiting.popleft() if self.waiting else "(unknown command)"
                log.info("redis #%d %s: %s -> %s", ctx.id, ctx.client, command_text, shown)

    def on_close(self, ctx: HookContext, reason: str) -> None:
        for command_text in self.waiting:
            log.info("redis #%d %s: %s -> (no reply: %s)", ctx.id, ctx.client, command_text,
                     reason)
