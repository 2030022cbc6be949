"""Every end-to-end test runs on both data paths (zero-copy splice and the
copying path) and both event loops (asyncio and uvloop), unless it says that
fewer modes are enough:

- ``@pytest.mark.one_mode``: the outcome depends on neither the data path nor
  the loop (a toxic always takes the buffered path, a test of a midway child
  process's options): it runs once, in the splice-asyncio mode.
- ``@pytest.mark.per_loop``: its connections always take the chain, so splice or
  copy cannot matter: it runs once per event loop.

The modes a test does not need are not generated at all (rather than generated
and skipped), so a skip in the report always means something is missing: uvloop,
or splice(2) on this platform.
"""

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
_MARKERS = {
    "one_mode": "runs once, in the splice-asyncio mode (its outcome depends on no mode)",
    "per_loop": "runs once per event loop (its connections always take the chain path)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def modes_for(markers: set[str]) -> list[helpers.Mode]:
    """The modes a test with these marker names runs in."""
    if "one_mode" in markers:
        return MODES[:1]
    if "per_loop" in markers:
        return [m for m in MODES if m.path == "splice"]
    return MODES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mode" not in metafunc.fixturenames:
        return
    modes = modes_for({m.name for m in metafunc.definition.iter_markers()})
    metafunc.parametrize("mode", modes, ids=[f"{m.path}-{m.loop}" for m in modes],
                         indirect=True)


@pytest.fixture(autouse=True)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> helpers.Mode:
    chosen: helpers.Mode = request.param
    if chosen.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip(helpers.needs("uvloop", pip="midway[fast]"))
    if chosen.path == "splice" and not splice.AVAILABLE:
        pytest.skip("needs splice(2) (Linux)")
    if chosen.path == "copy":
        monkeypatch.setattr(splice, "AVAILABLE", False)
    monkeypatch.setattr(helpers, "MODE", chosen)
    return chosen
