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

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._public import *  # noqa: F403


def __getattr__(name: str) -> Any:
    """``midway.NAME`` (and ``__all__``): from :mod:`midway._public`, imported
    once, then kept here (PEP 562)."""
    if name.startswith("_") and name != "__all__":  # a submodule being imported, a dunder
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    public = importlib.import_module("._public", __name__)
    if name != "__all__" and name not in public.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(public, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
