"""The optional compiled relay of plain connections (``midway/core/_accel.c``).

pip builds it from source with the machine's C compiler when it installs midway
on Linux; where it could not be built, or with ``MIDWAY_PURE_PYTHON=1`` in the
environment, every relay runs in Python alone, with the same behaviour (the test
suite runs both ways).  What it does and when a relay uses it is in
:mod:`midway.core.relay` ("C mode") and in ``_accel.c``.

One :class:`Engine` per event loop: the poller's (:mod:`midway.core.poller`),
whose epoll it shares, so the loop has one reader for every socket midway
polls; :func:`~midway.core.poller.engine_for` gives it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

__all__ = ["AVAILABLE", "Core", "Engine", "ENV_PURE"]

ABI = 3
"""The interface of ``_accel.c`` this module expects (its ``ACCEL_ABI``): a build
left from another version of the file is not used."""

ENV_PURE = "MIDWAY_PURE_PYTHON"
"""Set to 1 to leave the compiled relay unused (pure Python, as without it)."""

if TYPE_CHECKING:
    class Engine:
        def __init__(self, report: Any, others: Any) -> None: ...
        epfd: int
        live: int

        def dispatch(self) -> None: ...
        def close(self) -> None: ...

    class Core:
        """What the relay reads of its C part (see _accel.c)."""

        c_up_read: int
        c_down_read: int
        c_up_delivered: int
        c_down_delivered: int
        c_up_read_at: float
        c_down_read_at: float
        c_up_eof: bool
        c_down_eof: bool
        c_up_fin: bool
        c_down_fin: bool
        c_up_held: int
        c_down_held: int
        c_last_activity: float
        c_ended: int
        c_first: int
        c_splice_ok: int
        c_engine: Engine | None

        def _c_start(self, engine: Engine, client_fd: int, upstream_fd: int, splice_ok: bool,
                     now: float, client_mask: int = -1, upstream_mask: int = -1) -> None: ...
        def _c_leave(self, closing: bool = False) -> None: ...
        def _c_export(self) -> tuple[bytes, bytes]: ...

    AVAILABLE: bool
else:
    try:
        if os.environ.get(ENV_PURE, "") not in ("", "0"):
            raise ImportError(f"{ENV_PURE} is set")
        from . import _accel
        if getattr(_accel, "ABI", None) != ABI:
            logging.getLogger("midway").warning(
                "the compiled relay (%s) was built from another version of midway: "
                "running in pure Python; rebuild it with `pip install -e .`",
                os.path.join(os.path.dirname(__file__), "_accel"))
            raise ImportError("stale build")
        Core, Engine = _accel.Core, _accel.Engine
    except ImportError:
        AVAILABLE = False

        class Core:
            """Stand-in base of the relay where the compiled part is absent."""

            __slots__ = ()

        Engine = None
    else:
        AVAILABLE = True
"""Whether relays may run in C mode in this process."""
