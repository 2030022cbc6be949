"""Chain elements run here under a fake clock: what they do must not depend on how
fast this machine is.  So elements never yield for real time spent
(:func:`midway.core.cooperate.cooperate`) unless a test asks with the
``real_slices`` fixture."""

from __future__ import annotations

import math

import pytest

from midway.core import cooperate


@pytest.fixture(autouse=True)
def _no_real_time_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cooperate, "SLICE_S", math.inf)


@pytest.fixture
def real_slices(monkeypatch: pytest.MonkeyPatch) -> float:
    """Elements yield as in production; returns the slice length in seconds."""
    monkeypatch.setattr(cooperate, "SLICE_S", 0.001)
    return 0.001
