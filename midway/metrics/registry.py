"""One worker's metrics: an observer that counts connection events, its snapshot,
and the merge of the workers' snapshots.

Theory of operation
-------------------
:class:`Metrics` is an :class:`~midway.core.observer.Observer`.  The runtime tells
it these things and nothing else:

* ``connection_opened(proxy)`` at accept,
* ``connect_failed(proxy, upstream, reason)`` after each failed attempt to dial
  an upstream,
* ``connection_closed(record)`` once per accepted connection, with its
  :class:`~midway.core.observer.CloseRecord` (reason, delivered bytes, connect
  time, duration),
* ``upstream_health(proxy, upstream, up)`` and, for an SNI route's upstream,
  ``route_upstream_health(proxy, route, upstream, up)`` when its health is
  known or changes.

Each event costs a handful of dict updates (and a ``bisect`` per histogram): the
relay never calls into metrics, so the cost per byte is zero.  Bytes of
connections still open are not counted by events; a *collector*
(:meth:`Metrics.add_collector`) is a callable run at snapshot time that returns
samples to add, e.g. the delivered bytes of every live relay.  A collector must
report the quantity the close record will carry (delivered bytes), so that a
connection moving from "live" to "closed" between two scrapes neither adds nor
loses a byte and the counter never goes back.

:meth:`Metrics.snapshot` gives a plain, JSON-able dict; :func:`merge_snapshots`
combines the snapshots of N workers as :data:`~.table.METRICS` says (add, or the
minimum for the ``upstream_up`` gauges); :func:`~.exposition.render` writes any snapshot,
one worker's or a merged one, in Prometheus's text format.

Snapshot shape (``format`` 1)::

    {"format": 1,
     "metrics": {"midway_bytes_total": [[["web", "upstream"], 1234], ...],
                 "midway_connect_seconds": [[["web"], {"counts": [...], "sum": 0.02}], ...]}}

Each series is ``[label values in the table's order, value]``; a histogram's
value has one count per bucket, the last for ``+Inf``, not cumulative.

Ownership: one :class:`Metrics` per worker process, used from its event loop's
thread only (no locks).  It must be an observer from before the first accept, or
``connections_active`` misses the connections already open.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from ..core.observer import CloseReason, CloseRecord, Observer, OpenedConnection
from .exposition import render
from .table import BY_NAME, METRICS, Kind, Merge, MetricSpec, Snapshot

__all__ = ["Metrics", "Collector", "Sample", "Snapshot", "merge_snapshots",
           "retain", "cumulative", "identity", "Keep", "SNAPSHOT_FORMAT"]

log = logging.getLogger("midway")

SNAPSHOT_FORMAT = 1
"""Version of the snapshot's shape; workers and supervisor must agree on it."""

Labels = tuple[str, ...]
Sample = tuple[str, Labels, float]
"""``(metric name, label values, value)``: one value a collector contributes."""
Collector = Callable[[], Iterable[Sample]]
Keep = Mapping[str, Collection[tuple[str, ...]]]
"""The proxies whose series a worker still shows, each with the identity
(:func:`identity`) of every upstream series it keeps: ``(address,)`` for each
upstream, the SNI routes' included, and ``(route, address)`` for each route's:
what :meth:`Metrics.forget` and :func:`retain` keep."""

_DIRECTIONS = ("upstream", "downstream")


class Metrics(Observer):
    """Counts one worker's connections from observer events; see the module doc."""

    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = {
            spec.name: {} for spec in METRICS if spec.kind is not Kind.HISTOGRAM}
        self._histograms: dict[str, dict[Labels, list[float]]] = {
            spec.name: {} for spec in METRICS if spec.kind is Kind.HISTOGRAM}
        """A histogram series is ``[count of bucket 0, ..., count of +Inf, sum]``."""
        self._collectors: list[Collector] = []
        # The series every event touches, bound once (an event is a few dict updates).
        self._opened = self._values["midway_connections_total"]
        self._active = self._values["midway_connections_active"]
        self._bytes = self._values["midway_bytes_total"]
        self._closes = self._values["midway_closes_total"]
        self._failures = self._values["midway_connect_failures_total"]
        self._up = self._values["midway_upstream_up"]
        self._route_up = self._values["midway_route_upstream_up"]
        self._connect = self._histograms["midway_connect_seconds"]
        self._connect_bounds = BY_NAME["midway_connect_seconds"].buckets
        self._duration = self._histograms["midway_connection_seconds"]
        self._duration_bounds = BY_NAME["midway_connection_seconds"].buckets

    # -- observer events --------------------------------------------------------

    def connection_opened(self, info: OpenedConnection) -> None:
        """A client connection was accepted by ``info.proxy``."""
        key = (info.proxy,)
        self._opened[key] = self._opened.get(key, 0) + 1
        self._active[key] = self._active.get(key, 0) + 1

    def connect_failed(self, proxy: str, upstream: str, failure: str = "",
                       detail: str = "") -> None:
        """One attempt to dial ``upstream`` (the address as configured) failed.
        ``failure`` and ``detail`` are for logs and the access log; not labels."""
        key = (proxy, upstream)
        self._failures[key] = self._failures.get(key, 0) + 1

    def connection_closed(self, record: CloseRecord) -> None:
        """An accepted connection ended (every accepted one ends exactly once)."""
        self.connection_counted(record.proxy, record.reason, record.bytes_up, record.bytes_down,
                                record.connect_time_s, record.duration_s)

    counts_only = True  # the service tells connection_counted, making no record

    def connection_counted(self, proxy: str, reason: str, bytes_up: int, bytes_down: int,
                           connect_time_s: float | None, duration_s: float) -> None:
        """An accepted connection ended: what :meth:`connection_closed` counts."""
        key = (proxy,)
        self._active[key] = self._active.get(key, 0) - 1
        closes = (proxy, reason)
        self._closes[closes] = self._closes.get(closes, 0) + 1
        up, down = (proxy, "upstream"), (proxy, "downstream")
        self._bytes[up] = self._bytes.get(up, 0) + bytes_up
        self._bytes[down] = self._bytes.get(down, 0) + bytes_down
        # Each histogram, inline (twice a connection).  Prometheus buckets are
        # "less than or equal": bisect_left finds the first bound >= value; past
        # the last bound it is the +Inf bucket.
        if connect_time_s is not None:
            histogram = self._connect.get(key)
            if histogram is None:
                histogram = self._connect[key] = _empty_histogram(self._connect_bounds)
            histogram[bisect_left(self._connect_bounds, connect_time_s)] += 1
            histogram[-1] += connect_time_s
        histogram = self._duration.get(key)
        if histogram is None:
            histogram = self._duration[key] = _empty_histogram(self._duration_bounds)
        histogram[bisect_left(self._duration_bounds, duration_s)] += 1
        histogram[-1] += duration_s

    def upstream_health(self, proxy: str, upstream: str, up: bool) -> None:
        """The health of ``upstream`` changed (or is known for the first time)."""
        self._up[(proxy, upstream)] = 1 if up else 0

    def route_upstream_health(self, proxy: str, route: str, upstream: str, up: bool) -> None:
        """The health of ``upstream`` of SNI route ``route`` changed (or is known)."""
        self._route_up[(proxy, route, upstream)] = 1 if up else 0

    # -- setup ----------------------------------------------------------------

    def declare_proxy(self, proxy: str, upstreams: Iterable[str] = ()) -> None:
        """Create ``proxy``'s series at zero (every close reason, both directions,
        each upstream's failures), so that ``rate()`` and alerts see them before
        the first event.  Idempotent; counts already made are kept."""
        key = (proxy,)
        for series in (self._opened, self._active):
            series.setdefault(key, 0)
        for direction in _DIRECTIONS:
            self._bytes.setdefault((proxy, direction), 0)
        for reason in CloseReason:
            self._closes.setdefault((proxy, reason.value), 0)
        for upstream in upstreams:
            self._failures.setdefault((proxy, upstream), 0)
        for name, bounds in (("midway_connect_seconds", self._connect_bounds),
                             ("midway_connection_seconds", self._duration_bounds)):
            self._histograms[name].setdefault(key, _empty_histogram(bounds))

    def forget(self, keep: Keep) -> None:
        """Drop the series of every proxy not in ``keep`` (removed, and drained),
        and of every upstream no longer among its proxy's (``keep[proxy]``): a
        removed proxy disappears from ``/metrics``, and a stale
        ``midway_upstream_up`` cannot keep an alert firing.  A proxy that comes
        back starts again from zero."""
        for spec in METRICS:
            series: dict[Labels, Any] = (self._histograms if spec.kind is Kind.HISTOGRAM
                                         else self._values)[spec.name]
            for labels in [labels for labels in series if not _kept(spec, labels, keep)]:
                del series[labels]

    def add_collector(self, collector: Collector) -> None:
        """Run ``collector`` at every snapshot; its samples are *added* to what
        the events counted (histograms cannot be collected).  A collector that
        raises is logged and contributes nothing to that snapshot."""
        self._collectors.append(collector)

    def remove_collector(self, collector: Collector) -> None:
        self._collectors.remove(collector)

    # -- output ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """This worker's values now, collectors included, as a JSON-able dict."""
        values = {name: dict(series) for name, series in self._values.items()}
        for collector in self._collectors:
            try:
                samples = [_checked_sample(sample) for sample in collector()]
            except Exception:
                log.exception("metrics: collector %r failed; its samples are left out",
                              collector)
                continue
            for name, labels, value in samples:
                series = values[name]
                series[labels] = series.get(labels, 0) + value
        metrics: dict[str, list[list[Any]]] = {}
        for spec in METRICS:
            if spec.kind is Kind.HISTOGRAM:
                metrics[spec.name] = [
                    [list(labels), {"counts": [int(c) for c in h[:-1]], "sum": h[-1]}]
                    for labels, h in sorted(self._histograms[spec.name].items())]
            else:
                metrics[spec.name] = [[list(labels), value]
                                      for labels, value in sorted(values[spec.name].items())]
        return {"format": SNAPSHOT_FORMAT, "metrics": metrics}

    def render(self) -> str:
        """This worker's metrics in Prometheus's text format."""
        return render(self.snapshot())


def _empty_histogram(bounds: Sequence[float]) -> list[float]:
    return [0] * (len(bounds) + 1) + [0.0]


def _checked_sample(sample: Sample) -> Sample:
    name, labels, value = sample
    spec = BY_NAME.get(name)
    if spec is None or spec.kind is Kind.HISTOGRAM:
        raise ValueError(f"a collector cannot report {name!r} (not a declared "
                         "counter or gauge)")
    if len(labels) != len(spec.labels):
        raise ValueError(f"{name}: {len(labels)} label values for labels {spec.labels}")
    return name, tuple(labels), value


# -- summing workers --------------------------------------------------------------


def merge_snapshots(snapshots: Sequence[Snapshot]) -> Snapshot:
    """Combine the snapshots of several workers into one, as each metric's
    :class:`~.table.Merge` says: counters, histograms and ``connections_active``
    add; ``upstream_up`` takes the minimum over the workers that report the
    series.  Pure; raises :class:`ValueError` naming the snapshot (by its index)
    that does not have the expected shape."""
    merged: dict[str, dict[Labels, Any]] = {spec.name: {} for spec in METRICS}
    for index, snapshot in enumerate(snapshots):
        if not isinstance(snapshot, dict) or snapshot.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"snapshot {index}: not a metrics snapshot of format "
                             f"{SNAPSHOT_FORMAT}")
        for name, series_list in snapshot.get("metrics", {}).items():
            spec = BY_NAME.get(name)
            if spec is None:
                raise ValueError(f"snapshot {index}: unknown metric {name!r}")
            into = merged[name]
            for labels_list, value in series_list:
                labels = tuple(labels_list)
                if len(labels) != len(spec.labels):
                    raise ValueError(f"snapshot {index}: {name} series {labels_list!r} "
                                     f"does not have the labels {spec.labels}")
                into[labels] = _combine(spec, into.get(labels), value, index)
    return {
        "format": SNAPSHOT_FORMAT,
        "metrics": {name: [[list(labels), value] for labels, value in sorted(series.items())]
                    for name, series in merged.items()},
    }


def retain(snapshot: Snapshot, keep: Keep) -> Snapshot:
    """``snapshot`` without the series :meth:`Metrics.forget` would drop."""
    return {**snapshot, "metrics": {
        name: [[labels, value] for labels, value in series
               if _kept(BY_NAME[name], tuple(labels), keep)]
        for name, series in snapshot.get("metrics", {}).items()}}


def cumulative(snapshot: Snapshot) -> Snapshot:
    """Only the counters and histograms of ``snapshot``: what a worker that
    ended still contributes to the sums (its gauges ended with it)."""
    return {**snapshot, "metrics": {
        name: series for name, series in snapshot.get("metrics", {}).items()
        if BY_NAME[name].kind is not Kind.GAUGE}}


_IDENTITY = ("route", "upstream")
"""The labels that name an upstream series within its proxy."""


def identity(spec: MetricSpec, labels: Sequence[str]) -> tuple[str, ...]:
    """Which upstream a series of ``spec`` is about, within its proxy: the values
    of its ``route`` and ``upstream`` labels, in that order (``()`` for a series
    about the whole proxy)."""
    return tuple(labels[i] for i, name in enumerate(spec.labels) if name in _IDENTITY)


def _kept(spec: MetricSpec, labels: Sequence[str], keep: Keep) -> bool:
    kept = keep.get(labels[0])  # every metric's first label is the proxy
    if kept is None:
        return False
    key = identity(spec, labels)
    return not key or key in kept


def _combine(spec: MetricSpec, current: Any, value: Any, index: int) -> Any:
    if spec.kind is Kind.HISTOGRAM:
        counts, total = value["counts"], value["sum"]
        if len(counts) != len(spec.buckets) + 1:
            raise ValueError(f"snapshot {index}: {spec.name} has {len(counts)} buckets, "
                             f"expected {len(spec.buckets) + 1}")
        if current is None:
            return {"counts": list(counts), "sum": total}
        return {"counts": [a + b for a, b in zip(current["counts"], counts, strict=True)],
                "sum": current["sum"] + total}
    if current is None:
        return value
    if spec.merge is Merge.MIN:
        return min(current, value)
    return current + value
