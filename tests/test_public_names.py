"""``import midway`` as a library user meets it: the names are imported on first
use (PEP 562), yet the package looks and type-checks as if they were all there,
each check in a fresh interpreter (an earlier import in this one would hide a
lazy name that is never loaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_a_submodule_is_an_attribute_after_import_midway_as_before_the_names_were_lazy() -> None:
    done = _fresh("import midway\n"
                  "print(midway.chain.hooks.HookElement.__name__, midway.testing.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["HookElement", "midway.testing"]


def test_a_misspelt_name_is_still_an_attribute_error() -> None:
    done = _fresh("import midway\nmidway.Proxxy")
    assert "AttributeError: module 'midway' has no attribute 'Proxxy'" in done.stderr


def test_dir_lists_the_public_names_and_not_the_packages_own_imports() -> None:
    done = _fresh("import midway; print(' '.join(dir(midway)))")
    names = set(done.stdout.split())
    assert {"Proxy", "BackgroundProxy", "add_toxic"} & names == {"Proxy", "BackgroundProxy"}
    assert not {"Any", "TYPE_CHECKING", "importlib", "_importlib", "_public"} & names
    assert {"chain", "testing"} <= names  # imported by the public names


def test_help_works_without_pytest_though_the_plugin_module_needs_it() -> None:
    done = _fresh("import sys\nsys.modules['pytest'] = None\nimport midway, pydoc\n"
                  "print('Proxy' in pydoc.render_doc(midway))")
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "")


def test_the_plugin_module_without_pytest_is_no_attribute_yet_its_import_says_why() -> None:
    """hasattr() and getattr() with a default answer (they catch AttributeError
    alone: the ImportError used to escape them), and the import still fails
    naming what is missing."""
    done = _fresh("import sys\nsys.modules['pytest'] = None\nimport midway\n"
                  "print(hasattr(midway, 'pytest_plugin'), getattr(midway, 'pytest_plugin', 0))\n"
                  "try:\n    midway.pytest_plugin\nexcept AttributeError as exc:\n"
                  "    print(exc)\n"
                  "import midway.pytest_plugin")
    assert done.stdout.splitlines() == [
        "False 0", "module 'midway' has no attribute 'pytest_plugin' (midway.pytest_plugin "
        "needs pytest, which is not installed)"], done.stderr
    assert done.stderr.splitlines()[-1] == (
        "ModuleNotFoundError: import of pytest halted; None in sys.modules")


def test_mypy_flags_a_misspelt_name_and_types_the_real_ones(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text("import midway\n"
                    "proxy: midway.BackgroundProxy = midway.BackgroundProxy('127.0.0.1:0', ':1')\n"
                    "version: str = midway.__version__\n"
                    "names: list[str] = midway.__all__\n"
                    "midway.Proxxy\n")
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir",
                           str(tmp_path / "cache"), str(user)],
                          cwd=tmp_path, env={"MYPYPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.count("error:") == 1, done.stdout
    assert 'user.py:5: error: Module has no attribute "Proxxy"' in done.stdout


@pytest.mark.parametrize(("error", "attrs"), [
    (lambda m: m.ConfigError("proxy.r.listen", "bad address"), {"path": "proxy.r.listen"}),
    (lambda m: m.ToxicError("latency", "must be >= 0"), {"field": "latency"}),
    (lambda m: m.ToxicExists("slow"), {}),
    (lambda m: m.ToxicNotFound("slow"), {}),
    (lambda m: m.ConnectionNotFound(7, "web"), {}),
    (lambda m: m.StillConnecting(7), {}),
    (lambda m: m.Rejected("busy"), {}),
])
def test_the_errors_pickle_and_copy_whole(error: Any, attrs: dict[str, str]) -> None:
    """As multiprocessing, concurrent.futures and copy handle them (a worker's
    ConfigError reaching the parent process)."""
    import copy
    import pickle

    import midway

    raised = error(midway)
    for again in (pickle.loads(pickle.dumps(raised)), copy.copy(raised)):
        assert type(again) is type(raised) and str(again) == str(raised)
        assert again.args == raised.args
        for name, value in attrs.items():
            assert getattr(again, name) == value
