"""midway: a TCP proxy.  Every client connection gets its own upstream connection;
bytes flow both ways unchanged, in order, and nothing is lost.

Quick use from Python::

    import midway

    async with midway.Proxy("127.0.0.1:0", "127.0.0.1:6379") as proxy:
        host, port = proxy.address          # connect your client here

and from a synchronous test: ``with midway.BackgroundProxy(...) as proxy: ...``.
"""

from ._version import __version__
from .api import Proxy, proxy_config
from .chain.base import Attachment, ConnectionInfo, Element, Output, Stage
from .chain.toxics import ToxicError
from .chain.toxics import config as _toxic_config  # noqa: F401  (registers the toxics table parser)
from .chain.toxics.live import ToxicExists, ToxicHandle, ToxicNotFound
from .config.load import config_from_dict, load_config
from .config.schema import Config, ProxyConfig, ServerConfig
from .control.connections import ConnectionNotFound, ConnectionToxicHandle, StillConnecting
from .core.observer import CloseReason, CloseRecord
from .errors import ConfigError, ListenError, MidwayError, Rejected, UpstreamError
from .replay import BackgroundReplay, Replay
from .runtime import Runtime
from .testing import BackgroundProxy

__all__ = [
    "__version__",
    "Proxy",
    "BackgroundProxy",
    "Replay",
    "BackgroundReplay",
    "proxy_config",
    "Runtime",
    "Config",
    "ProxyConfig",
    "ServerConfig",
    "load_config",
    "config_from_dict",
    "Element",
    "Stage",
    "Attachment",
    "Output",
    "ConnectionInfo",
    "CloseReason",
    "CloseRecord",
    "MidwayError",
    "ConfigError",
    "ListenError",
    "UpstreamError",
    "Rejected",
    "ToxicHandle",
    "ToxicError",
    "ToxicExists",
    "ToxicNotFound",
    "ConnectionToxicHandle",
    "ConnectionNotFound",
    "StillConnecting",
]
