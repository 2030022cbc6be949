"""docs/metrics.md is generated from the metrics table: it must be up to date and
document every metric, bucket and close reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from midway.core.observer import CloseReason
from midway.metrics.reference import REGENERATE, SCRAPE_CONFIG, render_reference
from midway.metrics.table import METRICS, Kind, MetricSpec

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "metrics.md"


@pytest.fixture(scope="module")
def reference() -> str:
    return render_reference()


def test_docs_file_is_up_to_date(reference: str) -> None:
    assert DOC.read_text(encoding="utf-8") == reference, (
        f"docs/metrics.md is out of date with midway/metrics/; regenerate it: {REGENERATE}"
    )


def test_header_says_generated_and_how_to_regenerate(reference: str) -> None:
    head = reference.split("-->", 1)[0]
    assert head.startswith("<!--")
    assert "Generated" in head and "do not" in head
    assert REGENERATE in " ".join(head.split())


def test_module_prints_exactly_the_reference(reference: str) -> None:
    result = subprocess.run([sys.executable, "-m", "midway.metrics.reference"], cwd=REPO,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference


@pytest.mark.parametrize("spec", METRICS, ids=[spec.name for spec in METRICS])
def test_every_metric_has_a_row(reference: str, spec: MetricSpec) -> None:
    rows = [line for line in reference.splitlines() if line.startswith(f"| `{spec.name}` |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split(" | ")]
    assert cells[1] == spec.kind.value
    assert cells[2] == ", ".join(f"`{label}`" for label in spec.labels)
    assert cells[3] == spec.merge.value
    assert spec.help in cells[4] and spec.notes in cells[4]
    if spec.kind is Kind.HISTOGRAM:
        assert spec.provenance in reference
        assert ", ".join(f"{b:g}" for b in spec.buckets) + ", +Inf" in reference


def test_every_close_reason_is_listed(reference: str) -> None:
    reasons = reference.split("### Close reasons", 1)[1]
    for reason in CloseReason:
        assert f"`{reason.value}`" in reasons


def test_the_scrape_example_is_shown_and_names_the_metrics_path(reference: str) -> None:
    assert f"```yaml\n{SCRAPE_CONFIG}```" in reference
    assert "metrics_path: /metrics" in SCRAPE_CONFIG
    assert '"127.0.0.1:8474"' in SCRAPE_CONFIG
