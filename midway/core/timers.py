"""The deadlines of one connection, as a pure function of time.

The relay tells :class:`ConnectionTimers` when bytes moved and when a direction
finished; it asks when the next deadline is and whether one has passed.  No clock is
read here, so the rules are tested with plain numbers.

Rules:
- idle: no byte moved either way for ``idle_timeout_s`` (0 = never);
- half-close: one direction finished (FIN) and the other has not within
  ``half_close_timeout_s`` of that (0 = never).
"""

from __future__ import annotations

from .observer import CloseReason

__all__ = ["ConnectionTimers"]


class ConnectionTimers:
    __slots__ = ("idle_timeout_s", "half_close_timeout_s", "last_activity", "half_closed_at")

    def __init__(self, idle_timeout_s: float, half_close_timeout_s: float, now: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.half_close_timeout_s = half_close_timeout_s
        self.last_activity = now
        self.half_closed_at: float | None = None

    def activity(self, now: float) -> None:
        self.last_activity = now

    def half_closed(self, now: float) -> None:
        if self.half_closed_at is None:
            self.half_closed_at = now

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`expired` may return a reason."""
        # (No list and min(): this runs three times a connection.)
        idle = self.last_activity + self.idle_timeout_s if self.idle_timeout_s > 0 else None
        if self.half_close_timeout_s > 0 and self.half_closed_at is not None:
            half = self.half_closed_at + self.half_close_timeout_s
            if idle is None or half < idle:
                return half
        return idle

    def expired(self, now: float) -> CloseReason | None:
        """The reason to close at ``now``, if a deadline has passed."""
        if (self.half_close_timeout_s > 0 and self.half_closed_at is not None
                and now >= self.half_closed_at + self.half_close_timeout_s):
            return CloseReason.HALF_CLOSE_TIMEOUT
        if self.idle_timeout_s > 0 and now >= self.last_activity + self.idle_timeout_s:
            return CloseReason.IDLE_TIMEOUT
        return None
