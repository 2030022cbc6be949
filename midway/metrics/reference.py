"""The metrics reference, ``docs/metrics.md``, generated from :data:`~.table.METRICS`.

The prose (what the byte counters mean, how workers are summed, a scrape
configuration) is written here by hand; every metric's row, buckets and the list
of close reasons come from the table and :class:`~midway.core.observer.CloseReason`,
so the reference cannot promise a metric the exposition does not write.

Regenerate the file with::

    python -m midway.metrics.reference > docs/metrics.md

``tests/metrics/test_reference.py`` fails when the file and the table disagree.
"""

from __future__ import annotations

import sys

from ..core.observer import CloseReason
from .exposition import CONTENT_TYPE
from .table import METRICS, Kind, MetricSpec

__all__ = ["render_reference", "REGENERATE", "SCRAPE_CONFIG"]

REGENERATE = "python -m midway.metrics.reference > docs/metrics.md"

SCRAPE_CONFIG = """\
scrape_configs:
  - job_name: midway
    metrics_path: /metrics
    scrape_interval: 15s
    static_configs:
      - targets: ["127.0.0.1:8474"]       # midway --admin 127.0.0.1:8474
"""
"""A Prometheus ``prometheus.yml`` fragment; the tests check it is valid YAML-ish
text naming the admin API's default address."""

_INTRO = f"""\
# Metrics

midway counts its connections for Prometheus.  `GET /metrics` on the admin API
(`midway --admin 127.0.0.1:8474`, or `[server] admin`) answers in Prometheus's
text format, version 0.0.4 (`Content-Type: {CONTENT_TYPE}`).  Every metric
is declared once, in `midway/metrics/table.py`; this page, the output and the
tests come from that table.

> Status: served on `GET /metrics` and summed over the workers.

## How counting works

Metrics are an observer of connection events, like the access log: a connection
is counted when it is accepted, each failed attempt to reach an upstream when it
fails, and everything else (close reason, bytes, durations) when it closes, from
the same record the access log writes.  The relay never calls into metrics, so
counting costs nothing per byte and a few dictionary updates per connection.
Counters therefore agree exactly with the access log: after a known load,
`midway_closes_total` summed over reasons is the number of access-log lines, and
`midway_bytes_total` is the sum of their `bytes_up` and `bytes_down`, plus the
bytes of connections still open (added at each scrape).

## What the byte counters mean

`midway_bytes_total` counts bytes **delivered**: written to the receiving side's
socket, as the access log's `bytes_up` and `bytes_down` do (README, "Logs", defines
them): accepted by the kernel there, less what a reset then discarded unsent.

- `direction="upstream"`: from the client to the server (Toxiproxy's name for this
  stream); `bytes_up` in the access log.
- `direction="downstream"`: from the server to the client; `bytes_down`.

Bytes that midway read but did not deliver (dropped by a toxic such as
`limit_data` or by a hook, or still buffered when a connection was cut) are not
in this counter; the access log has them in `bytes_up_read` and
`bytes_down_read`.  Bytes an element injected are counted where they were
delivered (a hook's reply to the client counts downstream).  A connection still open
contributes what its kernel has sent so far, so a long download shows up while it
runs, and the counter never goes back when that connection closes.

## Workers

With `workers = N`, each worker process counts its own connections and the
supervisor adds them up before answering `/metrics`: counters and histograms
are summed, and so is `midway_connections_active`.  `midway_upstream_up` (and
`midway_route_upstream_up`) is different: each worker judges an upstream's health on its own (its own checks,
its own passive ejections), so the workers may briefly disagree.  `/metrics`
shows the **lowest** value over the workers that know the upstream: `1` means
every worker sends it traffic, `0` means at least one does not.  This keeps the
metric 0 or 1, so an alert on `midway_upstream_up == 0` fires as soon as any
share of the traffic avoids an upstream.

## SNI routes

The upstreams of `[[proxy.NAME.routes]]` (docs/tls.md) each have their own
health, per route: it is in `midway_route_upstream_up`, labelled `proxy`,
`route` (the route's `name`) and `upstream`, not in `midway_upstream_up`, whose
series (the proxy's own upstreams) are the same with routes or without.  An
address in two routes has a series in each.  Their failed connects are in
`midway_connect_failures_total` by address, as the proxy's own are.  An alert on
any upstream down: `midway_upstream_up == 0 or midway_route_upstream_up == 0`.

Counters start at zero when midway starts and never go back while it runs.  A
worker that dies is restarted from zero, but the supervisor keeps what it had
counted at the last scrape and goes on adding it, so the sums do not drop (a
drop would look like a reset to `rate()` and `increase()`, which would then
count the whole total again); what the dead worker counted after the last
scrape is lost.  The connections a dead worker had open die with it (their
clients see the end the kernel gives them, usually a FIN even mid-transfer:
docs/guarantees.md, "A killed process") and are never counted as closed: they stay in
`midway_connections_total` but in no `midway_closes_total` or
`midway_connection_seconds`, and leave `midway_connections_active` at once, so
from then on accepted minus closed exceeds `midway_connections_active` by their
number (as last scraped).  Restarting midway itself starts every counter at zero again,
which Prometheus treats as a counter reset.

A proxy removed (by a reload or `DELETE /proxies/NAME`) disappears from
`/metrics` once its last connection has closed, and so does an upstream removed
from a proxy or from one of its routes: their series end (Prometheus marks them stale) rather than stay
frozen, so `midway_upstream_up == 0` does not keep firing for an upstream that
is gone.  A proxy added again under the same name may start again from zero.

`/metrics` answers in the text format 0.0.4 whatever the `Accept` header asks
(Prometheus asks for OpenMetrics first and takes this); `promtool check metrics`
finds nothing to report in it.

## Scraping

```yaml
{SCRAPE_CONFIG.rstrip()}
```

Some queries:

- throughput per proxy and direction: `rate(midway_bytes_total[1m])`
- new connections per second: `rate(midway_connections_total[1m])`
- resets as a share of closes: `sum by (proxy) (rate(midway_closes_total{{reason="reset"}}[5m])) / sum by (proxy) (rate(midway_closes_total[5m]))`
- 99th percentile connect time: `histogram_quantile(0.99, rate(midway_connect_seconds_bucket[5m]))`
- a failing upstream: `rate(midway_connect_failures_total[5m]) > 0`
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _labels(spec: MetricSpec) -> str:
    return ", ".join(f"`{label}`" for label in spec.labels) or "—"


def _bounds(spec: MetricSpec) -> str:
    return ", ".join(f"{bound:g}" for bound in spec.buckets) + ", +Inf"


def render_reference() -> str:
    """The whole of ``docs/metrics.md`` as a string (ends with one newline)."""
    lines = [
        "<!-- Generated from midway/metrics/table.py by midway/metrics/reference.py: do not",
        f"     edit by hand.  Regenerate with: {REGENERATE} -->",
        "",
        *_INTRO.splitlines(),
        "",
        "## Reference",
        "",
        "| Metric | Type | Labels | Across workers | Meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in METRICS:
        meaning = " ".join(part for part in (spec.help, spec.notes) if part)
        cells = [f"`{spec.name}`", spec.kind.value, _labels(spec), spec.merge.value, meaning]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += ["", "### Histogram buckets", ""]
    for spec in METRICS:
        if spec.kind is Kind.HISTOGRAM:
            lines += [
                f"`{spec.name}`, upper bounds in seconds: {_bounds(spec)}.",
                f"*Why:* {spec.provenance}",
                "",
            ]
    lines += [
        "### Close reasons",
        "",
        "The values of `reason` in `midway_closes_total`, as in the access log:",
        ", ".join(f"`{reason.value}`" for reason in CloseReason) + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_reference())
