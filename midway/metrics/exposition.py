"""Prometheus's text exposition format, version 0.0.4, from a metrics snapshot.

The format (prometheus.io/docs/instrumenting/exposition_formats/): per metric a
``# HELP`` line (backslash and newline escaped) and a ``# TYPE`` line, then one
line per series, ``name{label="value",...} number``, label values escaped for
backslash, double quote and newline.  A histogram ``x`` writes, per series,
``x_bucket{...,le="B"}`` for each upper bound B in increasing order with the
*cumulative* count of observations <= B, a last ``le="+Inf"`` bucket equal to the
count, then ``x_sum`` and ``x_count``.  Counter names end in ``_total``.  Lines
end with ``\\n``, the body too.
"""

from __future__ import annotations

import math
from typing import Any

from .table import METRICS, Kind, MetricSpec, Snapshot

__all__ = ["render", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` of a ``GET /metrics`` answer in this format."""


def render(snapshot: Snapshot) -> str:
    """The text exposition of ``snapshot`` (one worker's or a merged one).  Every
    declared metric gets its HELP and TYPE lines, with or without series."""
    metrics: dict[str, list[list[Any]]] = snapshot["metrics"]
    lines: list[str] = []
    for spec in METRICS:
        lines.append(f"# HELP {spec.name} {_escape_help(spec.help)}")
        lines.append(f"# TYPE {spec.name} {spec.kind.value}")
        for labels, value in metrics.get(spec.name, ()):
            pairs = list(zip(spec.labels, labels, strict=True))
            if spec.kind is Kind.HISTOGRAM:
                lines.extend(_histogram_lines(spec, pairs, value))
            else:
                lines.append(f"{spec.name}{_label_set(pairs)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _histogram_lines(spec: MetricSpec, pairs: list[tuple[str, str]],
                     value: dict[str, Any]) -> list[str]:
    counts: list[int] = value["counts"]
    lines = []
    cumulative = 0
    for bound, count in zip((*spec.buckets, math.inf), counts, strict=True):
        cumulative += count
        lines.append(f"{spec.name}_bucket{_label_set([*pairs, ('le', _bound(bound))])} "
                     f"{cumulative}")
    lines.append(f"{spec.name}_sum{_label_set(pairs)} {_number(value['sum'])}")
    lines.append(f"{spec.name}_count{_label_set(pairs)} {cumulative}")
    return lines


def _label_set(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in pairs) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _bound(bound: float) -> str:
    """A bucket bound as Go's client writes it (``0.005``, ``1``, ``+Inf``)."""
    if math.isinf(bound):
        return "+Inf"
    return str(int(bound)) if bound.is_integer() else repr(bound)


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
