"""What ``pip install`` builds from a checkout: the sdist holds what the build
needs and no piece of the test suite, and it builds a wheel without a C compiler,
which runs in pure Python and says so (README, Install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from . import helpers

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = "setuptools>=77"  # pyproject.toml's [build-system] requires
JUNK = shutil.ignore_patterns(".git", "build", "dist", "__pycache__", "*.egg-info", "*.so",
                              ".*_cache")


@pytest.fixture(scope="module", autouse=True)
def _new_enough_setuptools() -> None:
    import setuptools
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(helpers.needs(SETUPTOOLS, pip=SETUPTOOLS))


def _build(kind: str, tree: Path, out: Path, **env: str) -> Path:
    """Build ``kind`` (sdist or wheel) of ``tree`` into ``out``, as pip does."""
    out.mkdir()
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("checkout")
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, tree)
    for name in ("midway", "tests"):
        shutil.copytree(REPO / name, tree / name, ignore=JUNK)
    return _build("sdist", tree, tree / "dist")


def test_the_sdist_holds_what_the_build_needs_and_no_part_of_the_test_suite(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {name.partition("/")[2] for name in tar.getnames()}
    needed = {"pyproject.toml", "setup.py", "README.md", "LICENSE", "midway/core/_accel.c",
              "midway/admin/ui/index.html", "midway/py.typed", "midway/cli.py"}
    assert needed <= names
    # The suite runs from a checkout; a few of its files alone (no helpers) is junk.
    assert not [name for name in names if name.startswith("tests")]


def test_the_sdist_builds_without_a_compiler_and_runs_in_pure_python(
        sdist: Path, tmp_path: Path) -> None:
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    wheel = _build("wheel", tmp_path / sdist.name.removesuffix(".tar.gz"), tmp_path / "dist",
                   CC="/bin/false")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        whl.extractall(tmp_path / "site")
    assert "midway/admin/ui/app.js" in names
    assert [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]  # MIT's terms
    assert not [name for name in names if name.endswith((".so", ".c"))]
    env = {k: v for k, v in os.environ.items() if k != "MIDWAY_PURE_PYTHON"}
    version = subprocess.run([sys.executable, "-m", "midway", "--version"], cwd=tmp_path,
                             env=dict(env, PYTHONPATH=str(tmp_path / "site")),
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip().endswith("(pure Python: the relay is not compiled)")
