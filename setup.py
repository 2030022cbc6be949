"""Build of midway's optional compiled relay (midway/core/_accel.c, Linux only).

Everything else is in pyproject.toml.  The extension is optional: where it cannot be
built (no C compiler, not Linux) pip installs midway without it and the pure-Python
relay runs alone (docs/benchmarks.md, "The compiled relay")."""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension("midway.core._accel", ["midway/core/_accel.c"], optional=True,
                                 extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"]))

setup(ext_modules=ext_modules)
