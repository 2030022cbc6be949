"""The test suite's own promises: a skip always names what is missing, in one
form, and by-design reductions of the e2e modes are not reported as skips."""

from __future__ import annotations

import re
from pathlib import Path

from .e2e.conftest import MODES, modes_for
from .helpers import needs

TESTS = Path(__file__).resolve().parent


def test_every_skip_reason_says_what_is_needed_in_one_form() -> None:
    literal = re.compile(r"""(?:pytest\.skip\(|(?:skipif|importorskip)\([^)]*?reason=)\s*f?["']""")
    for path in TESTS.rglob("*.py"):
        text = path.read_text()
        for match in literal.finditer(text):
            rest = text[match.end():match.end() + 80]
            assert rest.startswith("needs "), f"{path.name}: skip reason {rest!r}"


def test_the_one_form() -> None:
    assert needs("tshark", apt="tshark") == "needs tshark (install: apt-get install tshark)"
    assert needs("uvloop", pip="midway[fast]") == "needs uvloop (install: pip install 'midway[fast]')"
    assert needs("IPv6 on this host") == "needs IPv6 on this host"


def test_reduced_modes_are_not_generated() -> None:
    assert [f"{m.path}-{m.loop}" for m in modes_for({"one_mode"})] == ["splice-asyncio"]
    assert [f"{m.path}-{m.loop}" for m in modes_for({"per_loop"})] == ["splice-asyncio",
                                                                       "splice-uvloop"]
    assert modes_for(set()) == MODES
