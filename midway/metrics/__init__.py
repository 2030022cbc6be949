"""Prometheus metrics: declared in one table, counted per worker by an observer,
summed across workers, written in the text exposition format.

Usage (what the runtime and the supervisor do)::

    metrics = Metrics()                        # one per worker, an observer
    runtime = Runtime(config, observers=[metrics])
    metrics.add_collector(live_bytes)          # bytes of connections still open
    snapshot = metrics.snapshot()              # JSON-able; sent to the supervisor
    body = render(merge_snapshots([snapshot, ...]))   # GET /metrics

Modules: :mod:`.table` (the declarations), :mod:`.registry` (the observer, its
snapshot, the merge), :mod:`.exposition` (the text format), :mod:`.reference`
(``docs/metrics.md``).
"""

from .exposition import CONTENT_TYPE, render
from .registry import (
    Collector,
    Keep,
    Metrics,
    Sample,
    Snapshot,
    cumulative,
    identity,
    merge_snapshots,
    retain,
)
from .table import METRICS, Kind, Merge, MetricSpec

__all__ = ["Metrics", "Collector", "Sample", "Snapshot", "merge_snapshots", "render",
           "retain", "cumulative", "identity", "Keep",
           "CONTENT_TYPE", "METRICS", "MetricSpec", "Kind", "Merge"]
