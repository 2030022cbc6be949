"""The text exposition, read back by prometheus_client's own parser: every declared
metric with its type and labels, escaping that round-trips, cumulative buckets."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from midway.metrics import CONTENT_TYPE, METRICS, Kind, Metrics, exposition, render
from midway.metrics.table import CONNECT_BUCKETS_S

from .fakes import opened
from .support import closed, parse, value

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def busy() -> Metrics:
    """A registry with at least one series of every metric."""
    metrics = Metrics()
    metrics.connection_opened(opened("web"))
    metrics.connection_opened(opened("web"))
    metrics.connect_failed("web", "10.0.0.9:80", "refused")
    metrics.upstream_health("web", "10.0.0.1:80", True)
    metrics.route_upstream_health("web", "api", "10.0.0.2:443", False)
    metrics.connection_closed(closed(bytes_up=3, bytes_down=4))
    return metrics


def test_the_table_follows_prometheus_naming() -> None:
    for spec in METRICS:
        assert NAME.match(spec.name) and spec.name.startswith("midway_")
        assert spec.name.endswith("_total") == (spec.kind is Kind.COUNTER), spec.name
        assert spec.help and spec.labels
        for label in spec.labels:
            assert LABEL.match(label) and not label.startswith("__") and label != "le"
        if spec.kind is Kind.HISTOGRAM:
            assert spec.name.endswith("_seconds") and spec.provenance
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets[0] > 0
        else:
            assert not spec.buckets


def test_every_declared_metric_parses_with_its_type_and_labels() -> None:
    text = busy().render()
    families = parse(text)
    assert list(families) == [spec.name for spec in METRICS]
    for spec in METRICS:
        family = families[spec.name]
        assert family.type == spec.kind.value
        assert family.documentation == spec.help
        assert family.samples, spec.name
        for sample in family.samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == set(spec.labels) | extra, sample


def test_an_empty_registry_still_declares_every_metric() -> None:
    families = parse(Metrics().render())
    assert {name: f.type for name, f in families.items()} == \
        {spec.name: spec.kind.value for spec in METRICS}


def test_the_text_is_format_0_0_4() -> None:
    text = busy().render()
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.splitlines()
    for spec in METRICS:
        help_at = lines.index(f"# HELP {spec.name} {spec.help}")
        assert lines[help_at + 1] == f"# TYPE {spec.name} {spec.kind.value}"
    assert 'midway_bytes_total{proxy="web",direction="upstream"} 3' in lines
    assert 'midway_connect_seconds_bucket{proxy="web",le="+Inf"} 1' in lines
    assert 'midway_connect_seconds_bucket{proxy="web",le="1"} 1' in lines


AWKWARD = ["back\\slash", 'a "quoted" name', "two\nlines", '\\"\n', "ünïcødé ✓", "", "{}=,"]


def test_awkward_label_values_round_trip() -> None:
    metrics = Metrics()
    for upstream in AWKWARD:
        metrics.connect_failed("web", upstream, "")
    families = parse(metrics.render())
    got = {s.labels["upstream"] for s in families["midway_connect_failures_total"].samples}
    assert got == set(AWKWARD)


# The three escaped characters are drawn often, as well as any other character.
LABEL_TEXT = st.text(st.one_of(st.sampled_from('\\"\n{}=,'),
                               st.characters(exclude_categories=("Cs",))), max_size=40)


@given(LABEL_TEXT)
def test_any_label_value_round_trips(label: str) -> None:
    metrics = Metrics()
    metrics.connect_failed("web", label, "")
    assert value(metrics.render(), "midway_connect_failures_total",
                 proxy="web", upstream=label) == 1


def test_help_text_is_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = replace(METRICS[0], help="one\\two\nthree")
    monkeypatch.setattr(exposition, "METRICS", (spec,))
    text = render({"format": 1, "metrics": {}})
    assert text.splitlines()[0] == f"# HELP {spec.name} one\\\\two\\nthree"
    assert parse(text)[spec.name].documentation == "one\\two\nthree"


@given(st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), max_size=60))
def test_buckets_are_cumulative_and_count_every_observation(times: list[float]) -> None:
    metrics = Metrics()
    for t in times:
        metrics.connection_closed(closed(connect_time_s=t))
    family = parse(metrics.render())["midway_connect_seconds"]
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples
               if s.name.endswith("_bucket")]
    count = [s.value for s in family.samples if s.name.endswith("_count")]
    total = [s.value for s in family.samples if s.name.endswith("_sum")]
    if not times:
        assert family.samples == []
        return
    assert [b for b, _ in buckets] == [*CONNECT_BUCKETS_S, math.inf]
    for bound, cumulative in buckets:
        assert cumulative == sum(1 for t in times if t <= bound), bound
    assert count == [len(times)] and buckets[-1][1] == len(times)
    assert math.isclose(total[0], sum(times), abs_tol=1e-9)


def test_a_value_on_a_bound_falls_in_that_bucket() -> None:
    # Prometheus's le is "less than or equal".
    metrics = Metrics()
    metrics.connection_closed(closed(connect_time_s=0.001))
    text = metrics.render()
    assert value(text, "midway_connect_seconds_bucket", proxy="web", le="0.0005") == 0
    assert value(text, "midway_connect_seconds_bucket", proxy="web", le="0.001") == 1
