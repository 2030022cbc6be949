"""One worker process: ``python -m midway.control.worker``, started by the
supervisor (:mod:`midway.workers`), never by hand.

Theory of operation
-------------------
The supervisor starts each worker as a new program (fork and exec), never as a
bare fork of itself: the supervisor runs an event loop and the admin API's
threads, and a fork of a threaded process may inherit a lock held by a thread
that does not exist in the child.  What the worker needs comes with it: three
inherited descriptors named on its command line (its end of the control
channel, the read end of the supervisor's liveness pipe, the shared connection
counters) and, over the channel, its target.

1. It sends :class:`~.channel.Hello`, reads its :class:`~.channel.Begin` (the
   target in force) with a blocking read, and only then makes its event loop
   (the target names the loop) and its :class:`~.agent.WorkerAgent`.
2. It binds and starts serving, then answers the ``Begin``: with what it bound,
   or with why it could not start (and exits 1).
3. It answers commands in order (:func:`~.channel.serve`) until SIGTERM/SIGINT
   (drain; a second one closes every connection), the end of its channel, or
   the end-of-file of the liveness pipe, which the kernel delivers when the
   supervisor dies however it dies (even by SIGKILL): then it drains as for
   SIGTERM.  SIGHUP is ignored: a reload reaches a worker through its channel.

Connection ids are unique across workers: worker ``w`` of ``N`` numbers its
connections ``w, w + N, w + 2N, ...`` (so ``id mod N`` names the worker, ``N``
giving 0), and a restarted worker goes on where the one it replaces stopped,
from a count per worker kept in memory shared with the supervisor
(:class:`ConnectionIds`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import socket
import sys
from collections.abc import Iterator, Sequence

from ..config.schema import LOG_LEVELS
from ..errors import ConfigError, ListenError
from .agent import WorkerAgent
from .channel import Begin, Hello, encode, read_frame, serve, write_frame
from .commands import Applied, CommandFailed
from .process import EXIT_OK, EXIT_START_FAILED, StopSignals, loop_factory, setup_logging

__all__ = ["ConnectionIds", "main", "COUNTER_BYTES"]

log = logging.getLogger("midway")

COUNTER_BYTES = 8
"""One unsigned 64-bit count of used connection ids per worker number."""


class ConnectionIds(Iterator[int]):
    """The connection ids of worker ``number`` of ``count``: ``number``,
    ``number + count``, ... , unique across the workers.  ``counters`` (one
    64-bit slot per worker, shared with the supervisor) holds how many this
    worker number has used, so a restarted worker goes on from there."""

    def __init__(self, number: int, count: int, counters: memoryview) -> None:
        self.number = number
        self.count = count
        self._counters = counters

    def __next__(self) -> int:
        used = self._counters[self.number - 1]
        self._counters[self.number - 1] = used + 1
        return int(used) * self.count + self.number


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m midway.control.worker",
                                     description="a midway worker (started by the supervisor)")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True, metavar="FD")
    parser.add_argument("--alive", type=int, required=True, metavar="FD")
    parser.add_argument("--counters", type=int, required=True, metavar="FD")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    setup_logging(args.log_level, f"midway[worker {args.number}, pid {os.getpid()}]")
    channel = socket.socket(fileno=args.channel)
    shared = mmap.mmap(args.counters, COUNTER_BYTES * args.count)
    counters = memoryview(shared).cast("Q")
    try:
        write_frame(channel, Hello())
        request, begin = read_frame(channel)
        assert isinstance(begin, Begin), begin
        factory = loop_factory(begin.target.config.server.loop)
        agent = WorkerAgent(begin.target, number=args.number, count=args.count,
                            ids=ConnectionIds(args.number, args.count, counters))
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_serve(agent, channel, request, args.alive))
    except (EOFError, ConnectionError) as exc:
        log.error("the supervisor's channel closed before the start: %s", exc)
        return EXIT_START_FAILED
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_START_FAILED
    finally:
        counters.release()
        shared.close()


async def _serve(agent: WorkerAgent, channel: socket.socket, begin: int, alive_fd: int) -> int:
    loop = asyncio.get_running_loop()
    runtime = agent.runtime
    signals = StopSignals(lambda name: runtime.close_all(f"second {name}"))  # SIGHUP: ignored

    def supervisor_gone() -> None:
        loop.remove_reader(alive_fd)
        if not signals.stop.is_set():
            log.warning("the supervisor is gone: stopping")
            signals.stop.set()

    loop.add_reader(alive_fd, supervisor_gone)
    channel.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=channel)
    try:
        await agent.start()
    except (ListenError, ConfigError) as exc:
        log.error("%s", exc)
        writer.write(encode((begin, False, CommandFailed(str(exc)))))
        await writer.drain()
        await runtime.shutdown(0)
        return EXIT_START_FAILED
    writer.write(encode((begin, True, Applied(agent.listen()))))
    commands = loop.create_task(serve(agent, reader, writer), name="midway control channel")
    commands.add_done_callback(lambda _: supervisor_gone())
    await signals.stop.wait()
    await runtime.shutdown()  # commands are still answered while draining
    commands.cancel()
    log.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
