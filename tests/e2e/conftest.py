"""Every end-to-end test runs on both data paths (zero-copy splice and the
copying path) and both event loops (asyncio and uvloop)."""

from __future__ import annotations

import importlib.util

import pytest

from midway.core import splice

from .. import helpers

MODES = [
    helpers.Mode("splice", "asyncio"),
    helpers.Mode("copy", "asyncio"),
    helpers.Mode("splice", "uvloop"),
    helpers.Mode("copy", "uvloop"),
]


@pytest.fixture(autouse=True, params=MODES, ids=[f"{m.path}-{m.loop}" for m in MODES])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> helpers.Mode:
    chosen: helpers.Mode = request.param
    if chosen.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed (pip install 'midway[fast]')")
    if chosen.path == "splice" and not splice.AVAILABLE:
        pytest.skip("splice(2) is not available on this platform")
    if chosen.path == "copy":
        monkeypatch.setattr(splice, "AVAILABLE", False)
    monkeypatch.setattr(helpers, "MODE", chosen)
    return chosen
