"""The I/O of active health checks: one check (connect, send, read until the
expected bytes, all within ``timeout_s``) and the loop that runs checks for one
upstream on a jittered schedule.

A check is a coroutine on the event loop using only loop primitives
(``sock_connect`` through :func:`~.dial.dial`, ``sock_sendall``, ``sock_recv``), so it
never blocks the loop; what the reply means is decided by the sans-I/O
:class:`~.expect.ExpectMatcher`.  The owner (the proxy service, once wired) starts
one :func:`run_checks` task per upstream while ``interval_s`` > 0 and cancels it on
reconfigure or stop; cancelling closes the check's socket.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable

from ..config.addresses import Address
from ..core.clock import Clock
from ..core.poller import poller_for
from ..core.tlsstream import TlsStream
from ..errors import TlsFailed, UpstreamError, describe_oserror
from .dial import DialFailure, dial
from .expect import ExpectMatcher, Verdict
from .health import CheckSchedule, HealthMachine, HealthSettings

__all__ = ["check_once", "run_checks", "Check", "Secure", "NoVerdict", "READ_SIZE"]

READ_SIZE = 4096
"""Bytes asked of each read of a check reply: a reply worth checking is short, and
the matcher bounds what is kept anyway."""

Check = Callable[[Address, HealthSettings], Awaitable[str | None]]
"""``check(address, settings)`` → None when it passed, else why it failed (a
:class:`NoVerdict` when it could not be made)."""

Secure = Callable[[socket.socket, Address], Awaitable[TlsStream]]
"""``secure(sock, address)``: the TLS handshake a proxy's connections make on their
upstream socket (``upstream_tls``; :meth:`~midway.layers.tls.TlsOrigination.secure`),
the stream owning ``sock`` once it returns; raises :class:`~midway.errors.TlsFailed`."""


class NoVerdict(str):
    """Why a check could not be made at all (midway ran out of descriptors for
    its socket): it says nothing about the upstream, whose health stays as it
    was."""

    __slots__ = ()


async def check_once(address: Address, settings: HealthSettings,
                     secure: Secure | None = None) -> str | None:
    """Run one check of ``address``: None if it passed, else the reason in a few
    words (``connection refused``, ``connect timed out after 2 s``, ``closed before
    sending b'+PONG' (no reply)``).  With ``secure`` (the proxy originates TLS),
    the check makes the connections' handshake, then sends and reads over TLS,
    as HAProxy checks an ``ssl`` server: a failed handshake fails the check.
    Never raises for a network failure."""
    loop = asyncio.get_running_loop()
    matcher = ExpectMatcher(settings.expect)
    connected = handshaking = False
    try:
        async with asyncio.timeout(settings.timeout_s):
            # The timeout above covers the whole check; given to the dialer too, it
            # shares it among a name's addresses as for a client's connection.
            sock = await dial(address, settings.timeout_s)
            connected = True
            stream: TlsStream | socket.socket = sock
            sendall: Callable[[bytes], Awaitable[None]]
            receive: Callable[[int], Awaitable[bytes]]
            try:
                if secure is None:
                    sendall = functools.partial(loop.sock_sendall, sock)
                    receive = functools.partial(loop.sock_recv, sock)
                else:
                    handshaking = True
                    stream = tls = await secure(sock, address)
                    handshaking = False
                    sendall, receive = tls.sendall, tls.receive
                if settings.send:
                    await sendall(settings.send)
                while matcher.verdict is Verdict.NEED_MORE:
                    data = await receive(READ_SIZE)
                    if data:
                        matcher.feed(data)
                    else:
                        matcher.eof()
            finally:
                if secure is not None:  # the handshake waited on the relay's poller
                    poller_for(loop).forget(sock.fileno())
                stream.close()  # a TLS stream sends its close_notify
    except TimeoutError:
        if not connected:
            return f"connect timed out after {settings.timeout_s:g} s"
        if handshaking:
            return f"TLS handshake timed out after {settings.timeout_s:g} s"
        matcher.timed_out()
    except TlsFailed as exc:
        return str(exc).removeprefix(f"upstream {address}: ")
    except UpstreamError as exc:
        # The dialer's message starts with the address, which the log line names already.
        reason = str(exc).removeprefix(f"{address}: ")
        if getattr(exc, "failure", None) is DialFailure.OUT_OF_DESCRIPTORS:
            return NoVerdict(reason)
        return reason
    except OSError as exc:  # send or receive failed, e.g. reset by the upstream
        return describe_oserror(exc)
    return None if matcher.verdict is Verdict.PASS else matcher.reason


async def run_checks(
    address: Address,
    health: HealthMachine,
    schedule: CheckSchedule,
    clock: Clock,
    check: Check = check_once,
) -> None:
    """Check ``address`` forever, feeding ``health``: the first check after
    ``schedule.first_delay()``, each next one ``schedule.next_delay()`` after the
    previous ended.  Runs until cancelled."""
    await clock.sleep(schedule.first_delay())
    while True:
        reason = await check(address, health.settings)
        if reason is None:
            health.check_passed()
        elif not isinstance(reason, NoVerdict):
            health.check_failed(reason)
        await clock.sleep(schedule.next_delay())
