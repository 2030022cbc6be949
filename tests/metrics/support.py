"""Shared helpers for the metrics tests: close records and the parsed exposition."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from midway.core.observer import CloseRecord


def closed(proxy: str = "web", *, reason: str = "eof", bytes_up: int = 0,
           bytes_down: int = 0, bytes_up_read: int | None = None,
           bytes_down_read: int | None = None, connect_time_s: float | None = 0.001,
           duration_s: float = 1.0, upstream: str | None = "127.0.0.1:9000") -> CloseRecord:
    """A close record with only what metrics read set to something meaningful (bytes
    read default to the bytes delivered, as on a clean transfer)."""
    return CloseRecord(
        proxy=proxy, id=1, client="127.0.0.1:50000", listener="127.0.0.1:8080",
        upstream=upstream, connect_time_s=connect_time_s, bytes_up=bytes_up,
        bytes_down=bytes_down,
        bytes_up_read=bytes_up if bytes_up_read is None else bytes_up_read,
        bytes_down_read=bytes_down if bytes_down_read is None else bytes_down_read,
        duration_s=duration_s, first_close="client", reason=reason,
        detail="", path="copy", started_at=0.0,
    )


def parse(text: str) -> dict[str, Any]:
    """The families of a Prometheus text exposition, by the name in its TYPE line
    (the parser drops a counter's ``_total``; this puts it back)."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family
    return families


def value(text: str, sample_name: str, **labels: str) -> float:
    """The one sample called ``sample_name`` with exactly ``labels``."""
    found = [s.value for family in text_string_to_metric_families(text)
             for s in family.samples if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, f"{sample_name}{labels}: {len(found)} samples"
    return found[0]
