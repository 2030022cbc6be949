"""midway's version, in a module of its own: the CLI and the admin API report it
without importing the package root (which imports the whole public API, and so
would close an import cycle back to them). pyproject.toml reads it from here."""

__version__ = "0.1.0"
