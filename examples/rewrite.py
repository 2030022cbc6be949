"""Rewrite text in flight, both ways: a plain function as a hook.

Run it from the repository root, in front of any line-based text protocol
(here a netcat "server" on port 9000)::

    nc -l 9000 &
    python -m midway 127.0.0.1:9001 127.0.0.1:9000 --hook examples.rewrite:rewrite
    echo "hello, world" | nc -q1 127.0.0.1 9001       # the server reads "goodbye, world"

Choose the replacements with ``MIDWAY_REWRITE`` (``old=new`` pairs separated
by commas), read once when midway starts::

    MIDWAY_REWRITE='colour=color,centre=center' python -m midway ... --hook examples.rewrite:rewrite

How: ``rewrite.framing = "line"`` makes midway hand the function whole lines,
so a word cut in two by TCP is still found; the returned line replaces the
original.  A plain function is the simplest hook: midway calls it as
``on_data(direction, data, ctx)`` for both directions.  A change in length is
fine for line protocols, but breaks protocols that announce lengths (HTTP's
Content-Length, RESP's ``$N``).
"""

from __future__ import annotations

import os

from midway.chain.hooks import HookContext

DEFAULT = "hello=goodbye"


def _replacements(spec: str) -> list[tuple[bytes, bytes]]:
    pairs = []
    for item in spec.split(","):
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise ValueError(f"MIDWAY_REWRITE: expected old=new pairs, got {item!r}")
        pairs.append((old.encode(), new.encode()))
    return pairs


REPLACEMENTS = _replacements(os.environ.get("MIDWAY_REWRITE", DEFAULT))


def rewrite(direction: str, data: bytes, ctx: HookContext) -> bytes:
    for old, new in REPLACEMENTS:
        data = data.replace(old, new)
    return data


rewrite.framing = "line"  # type: ignore[attr-defined]
