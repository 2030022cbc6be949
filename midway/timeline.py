"""The toxic timeline: toxics added and removed at set times after a proxy starts,
for reproducible fault scenarios ("at 5 s add latency, at 20 s remove it").

Theory of operation
-------------------
A toxic in the configuration may carry ``at_s`` (when it is added; 0 means it is
there from the start, built with the proxy's other elements by
:mod:`midway.chain.registry`) and ``until_s`` (when it is removed).
:func:`schedule` turns a proxy's toxics into events sorted by time; at the same
instant removals come before additions, so one toxic can hand its name to the
next.  It is a pure function: the scenario can be checked without running it.

A :class:`Timeline` plays the events on an injected clock (the event loop's by
default; tests use :class:`~midway.core.clock.FakeClock`), measuring each event
from the moment the timeline was made (the proxy's start), so a late wake-up does
not push later events back.  Adding and removing go through
:mod:`midway.chain.toxics.live`, so they apply to open connections without losing
a byte.  The timeline only removes the toxic it added itself: if that toxic was
removed (or replaced) meanwhile, its removal is a no-op; an addition whose name
is taken at that moment is skipped with a warning.  :meth:`Timeline.drop` takes
one toxic out of the scenario (the admin API's DELETE): its toxic goes now and
its later events are cancelled, so nothing the timeline does brings it back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .chain.toxics.base import Toxic
from .chain.toxics.config import build_toxic
from .chain.toxics.live import ChainHost, ToxicExists, add_toxic
from .config.schema import ToxicSpec
from .core.clock import Clock, LoopClock

__all__ = ["TimelineEvent", "schedule", "Timeline"]

log = logging.getLogger("midway")

ADD: Literal["add"] = "add"
REMOVE: Literal["remove"] = "remove"


@dataclass(frozen=True)
class TimelineEvent:
    """At ``at_s`` seconds after the proxy starts, ``action`` the toxic
    ``spec`` (the ``index``-th toxic of the proxy)."""

    at_s: float
    action: Literal["add", "remove"]
    index: int
    spec: ToxicSpec


def schedule(specs: Sequence[ToxicSpec]) -> list[TimelineEvent]:
    """Every timed event of a proxy's toxics, in the order they happen."""
    events: list[TimelineEvent] = []
    for index, spec in enumerate(specs):
        if spec.at_s > 0:
            events.append(TimelineEvent(spec.at_s, ADD, index, spec))
        if spec.until_s is not None:
            events.append(TimelineEvent(spec.until_s, REMOVE, index, spec))
    events.sort(key=lambda e: (e.at_s, e.action != REMOVE, e.index))
    return events


class Timeline:
    """Plays the timed toxics of one proxy.  Make it when the proxy starts (it
    takes the toxics already present from ``host``), then run :meth:`run` as a task;
    cancelling the task stops it."""

    def __init__(self, host: ChainHost, specs: Sequence[ToxicSpec], *, proxy: str = "",
                 clock: Clock | None = None) -> None:
        self.host = host
        self.proxy = proxy
        self.clock = clock or LoopClock()
        self.specs = tuple(specs)
        self.events = schedule(specs)
        self.started_at = self.clock.now()
        self.dropped: set[int] = set()
        """Spec indexes taken out by :meth:`drop`: their events are skipped."""
        self.active: dict[int, Toxic[Any]] = {}
        """The toxic each spec index put in the chain (by identity, not by name)."""
        for index, spec in enumerate(specs):
            if spec.at_s == 0:
                found = next((e for e in host.elements
                              if isinstance(e, Toxic) and e.name == spec.name), None)
                if found is not None:
                    self.active[index] = found

    async def run(self) -> None:
        """Apply every event at its time; returns after the last one."""
        for event in self.events:
            delay = self.started_at + event.at_s - self.clock.now()
            if delay > 0:
                await self.clock.sleep(delay)
            self.apply(event)

    def apply(self, event: TimelineEvent) -> None:
        """Carry out one event now."""
        spec = event.spec
        if event.index in self.dropped:
            return
        if event.action == ADD:
            toxic = build_toxic(spec, clock=self.clock)
            try:
                add_toxic(self.host, toxic)
            except ToxicExists:
                log.warning("%s: timeline at %g s: a toxic named %r is already there; "
                            "not adding another", self.proxy, event.at_s, spec.name)
                return
            self.active[event.index] = toxic
            log.info("%s: timeline at %g s: added %s toxic %r", self.proxy, event.at_s,
                     spec.type, spec.name)
            return
        removed = self.active.pop(event.index, None)
        if removed is not None and any(e is removed for e in self.host.elements):
            self.host.remove_element(removed)
            log.info("%s: timeline at %g s: removed toxic %r", self.proxy, event.at_s,
                     spec.name)

    def drop(self, spec: ToxicSpec) -> None:
        """Take ``spec`` out of the scenario: remove the toxic it put in the chain
        (if still there) and skip its events from now on."""
        for index, candidate in enumerate(self.specs):
            if candidate != spec or index in self.dropped:
                continue
            self.dropped.add(index)
            removed = self.active.pop(index, None)
            if removed is not None and any(e is removed for e in self.host.elements):
                self.host.remove_element(removed)
            log.info("%s: timeline: toxic %r taken out of it (removed now, its later "
                     "events cancelled)", self.proxy, spec.name)
            return
