"""midway: a TCP proxy.  Every client connection gets its own upstream connection;
bytes flow both ways unchanged, in order, and nothing is lost.

Quick use from Python::

    import midway

    async with midway.Proxy("127.0.0.1:0", "127.0.0.1:6379") as proxy:
        host, port = proxy.address          # connect your client here

and from a synchronous test: ``with midway.BackgroundProxy(...) as proxy: ...``.

The names are imported on first use (:func:`__getattr__`), not by ``import
midway``: the command (``python -m midway``, ``midway``) imports this package
before any code of its own runs, so a Ctrl-C while the library loads reaches
:mod:`midway.__main__`, which exits 130 without a traceback.
"""

import importlib as _importlib
from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING
from typing import Any as _Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._public import *  # noqa: F403
    from ._public import __all__ as __all__
else:  # hidden from type checkers, which would take any name for one of its (Any)

    def __getattr__(name: str) -> _Any:
        """``midway.NAME`` (and ``__all__``): from :mod:`midway._public`, imported
        once, then kept here (PEP 562).  A submodule's name (``midway.chain``)
        imports the public names too, so that what ``import midway`` gave before
        they were lazy (every submodule they load) is there as it was."""
        if name.startswith("_") and name != "__all__":  # a dunder, or a submodule importing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        public = _importlib.import_module("._public", __name__)
        if name in _submodules():
            try:
                return _importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError as exc:
                if (exc.name or "").partition(".")[0] == __name__:
                    raise  # a module of midway's own is missing: a broken install
                # A submodule needing what is not installed (pytest_plugin,
                # pytest): no such attribute, so hasattr() and getattr(m, n, d)
                # answer; ``import midway.NAME`` still raises the ImportError.
                raise AttributeError(f"module {__name__!r} has no attribute {name!r} "
                                     f"(midway.{name} needs {exc.name}, which is not "
                                     "installed)", name=name) from exc
        if name != "__all__" and name not in public.__all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(public, name)
        globals()[name] = value
        return value


def _submodules() -> set[str]:
    """The public submodules' names (``chain``, ``testing``, ...)."""
    import pkgutil  # here, not at the top: ``import midway`` stays quick

    return {module.name for module in pkgutil.iter_modules(__path__)  # noqa: F405 (the package's own)
            if not module.name.startswith("_")}


def __dir__() -> list[str]:
    """The public names, the dunders and the submodules imported so far (as the
    eager import listed them: ``help(midway)`` gets each one, and importing
    :mod:`midway.pytest_plugin` needs pytest), not this file's imports."""
    public = _importlib.import_module("._public", __name__).__all__
    own = {name for name, value in globals().items()
           if name.startswith("__")
           or not name.startswith("_") and isinstance(value, _ModuleType)}
    return sorted({*own, *public} - {"__getattr__", "__dir__"})
