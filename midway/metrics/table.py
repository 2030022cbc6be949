"""Every metric midway exports, declared once.

The exposition (:mod:`.exposition`), the per-worker registry (:mod:`.registry`),
the merge across workers and the reference in ``docs/metrics.md``
(:mod:`.reference`) all read :data:`METRICS`; a metric that is not in this table
cannot be counted, exported or documented.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["Kind", "Merge", "MetricSpec", "METRICS", "BY_NAME", "CONNECT_BUCKETS_S",
           "CONNECTION_BUCKETS_S", "Snapshot"]

Snapshot = dict[str, Any]
"""The values of this table's metrics as a JSON-able dict (its shape: :mod:`.registry`).
Declared here rather than in the registry so that the exposition names it without
importing the registry, which imports the exposition."""


class Kind(enum.StrEnum):
    """The Prometheus metric type (the ``# TYPE`` line)."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Merge(enum.StrEnum):
    """How the supervisor combines the workers' values of one series."""

    SUM = "sum"
    """Add: each worker counts its own connections (counters, histograms, active)."""
    MIN = "min"
    """The lowest value any worker reports: for ``upstream_up`` (and
    ``route_upstream_up``), 1 only if every worker that knows the upstream
    considers it up."""


CONNECT_BUCKETS_S: tuple[float, ...] = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Upper bounds (seconds) of ``midway_connect_seconds``."""
CONNECT_BUCKETS_PROVENANCE = (
    "The Prometheus clients' default buckets (5 ms to 10 s) in a 1-2.5-5 series, "
    "extended down to 25 µs: a connect on loopback takes 50-300 µs (measured here: "
    "median 57 µs, 99th percentile 220 µs over 200 connects) and one within a rack "
    "well under 1 ms, where the defaults would put every observation in the first "
    "bucket.  5 s is `connect_timeout_s`'s default; 10 s leaves room for a connect "
    "that went on to a second upstream after a timeout.")

CONNECTION_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
)
"""Upper bounds (seconds) of ``midway_connection_seconds``."""
CONNECTION_BUCKETS_PROVENANCE = (
    "Envoy's default histogram buckets (0.5 ms to 1 h, `HistogramStatisticsImpl::"
    "supportedBuckets`), which it uses for `downstream_cx_length_ms`, in seconds: "
    "TCP connections last from a request's milliseconds to a database session's hours.")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: what the ``# HELP`` and ``# TYPE`` lines say, its labels in
    output order, and for a histogram its bucket upper bounds (``+Inf`` is
    implied) with where they come from."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    merge: Merge = Merge.SUM
    buckets: tuple[float, ...] = ()
    provenance: str = ""
    """Why these buckets (histograms only)."""
    notes: str = ""
    """More for the reference docs: what exactly is counted, and when."""


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "midway_connections_total", Kind.COUNTER,
        "Client connections accepted.",
        ("proxy",),
        notes="Counted at accept, before an upstream is chosen; a connection refused by "
              "a limit before accept is not counted.",
    ),
    MetricSpec(
        "midway_connections_active", Kind.GAUGE,
        "Client connections open now (connecting or relaying).",
        ("proxy",),
        notes="Accepted minus closed: `midway_connections_total` minus the sum of "
              "`midway_closes_total` over reasons, less the connections of any worker "
              "that died with them open (see Workers).",
    ),
    MetricSpec(
        "midway_bytes_total", Kind.COUNTER,
        "Bytes delivered to the peer: direction upstream = client to server, "
        "downstream = server to client.",
        ("proxy", "direction"),
        notes="Bytes written to the receiving side's socket, not bytes read: bytes a "
              "toxic or a hook dropped, or left undelivered at close (a reset discards "
              "what the kernel had not sent), are not counted; injected bytes are. These "
              "are the access log's `bytes_up` and `bytes_down`; its `bytes_up_read` "
              "and `bytes_down_read` count what was read. Closed connections are added "
              "as they close, open ones at each scrape.",
    ),
    MetricSpec(
        "midway_closes_total", Kind.COUNTER,
        "Connections closed, by the access log's close reason.",
        ("proxy", "reason"),
        notes="One per accepted connection, including those that never reached an "
              "upstream (`connect_failed`, `rejected`, `shutdown`). The reasons are "
              "listed below.",
    ),
    MetricSpec(
        "midway_connect_failures_total", Kind.COUNTER,
        "Failed attempts to connect to an upstream (refused, timed out, name not found).",
        ("proxy", "upstream"),
        notes="One per failed attempt, so a connection that tried two upstreams before "
              "the third answered counts two. `upstream` is the address as configured.",
    ),
    MetricSpec(
        "midway_upstream_up", Kind.GAUGE,
        "1 if the upstream is considered up (health checks), 0 if not.",
        ("proxy", "upstream"),
        merge=Merge.MIN,
        notes="Each worker keeps its own view of health; across workers the lowest "
              "value is shown, so 0 means at least one worker sends it no traffic. "
              "A passive ejection that has run its `eject_s` shows as 1 at the next "
              "scrape, whether or not a client came since.",
    ),
    MetricSpec(
        "midway_route_upstream_up", Kind.GAUGE,
        "1 if the upstream of an SNI route is considered up (health checks), 0 if not.",
        ("proxy", "route", "upstream"),
        merge=Merge.MIN,
        notes="The upstreams of `[[proxy.NAME.routes]]`, each route with its own health "
              "state: `route` is the route's name. Kept apart from `midway_upstream_up` "
              "(the proxy's own upstreams, whose series stay as they are), so an address "
              "in two routes, or in a route and the proxy's own list, has one series for "
              "each. Across workers the lowest value, as `midway_upstream_up`.",
    ),
    MetricSpec(
        "midway_connect_seconds", Kind.HISTOGRAM,
        "Time from accept until an upstream accepted the connection, failed attempts included.",
        ("proxy",),
        buckets=CONNECT_BUCKETS_S,
        provenance=CONNECT_BUCKETS_PROVENANCE,
        notes="Observed once per connection that reached an upstream, when it closes.",
    ),
    MetricSpec(
        "midway_connection_seconds", Kind.HISTOGRAM,
        "Time from accept to close of a client connection.",
        ("proxy",),
        buckets=CONNECTION_BUCKETS_S,
        provenance=CONNECTION_BUCKETS_PROVENANCE,
        notes="Observed for every closed connection, so its `_count` equals the sum of "
              "`midway_closes_total` over reasons.",
    ),
)
"""The metrics, in output order."""

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}
