"""Builds a proxy's chain elements from its configuration.

This is the one place that knows which configuration keys turn into which
elements, and in what order they sit in the chain (the same order in both
directions).  The relay and the sessions only ever see :class:`Element` objects.

Chain order, the same both ways::

    pcap head · hooks · dump · toxics · pcap tail

Hooks come first so that they see what the peers sent; the dump follows them,
so it shows what midway passes on (hook changes and injections included, before
any fault); toxics act last, like the network between midway and the peer; the
capture brackets everything, so each TCP leg records what really crossed it
(see :mod:`midway.chain.pcap`).  Nothing configured means no element, and
connections keep the relay's fast path.
"""

from __future__ import annotations

from typing import cast

from ..config.load import check_writable
from ..config.schema import ProxyConfig
from ..errors import ConfigError
from .base import Element
from .dump import STDOUT, DumpElement
from .dumpfmt import DumpMode
from .hooks import HookElement, load_hook
from .pcap import MIN_ROTATE_BYTES, PcapCapture
from .toxics.config import static_toxics

__all__ = ["build_elements", "check_elements"]


def _hooks(config: ProxyConfig) -> list[HookElement]:
    hooks: list[HookElement] = []
    for i, spec in enumerate(config.hooks):
        hook = load_hook(spec, f"proxy.{config.name}.hooks[{i}]")
        if any(h.name == hook.name for h in hooks):  # names are unique in a proxy
            hook.name = f"{hook.name}#{i + 1}"
        hooks.append(hook)
    return hooks


def check_elements(config: ProxyConfig, workers: int = 1) -> None:
    """Check what the configuration's elements need, without creating files:
    hooks import and declare a valid framing, output directories exist, and a
    capture is written by one process (``workers``, as in ``server.workers``).
    Raises :class:`ConfigError` naming the key."""
    _hooks(config)
    _check_outputs(config)
    if config.pcap and workers != 1:
        raise ConfigError(f"proxy.{config.name}.pcap",
                          "a capture needs workers = 1 (one process writes the file)")


def _check_outputs(config: ProxyConfig) -> None:
    where = f"proxy.{config.name}"
    if config.pcap:
        check_writable(config.pcap, f"{where}.pcap")
        if 0 < config.pcap_max_bytes < MIN_ROTATE_BYTES:
            raise ConfigError(f"{where}.pcap_max_bytes",
                              f"must be 0 (no rotation) or at least {MIN_ROTATE_BYTES}, "
                              f"got {config.pcap_max_bytes}")
    if config.dump_file:
        check_writable(config.dump_file, f"{where}.dump_file")


def build_elements(config: ProxyConfig) -> list[Element]:
    """The chain elements ``config`` asks for, in chain order.  Raises
    :class:`ConfigError` for a hook that cannot be loaded or an output file that
    cannot be opened."""
    where = f"proxy.{config.name}"
    elements: list[Element] = []
    hooks = _hooks(config)
    _check_outputs(config)
    toxics = static_toxics(config)
    capture = None
    if config.pcap:
        try:
            capture = PcapCapture.open(config.pcap, config.pcap_max_bytes, config.pcap_keep)
        except OSError as exc:
            raise ConfigError(f"{where}.pcap", f"cannot open {config.pcap}: "
                                               f"{exc.strerror or exc}") from exc
        elements.append(capture.head)
    elements.extend(hooks)
    if config.dump != "off" or config.dump_file:
        mode = cast(DumpMode, "auto" if config.dump == "off" else config.dump)
        try:
            elements.append(DumpElement.open(config.dump_file or STDOUT, mode,
                                             config.dump_max_bytes or None))
        except OSError as exc:
            if capture is not None:
                capture.close()
            raise ConfigError(f"{where}.dump_file", f"cannot open {config.dump_file}: "
                                                    f"{exc.strerror or exc}") from exc
    # Toxics last: what the elements before them see is what the peer sent.
    elements.extend(toxics)
    if capture is not None:
        elements.append(capture.tail)  # keep_last: toxics added later go before it
    return elements
