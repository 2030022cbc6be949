"""Whether an upstream is up: active checks, passive ejection, check scheduling and
the log line of every change, as pure logic over an injected clock.

Theory of operation
-------------------
**Active checks** (``interval_s`` > 0) follow HAProxy's ``rise``/``fall``
semantics exactly, with HAProxy's single counter (``check.health`` in
src/check.c): ``health`` runs from 0 to ``rise + fall - 1`` and the upstream is
up while ``health >= rise``.

* a passing check adds one; on reaching ``rise`` it jumps to the top, so an up
  upstream needs ``fall`` *consecutive* failures to go down;
* a failing check takes one away; on dropping below ``rise`` it falls to 0, so a
  down upstream needs ``rise`` *consecutive* passes to come up.

**Start-up state.** As in HAProxy (whose default ``init-state`` is ``up``), an
upstream starts *up* with ``health = rise``: it takes connections at once, before
any check has run, and its first failing check takes it down at once.  So a proxy
restart does not refuse clients for ``rise × interval_s``, and a dead upstream is
found by the first check rather than the ``fall``-th.

**Passive health** watches real traffic: ``eject_after`` consecutive failed
connects, or connections reset by the upstream before its first byte, eject the
upstream (mark it down).  A connection that ends any other way resets the count.
Then:

* without active checks, it is tried again after ``eject_s`` (nginx's
  ``max_fails``/``fail_timeout``), on probation: its count is left one short of
  ``eject_after``, so a single further failure ejects it again at once, and the
  first good connection clears the probation;
* with active checks, no timer: ``health`` drops to 0 and the checks bring it
  back (``rise`` passes), as the issue asks and as HAProxy's ``observe layer4``
  with ``on-error mark-down`` does.

Passive results about an upstream that is already down are ignored.

**Scheduling.** :class:`CheckSchedule` spreads checks so that N proxies (or N
workers, or N upstreams of one proxy) do not probe in step: the first check comes
at a uniformly random point of the first interval, and each later one after
``interval_s`` ± :data:`SPREAD_FRACTION`.

Every change of state produces one :class:`HealthChange` whose ``text`` is the
log line, e.g. ``upstream 10.0.0.6:6379 of proxy redis is down: connection
refused (3 checks)``; the owner passes ``on_change`` to log or count it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from .expect import REPLY_LIMIT

__all__ = [
    "HealthSettings",
    "HealthChange",
    "HealthMachine",
    "log_change",
    "CheckSchedule",
    "SPREAD_FRACTION",
    "DEFAULT_RISE",
    "DEFAULT_FALL",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_EJECT_AFTER",
    "DEFAULT_EJECT_S",
]

log = logging.getLogger("midway")

DEFAULT_RISE = 2
"""HAProxy's default ``rise``."""
DEFAULT_FALL = 3
"""HAProxy's default ``fall``."""
DEFAULT_TIMEOUT_S = 2.0
"""HAProxy's default check interval (``inter 2s``), which is also its check timeout
when ``timeout check`` is unset."""
DEFAULT_EJECT_AFTER = 3
"""Consecutive passive failures that eject: the same count as the default ``fall``,
so passive and active health need equal evidence (nginx ejects after 1, Envoy's
``consecutive_gateway_failure`` after 5)."""
DEFAULT_EJECT_S = 10.0
"""nginx's default ``fail_timeout`` (10 s): how long an ejected upstream rests."""
SPREAD_FRACTION = 0.05
"""± 5 % on each check interval: HAProxy's ``spread-checks`` manual says "a value
between 2 and 5 seems to show good results"."""


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """The ``[proxy.NAME.health]`` table (the schema maps onto this)."""

    interval_s: float = 0.0
    """Seconds between active checks of each upstream; 0 = no active checks."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """A check that has not passed within this many seconds fails."""
    rise: int = DEFAULT_RISE
    """Consecutive passing checks that bring a down upstream up."""
    fall: int = DEFAULT_FALL
    """Consecutive failing checks that take an up upstream down."""
    send: bytes = b""
    """Written after connecting; empty = send nothing."""
    expect: bytes = b""
    """Must appear in the reply within ``timeout_s``; empty = connecting is enough."""
    eject_after: int = DEFAULT_EJECT_AFTER
    """Consecutive failed connects (or resets before the first upstream byte) that
    mark an upstream down; 0 = no passive health."""
    eject_s: float = DEFAULT_EJECT_S
    """How long a passively ejected upstream stays down when there are no active
    checks (with active checks, the checks bring it back)."""

    def __post_init__(self) -> None:
        problems = []
        if self.interval_s < 0:
            problems.append("interval_s: must be 0 (off) or more")
        if self.timeout_s <= 0:
            problems.append("timeout_s: must be more than 0")
        if self.rise < 1:
            problems.append("rise: must be at least 1")
        if self.fall < 1:
            problems.append("fall: must be at least 1")
        if self.eject_after < 0:
            problems.append("eject_after: must be 0 (off) or more")
        if self.eject_after and self.eject_s <= 0:
            problems.append("eject_s: must be more than 0 while eject_after is on")
        if len(self.expect) > REPLY_LIMIT:
            problems.append(f"expect: must be at most {REPLY_LIMIT} bytes")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def active(self) -> bool:
        return self.interval_s > 0


@dataclass(frozen=True, slots=True)
class HealthChange:
    """One change of state, with the log line that reports it."""

    up: bool
    at: float
    text: str


def log_change(change: HealthChange) -> None:
    """The default ``on_change``: down at WARNING, up at INFO, on the ``midway`` logger."""
    (log.info if change.up else log.warning)("%s", change.text)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class HealthMachine:
    """The health of one upstream.  ``now`` is the clock (monotonic seconds);
    ``on_change`` receives every :class:`HealthChange` (default: logged)."""

    __slots__ = ("settings", "label", "_now", "_on_change", "_health", "_run", "_passive",
                 "_probation", "_ejected_until", "last_check")

    def __init__(
        self,
        settings: HealthSettings,
        label: str,
        now: Callable[[], float],
        on_change: Callable[[HealthChange], None] = log_change,
    ) -> None:
        self.settings = settings
        self.label = label
        """``upstream ADDRESS of proxy NAME``: the subject of the log lines."""
        self._now = now
        self._on_change = on_change
        self._health = settings.rise  # up, and down at the first failing check
        self._run = 0  # consecutive check results of the same kind, for the log line
        self._passive = 0  # consecutive passive failures
        self._probation = False  # back after eject_s: one failure ejects it again
        self._ejected_until: float | None = None
        self.last_check: tuple[float, bool, str] | None = None
        """(time, passed, reason) of the last active check; None before the first."""

    # -- state --------------------------------------------------------------

    @property
    def up(self) -> bool:
        """May this upstream take new connections now?  The end of a passive
        ejection is noticed here, by the first look after ``eject_s`` (and
        reported then): no timer is needed."""
        if self._ejected_until is not None:
            if self._now() < self._ejected_until:
                return False
            self._end_ejection()
        return self._health >= self.settings.rise

    def ejected(self) -> bool:
        """Down by a passive ejection (active checks off) whose ``eject_s`` has
        not run out: down on the evidence of failed connects alone, which an
        upstream that restarts soon proves stale (see
        :meth:`~midway.upstream.state.UpstreamSet.order`'s panic rule)."""
        return self._ejected_until is not None and self._now() < self._ejected_until

    def replace_settings(self, settings: HealthSettings) -> None:
        """A reconfigure: keep the state, clamp the counter into the new range."""
        was_up = self._health >= self.settings.rise
        self.settings = settings
        top = settings.rise + settings.fall - 1
        self._health = top if was_up else 0
        if not settings.active and self._ejected_until is None and not was_up:
            # Checks were turned off while it was down: nothing would ever bring it
            # back, so it is up again (passive health still watches it).
            self._health = top
            self._emit(True, "active checks turned off")

    # -- active checks ------------------------------------------------------

    def check_passed(self) -> HealthChange | None:
        """Record a passing active check; the change of state, if any."""
        s = self.settings
        now = self._now()
        self.last_check = (now, True, "")
        self._run = self._run + 1 if self._run > 0 else 1
        top = s.rise + s.fall - 1
        if self._health >= top:
            return None
        was_up = self._health >= s.rise
        self._health += 1
        if self._health >= s.rise:
            self._health = top
            if not was_up:
                self._passive = 0
                self._probation = False
                return self._emit(True, f"check passed ({_plural(self._run, 'check')})")
        return None

    def check_failed(self, reason: str) -> HealthChange | None:
        """Record a failing active check (``reason``: what went wrong, e.g.
        ``connection refused``); the change of state, if any."""
        s = self.settings
        self.last_check = (self._now(), False, reason)
        self._run = self._run - 1 if self._run < 0 else -1
        if self._health == 0:
            return None
        was_up = self._health >= s.rise
        self._health -= 1
        if self._health < s.rise:
            self._health = 0
            if was_up:
                return self._emit(False, f"{reason} ({_plural(-self._run, 'check')})")
        return None

    # -- passive health -----------------------------------------------------

    def connect_failed(self, reason: str) -> HealthChange | None:
        """A client's connect to this upstream failed (or the upstream reset the
        connection before its first byte); the change of state, if any."""
        s = self.settings
        if not s.eject_after or not self.up:
            return None
        self._passive += 1
        if self._passive < s.eject_after:
            return None
        # On probation the count was left one short: say so, not "3 in a row".
        why = (f"{reason} (failed again on probation)" if self._probation else
               f"{reason} ({_plural(self._passive, 'connect')} failed in a row)")
        self._passive = 0
        self._probation = False
        if s.active:
            self._health = 0
            self._run = 0
            return self._emit(False, f"{why}; checks will bring it back")
        self._ejected_until = self._now() + s.eject_s
        return self._emit(False, f"{why}; ejected for {s.eject_s:g} s")

    def connection_ok(self) -> None:
        """A connection to this upstream ended without counting as a failure:
        the consecutive count (and any probation) starts over."""
        self._passive = 0
        self._probation = False

    # -- internals ----------------------------------------------------------

    def _end_ejection(self) -> None:
        rested = self.settings.eject_s
        self._ejected_until = None
        # Probation: one more failure ejects it again.
        self._passive = max(0, self.settings.eject_after - 1)
        self._probation = True
        self._emit(True, f"trying it again after {rested:g} s ejected")

    def _emit(self, up: bool, why: str) -> HealthChange:
        change = HealthChange(up, self._now(), f"{self.label} is {'up' if up else 'down'}: {why}")
        self._on_change(change)
        return change


class CheckSchedule:
    """When to run the next active check of one upstream: jittered so that many
    proxies checking the same upstream do not probe in step.  ``rng`` is the jitter
    source (injectable for tests)."""

    __slots__ = ("interval_s", "spread", "_rng")

    def __init__(self, interval_s: float, rng: random.Random | None = None,
                 spread: float = SPREAD_FRACTION) -> None:
        if interval_s <= 0:
            raise ValueError("a check schedule needs an interval above 0")
        if not 0 <= spread <= 0.5:
            raise ValueError("spread must be between 0 and 0.5 (HAProxy allows up to 50 %)")
        self.interval_s = interval_s
        self.spread = spread
        self._rng = rng if rng is not None else random.Random()

    def first_delay(self) -> float:
        """Seconds until the first check: anywhere in the first interval."""
        return self._rng.random() * self.interval_s

    def next_delay(self) -> float:
        """Seconds from the end of one check to the start of the next."""
        return self.interval_s * (1 + self.spread * (2 * self._rng.random() - 1))
