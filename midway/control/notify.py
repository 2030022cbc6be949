"""Readiness for a service manager: systemd's ``sd_notify`` protocol, with the
standard library alone.

The protocol (sd_notify(3)): when the service manager starts midway with
``Type=notify`` it sets ``NOTIFY_SOCKET`` to a unix datagram socket, a path, or
a name in the abstract namespace when it begins with ``@`` (the ``@`` stands for
the leading zero byte).  midway sends one datagram per state change, newline
separated ``KEY=VALUE`` lines: ``READY=1`` once every listener is bound and
accepting (and again after each reload), ``RELOADING=1`` with
``MONOTONIC_USEC`` (the CLOCK_MONOTONIC time, which ``Type=notify-reload``
requires) when a reload begins, ``STOPPING=1`` when draining begins.  Only the
main process notifies (systemd's default ``NotifyAccess=main``): the
supervisor, or the single process; workers never do.  Without
``NOTIFY_SOCKET`` every call does nothing, and a failed send is logged at debug
level: readiness is a courtesy, never a reason to stop serving.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["notify", "READY", "RELOADING", "STOPPING", "ENVIRONMENT"]

log = logging.getLogger("midway")

ENVIRONMENT = "NOTIFY_SOCKET"
READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"


def notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. :data:`READY`) to the service manager, if there is
    one; returns whether a datagram was sent."""
    target = (os.environ if environ is None else environ).get(ENVIRONMENT, "")
    if not target:
        return False
    if state == RELOADING:
        state += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify to %s: %s", target, exc)
        return False
    return True
