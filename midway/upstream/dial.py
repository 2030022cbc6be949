"""Connecting to an upstream: asynchronous name lookup at connect time, every
address tried in turn, one overall timeout.

Names are resolved for each connection (through the loop's resolver, which runs
``getaddrinfo`` off the loop), never once at start-up, so DNS changes are followed.
IP literals skip the lookup.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from ..config.addresses import Address
from ..errors import UpstreamError, describe_oserror

__all__ = ["dial", "Resolver"]

Resolver = Callable[[str, int], Awaitable[list[tuple[int, tuple[object, ...]]]]]
"""``resolve(host, port)`` → [(family, sockaddr), ...]; injectable for tests."""


async def _loop_resolver(host: str, port: int) -> list[tuple[int, tuple[object, ...]]]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def _targets(address: Address, resolve: Resolver) -> list[tuple[int, Any]]:
    if address.is_unix:
        return [(socket.AF_UNIX, address.path)]
    if address.is_ip_literal:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        return [(family, (address.host, address.port))]
    try:
        found = await resolve(address.host, address.port)
    except socket.gaierror as exc:
        raise UpstreamError(f"{address}: cannot resolve {address.host!r} ({exc.strerror})") from exc
    return list(found)


async def dial(
    address: Address,
    timeout_s: float,
    *,
    resolve: Resolver = _loop_resolver,
) -> socket.socket:
    """Connect to ``address``, trying each resolved address in order, within
    ``timeout_s`` overall (0 = no timeout).  Returns a connected non-blocking socket
    owned by the caller; raises :class:`UpstreamError` naming the address and why."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []

    async def attempt() -> socket.socket:
        for family, sockaddr in await _targets(address, resolve):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                errors.append(describe_oserror(exc))
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise UpstreamError(f"{address}: {'; '.join(errors) or 'no address'}")

    try:
        if timeout_s > 0:
            async with asyncio.timeout(timeout_s):
                return await attempt()
        return await attempt()
    except TimeoutError as exc:
        raise UpstreamError(f"{address}: connect timed out after {timeout_s:g} s") from exc
    except OSError as exc:  # socket() itself failed, e.g. EMFILE
        raise UpstreamError(f"{address}: {describe_oserror(exc)}") from exc
