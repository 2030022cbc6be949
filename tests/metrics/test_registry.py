"""The observer counts exactly what the events say; collectors add live values;
snapshots are JSON and merge across workers as the table says."""

from __future__ import annotations

import json
import logging

import pytest

from midway.core.observer import CloseReason
from midway.metrics import Metrics, cumulative, merge_snapshots, render, retain
from midway.metrics.registry import Sample
from midway.metrics.table import BY_NAME, METRICS, Kind

from .fakes import opened
from .support import closed, parse, value


def series(snapshot: dict, name: str) -> dict[tuple[str, ...], object]:
    return {tuple(labels): v for labels, v in snapshot["metrics"][name]}


def known_sequence(metrics: Metrics) -> None:
    """5 connections to web: 2 reset, 1 eof, 2 still open; 1 to db that failed to
    connect after trying two upstreams.  The first reset was cut short: it read
    more than it delivered, and only what it delivered is counted."""
    for _ in range(5):
        metrics.connection_opened(opened("web"))
    metrics.connection_closed(closed(reason="reset", bytes_up=1000, bytes_down=5000,
                                     bytes_up_read=1500, bytes_down_read=9000,
                                     connect_time_s=0.0002, duration_s=0.3))
    metrics.connection_closed(closed(reason="reset", bytes_up=200, bytes_down=600,
                                     connect_time_s=0.004, duration_s=2.0))
    metrics.connection_closed(closed(reason="eof", bytes_up=34, bytes_down=78,
                                     connect_time_s=0.0003, duration_s=45.0))
    metrics.connection_opened(opened("db"))
    metrics.connect_failed("db", "10.0.0.1:5432", "connection refused")
    metrics.connect_failed("db", "10.0.0.2:5432", "timed out after 5 s")
    metrics.connection_closed(closed("db", reason="connect_failed", connect_time_s=None,
                                     upstream=None, duration_s=5.01))


def test_a_known_sequence_gives_exact_totals() -> None:
    metrics = Metrics()
    known_sequence(metrics)
    text = metrics.render()
    assert value(text, "midway_connections_total", proxy="web") == 5
    assert value(text, "midway_connections_active", proxy="web") == 2
    assert value(text, "midway_closes_total", proxy="web", reason="reset") == 2
    assert value(text, "midway_closes_total", proxy="web", reason="eof") == 1
    assert value(text, "midway_bytes_total", proxy="web", direction="upstream") == 1234
    assert value(text, "midway_bytes_total", proxy="web", direction="downstream") == 5678
    assert value(text, "midway_connections_total", proxy="db") == 1
    assert value(text, "midway_connections_active", proxy="db") == 0
    assert value(text, "midway_closes_total", proxy="db", reason="connect_failed") == 1
    assert value(text, "midway_connect_failures_total", proxy="db",
                 upstream="10.0.0.1:5432") == 1
    assert value(text, "midway_connect_failures_total", proxy="db",
                 upstream="10.0.0.2:5432") == 1
    # Connect time only for connections that reached an upstream; duration for all.
    assert value(text, "midway_connect_seconds_count", proxy="web") == 3
    assert value(text, "midway_connect_seconds_sum", proxy="web") == pytest.approx(0.0045)
    assert "midway_connect_seconds_count{proxy=\"db\"}" not in text
    assert value(text, "midway_connection_seconds_count", proxy="db") == 1
    assert value(text, "midway_connection_seconds_sum", proxy="web") == pytest.approx(47.3)
    assert value(text, "midway_connection_seconds_bucket", proxy="web", le="0.5") == 1
    assert value(text, "midway_connection_seconds_bucket", proxy="web", le="30") == 2
    assert value(text, "midway_connection_seconds_bucket", proxy="web", le="60") == 3


def test_histogram_counts_agree_with_the_close_counters() -> None:
    # The reference promises: connection_seconds_count == sum of closes over reasons.
    metrics = Metrics()
    known_sequence(metrics)
    snap = metrics.snapshot()
    closes = series(snap, "midway_closes_total")
    for proxy in ("web", "db"):
        total = sum(v for (p, _), v in closes.items() if p == proxy)  # type: ignore[misc]
        assert value(render(snap), "midway_connection_seconds_count", proxy=proxy) == total


def test_upstream_health_is_a_gauge_set_by_events() -> None:
    metrics = Metrics()
    metrics.upstream_health("web", "10.0.0.1:80", True)
    metrics.upstream_health("web", "10.0.0.2:80", False)
    metrics.upstream_health("web", "10.0.0.1:80", False)
    metrics.upstream_health("web", "10.0.0.2:80", True)
    text = metrics.render()
    assert value(text, "midway_upstream_up", proxy="web", upstream="10.0.0.1:80") == 0
    assert value(text, "midway_upstream_up", proxy="web", upstream="10.0.0.2:80") == 1


def test_declare_proxy_creates_zero_series_and_keeps_counts() -> None:
    metrics = Metrics()
    metrics.connection_opened(opened("web"))
    metrics.declare_proxy("web", ["10.0.0.1:80"])
    metrics.declare_proxy("web", ["10.0.0.1:80"])
    text = metrics.render()
    assert value(text, "midway_connections_total", proxy="web") == 1
    for reason in CloseReason:
        assert value(text, "midway_closes_total", proxy="web", reason=reason.value) == 0
    for direction in ("upstream", "downstream"):
        assert value(text, "midway_bytes_total", proxy="web", direction=direction) == 0
    assert value(text, "midway_connect_failures_total", proxy="web",
                 upstream="10.0.0.1:80") == 0
    assert value(text, "midway_connection_seconds_bucket", proxy="web", le="+Inf") == 0


# -- collectors ----------------------------------------------------------------


def test_a_collector_adds_live_bytes_and_the_counter_never_goes_back() -> None:
    metrics = Metrics()
    live = {"up": 0, "down": 0}

    def live_bytes() -> list[Sample]:
        return [("midway_bytes_total", ("web", "upstream"), live["up"]),
                ("midway_bytes_total", ("web", "downstream"), live["down"])]

    metrics.add_collector(live_bytes)
    metrics.connection_opened(opened("web"))
    live.update(up=100, down=4000)
    first = metrics.render()
    assert value(first, "midway_bytes_total", proxy="web", direction="downstream") == 4000
    # The connection closes: its bytes leave the live set and arrive with the record.
    live.update(up=0, down=0)
    metrics.connection_closed(closed(bytes_up=150, bytes_down=9000))
    second = metrics.render()
    assert value(second, "midway_bytes_total", proxy="web", direction="upstream") == 150
    assert value(second, "midway_bytes_total", proxy="web", direction="downstream") == 9000
    metrics.remove_collector(live_bytes)
    assert value(metrics.render(), "midway_bytes_total", proxy="web",
                 direction="upstream") == 150


def test_a_failing_collector_is_logged_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    metrics.connection_opened(opened("web"))

    def half_then_boom() -> list[Sample]:
        raise RuntimeError("boom")

    def wrong_name() -> list[Sample]:
        return [("midway_connections_total", ("web",), 7), ("midway_nope", ("web",), 1)]

    metrics.add_collector(half_then_boom)
    metrics.add_collector(wrong_name)
    with caplog.at_level(logging.ERROR, logger="midway"):
        text = metrics.render()
    # Neither collector contributed, not even wrong_name's valid first sample.
    assert value(text, "midway_connections_total", proxy="web") == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "half_then_boom" in messages and "wrong_name" in messages
    assert "midway_nope" in caplog.text


def test_a_collector_cannot_report_a_histogram_or_wrong_labels() -> None:
    metrics = Metrics()
    metrics.add_collector(lambda: [("midway_connect_seconds", ("web",), 1)])
    metrics.add_collector(lambda: [("midway_bytes_total", ("web",), 1)])
    assert "midway_bytes_total{" not in metrics.render()


# -- snapshots and workers -----------------------------------------------------


def test_a_snapshot_is_plain_json() -> None:
    metrics = Metrics()
    known_sequence(metrics)
    snap = metrics.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert set(snap["metrics"]) == {spec.name for spec in METRICS}


def test_merging_two_workers_adds_counters_gauges_and_histograms() -> None:
    one, two = Metrics(), Metrics()
    known_sequence(one)
    known_sequence(two)
    two.connection_opened(opened("web"))
    two.connection_closed(closed(bytes_up=1, bytes_down=2, duration_s=7200.0))
    # Through JSON, as the snapshots travel from the workers to the supervisor.
    merged = merge_snapshots([json.loads(json.dumps(m.snapshot())) for m in (one, two)])
    text = render(merged)
    assert value(text, "midway_connections_total", proxy="web") == 11
    assert value(text, "midway_connections_active", proxy="web") == 4
    assert value(text, "midway_closes_total", proxy="web", reason="reset") == 4
    assert value(text, "midway_closes_total", proxy="web", reason="eof") == 3
    assert value(text, "midway_bytes_total", proxy="web", direction="upstream") == 2469
    assert value(text, "midway_bytes_total", proxy="web", direction="downstream") == 11358
    assert value(text, "midway_connect_failures_total", proxy="db",
                 upstream="10.0.0.2:5432") == 2
    assert value(text, "midway_connection_seconds_count", proxy="web") == 7
    assert value(text, "midway_connection_seconds_bucket", proxy="web", le="3600") == 6
    assert value(text, "midway_connection_seconds_bucket", proxy="web", le="+Inf") == 7
    assert value(text, "midway_connection_seconds_sum", proxy="web") == \
        pytest.approx(2 * 47.3 + 7200)


def test_merging_takes_the_lowest_upstream_health() -> None:
    one, two = Metrics(), Metrics()
    one.upstream_health("web", "a:80", True)
    two.upstream_health("web", "a:80", False)
    one.upstream_health("web", "b:80", True)
    two.upstream_health("web", "b:80", True)
    one.upstream_health("web", "c:80", True)  # the other worker does not know c yet
    text = render(merge_snapshots([one.snapshot(), two.snapshot()]))
    assert value(text, "midway_upstream_up", proxy="web", upstream="a:80") == 0
    assert value(text, "midway_upstream_up", proxy="web", upstream="b:80") == 1
    assert value(text, "midway_upstream_up", proxy="web", upstream="c:80") == 1


def test_a_route_upstream_has_its_own_gauge_merged_to_the_lowest() -> None:
    """An SNI route's upstreams are in midway_route_upstream_up{proxy,route,upstream};
    midway_upstream_up (the proxy's own upstreams) keeps its series as they were,
    even for an address that is in both."""
    one, two = Metrics(), Metrics()
    one.upstream_health("web", "a:80", True)
    one.route_upstream_health("web", "api", "a:80", False)
    two.route_upstream_health("web", "api", "a:80", True)
    one.route_upstream_health("web", "www", "b:80", True)
    text = render(merge_snapshots([one.snapshot(), two.snapshot()]))
    assert [s.labels for s in parse(text)["midway_upstream_up"].samples] == [
        {"proxy": "web", "upstream": "a:80"}]
    assert value(text, "midway_upstream_up", proxy="web", upstream="a:80") == 1
    assert value(text, "midway_route_upstream_up", proxy="web", route="api",
                 upstream="a:80") == 0
    assert value(text, "midway_route_upstream_up", proxy="web", route="www",
                 upstream="b:80") == 1


def test_forgetting_keeps_a_route_upstream_by_its_route_and_address() -> None:
    # b:80 moved from route api to route www: the api series ends, or its 0 would
    # keep an alert firing for an upstream that route no longer has.
    metrics = Metrics()
    metrics.declare_proxy("web", ["b:80"])
    metrics.route_upstream_health("web", "api", "b:80", False)
    metrics.route_upstream_health("web", "www", "b:80", True)
    keep = {"web": {("b:80",), ("www", "b:80")}}
    kept = retain(metrics.snapshot(), keep)
    metrics.forget(keep)
    assert metrics.snapshot() == kept
    assert series(kept, "midway_route_upstream_up") == {("web", "www", "b:80"): 1}
    assert series(kept, "midway_connect_failures_total") == {("web", "b:80"): 0}


def test_merging_one_snapshot_changes_nothing_and_none_gives_empty_metrics() -> None:
    metrics = Metrics()
    known_sequence(metrics)
    assert merge_snapshots([metrics.snapshot()]) == metrics.snapshot()
    assert render(merge_snapshots([])) == render(Metrics().snapshot())


@pytest.mark.parametrize(("broken", "message"), [
    ({"format": 99, "metrics": {}}, "snapshot 1: not a metrics snapshot"),
    ({"format": 1, "metrics": {"midway_nope": []}}, "unknown metric 'midway_nope'"),
    ({"format": 1, "metrics": {"midway_bytes_total": [[["web"], 1]]}}, "labels"),
    ({"format": 1, "metrics": {"midway_connect_seconds": [[["web"], {"counts": [1],
                                                                       "sum": 1.0}]]}},
     "has 1 buckets"),
])
def test_a_malformed_snapshot_is_named(broken: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_snapshots([Metrics().snapshot(), broken])


def test_every_declared_metric_is_counted_by_some_event() -> None:
    # Guard against a metric added to the table that nothing ever sets.
    metrics = Metrics()
    known_sequence(metrics)
    metrics.upstream_health("web", "a:80", True)
    metrics.route_upstream_health("web", "api", "b:80", True)
    snap = metrics.snapshot()
    for spec in METRICS:
        assert snap["metrics"][spec.name], f"{spec.name} has no series"
    assert BY_NAME["midway_upstream_up"].kind is Kind.GAUGE
    assert parse(render(snap)).keys() == {spec.name for spec in METRICS}


def test_forgetting_drops_removed_proxies_and_upstreams_and_retain_agrees() -> None:
    metrics = Metrics()
    metrics.declare_proxy("web", ["10.0.0.1:80", "10.0.0.2:80"])
    metrics.declare_proxy("old", ["10.0.0.3:80"])
    metrics.connect_failed("web", "10.0.0.2:80")
    metrics.upstream_health("web", "10.0.0.2:80", False)
    metrics.connection_opened(opened("web"))
    keep = {"web": {("10.0.0.1:80",)}}
    kept = retain(metrics.snapshot(), keep)
    metrics.forget(keep)
    assert metrics.snapshot() == kept
    text = metrics.render()
    assert 'proxy="old"' not in text and "10.0.0.2:80" not in text
    assert value(text, "midway_connections_total", proxy="web") == 1
    assert value(text, "midway_connect_failures_total", proxy="web",
                 upstream="10.0.0.1:80") == 0


def test_what_an_ended_worker_leaves_is_its_counters_and_histograms() -> None:
    metrics = Metrics()
    metrics.connection_opened(opened("web"))
    metrics.upstream_health("web", "10.0.0.1:80", True)
    left = cumulative(metrics.snapshot())
    assert set(left["metrics"]) == {s.name for s in METRICS if s.kind is not Kind.GAUGE}
    assert value(render(left), "midway_connections_total", proxy="web") == 1
