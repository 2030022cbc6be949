"""Whether the compiled relay is used: the environment's choice, and a build left
from another version of _accel.c (not used, with a warning naming the fix)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from midway.core import accel

from .. import helpers


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=30, check=True)


_ENGINE = ("__import__('midway.core.poller').core.poller.poller_for("
           "__import__('asyncio').new_event_loop()).engine is not None")
"""Whether a relay's poller has the compiled engine (what relays use)."""


def test_pure_python_is_chosen_by_the_environment() -> None:
    if not accel.AVAILABLE and not os.environ.get(accel.ENV_PURE):
        pytest.skip(helpers.needs_accel())
    code = "from midway.core import accel; print(accel.AVAILABLE, " + _ENGINE + ")"
    assert _run(code, **{accel.ENV_PURE: "1"}).stdout.split() == ["False", "False"]
    assert _run(code, **{accel.ENV_PURE: "0"}).stdout.split() == ["True", "True"]


@pytest.mark.parametrize("abi", ["stale.ABI = -1", "pass"])  # another, or none at all
def test_a_build_of_another_version_is_not_used(abi: str) -> None:
    code = f"""if True:
        import sys, types
        stale = types.ModuleType("midway.core._accel")
        {abi}
        stale.Core = stale.Engine = object
        sys.modules["midway.core._accel"] = stale
        from midway.core import accel
        print(accel.AVAILABLE, {_ENGINE})
    """
    done = _run(code, **{accel.ENV_PURE: "0"})
    assert done.stdout.split() == ["False", "False"]
    assert "built from another version of midway" in done.stderr
    assert "pip install -e ." in done.stderr
