"""Drop one command of a line protocol and answer the client in its place.

Run it from the repository root, in front of Redis on 6379, and type
commands (``nc`` shown; Redis takes plain-text "inline" commands)::

    python -m midway 127.0.0.1:6380 127.0.0.1:6379 --hook examples.drop_command:DropCommand
    nc 127.0.0.1 6380
    SET a 1
    +OK
    FLUSHALL
    -ERR FLUSHALL is disabled by midway
    GET a
    $1
    1

It suits protocols of one command per line: Redis *inline* commands (as
above), memcached's text protocol, SMTP, POP3, IMAP, FTP.  (redis-cli sends
RESP arrays, one argument per line: see ``redis_logger.py`` for how to put
those back together.)  Choose the commands with ``MIDWAY_DROP`` (comma
separated, case does not matter; default ``FLUSHALL,FLUSHDB``) and the answer
with ``MIDWAY_DROP_REPLY`` (``{command}`` is replaced; default a Redis error)::

    MIDWAY_DROP=QUIT MIDWAY_DROP_REPLY=$'502 {command} not allowed\\r\\n' python -m midway ...

(``$'...'``: the shell turns ``\\r\\n`` into the line end the client waits for;
in plain quotes the reply would end in those four characters.)

How: the client's side is framed as lines (``framing`` per direction; the
server's replies pass as they come).  A dropped line is answered with
``ctx.send_to_client``, which goes back through the rest of the chain (so
``--dump`` and ``--pcap`` show it).  The answer is sent at once: a client that
waits for each answer (as above) sees it in its place, but one that pipelines
(sends more commands before reading) may get it before the server's answers
to earlier commands; keeping that order needs the protocol's replies to be
counted, as ``redis_logger.py`` does.
"""

from __future__ import annotations

import logging
import os

from midway.chain.hooks import HookContext

log = logging.getLogger("midway.examples.drop")


def _words(name: str, default: str) -> frozenset[str]:
    return frozenset(w.strip().upper() for w in os.environ.get(name, default).split(",")
                     if w.strip())


class DropCommand:
    framing = {"upstream": "line", "downstream": None}
    blocked = _words("MIDWAY_DROP", "FLUSHALL,FLUSHDB")
    reply = os.environ.get("MIDWAY_DROP_REPLY", "-ERR {command} is disabled by midway\r\n")

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction != "upstream":
            return None  # the server's replies, unchanged
        words = data.split(None, 1)
        command = words[0].decode("ascii", "replace").upper() if words else ""
        if command not in self.blocked:
            return None
        log.info("conn #%d %s: dropped %s", ctx.id, ctx.client, command)
        ctx.send_to_client(self.reply.format(command=command).encode())
        return b""
