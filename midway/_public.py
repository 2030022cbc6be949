"""The names :mod:`midway` exports, imported by its ``__getattr__`` when one is
first used (not by ``import midway``)."""

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
