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

__all__ = ["build_elements", "check_elements", "rebuild_elements"]


def _hooks(config: ProxyConfig, fresh: bool = False) -> list[HookElement]:
    hooks: list[HookElement] = []
    for i, spec in enumerate(config.hooks):
        hook = load_hook(spec, f"proxy.{config.name}.hooks[{i}]", fresh=fresh)
        if any(h.name == hook.name for h in hooks):  # names are unique in a proxy
            hook.name = f"{hook.name}#{i + 1}"
        hooks.append(hook)
    return hooks


def check_elements(config: ProxyConfig) -> None:
    """Check what the configuration's elements need, without creating files:
    hooks import (anew: a reload checks the module as it is on disk now) and
    declare a valid framing, output directories exist.  Raises
    :class:`ConfigError` naming the key."""
    _hooks(config, fresh=True)
    _check_outputs(config)


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
    hooks = _hooks(config)
    _check_outputs(config)
    toxics = static_toxics(config)
    capture = _capture(config)
    try:
        dump = _dump(config)
    except ConfigError:
        if capture is not None:
            capture.close()
        raise
    # Toxics last: what the elements before them see is what the peer sent.
    elements: list[Element] = [*_capture_head(capture), *hooks, *dump, *toxics]
    if capture is not None:
        elements.append(capture.tail)  # keep_last: toxics added later go before it
    return elements


def _capture(config: ProxyConfig) -> PcapCapture | None:
    if not config.pcap:
        return None
    try:
        return PcapCapture.open(config.pcap, config.pcap_max_bytes, config.pcap_keep)
    except OSError as exc:
        raise ConfigError(f"proxy.{config.name}.pcap", f"cannot open {config.pcap}: "
                                                       f"{exc.strerror or exc}") from exc


def _capture_head(capture: PcapCapture | None) -> list[Element]:
    return [] if capture is None else [capture.head]


def _dump(config: ProxyConfig) -> list[Element]:
    if config.dump == "off" and not config.dump_file:
        return []
    mode = cast(DumpMode, "auto" if config.dump == "off" else config.dump)
    try:
        return [DumpElement.open(config.dump_file or STDOUT, mode, config.dump_max_bytes or None)]
    except OSError as exc:
        raise ConfigError(f"proxy.{config.name}.dump_file", f"cannot open {config.dump_file}: "
                                                            f"{exc.strerror or exc}") from exc


# Where each kind of element sits in the chain (see the module doc).
_HEAD, _HOOKS, _DUMP, _MIDDLE, _TAIL = range(5)


def _slot(element: Element) -> int:
    capture = getattr(element, "capture", None)
    if isinstance(capture, PcapCapture):
        return _HEAD if element is capture.head else _TAIL
    if isinstance(element, HookElement):
        return _HOOKS
    if isinstance(element, DumpElement):
        return _DUMP
    return _MIDDLE  # toxics, and elements added from Python


def rebuild_elements(current: list[Element], config: ProxyConfig, *, capture: bool,
                     dump: bool, hooks: bool, fresh: bool = False) -> tuple[list[Element],
                                                                           list[Element]]:
    """The chain of a proxy whose capture, dump or hooks changed (a reload):
    the kinds asked are built anew from ``config`` (hooks imported anew with
    ``fresh``), everything else (toxics among them) is kept as it is.  Returns
    ``(chain, retired)``: the old elements of the rebuilt kinds are ``retired``
    but stay in ``chain``, each just before what replaces it, so an open
    connection attached to them keeps its stages in the same order.  A capture
    to the path already open shares its file (its first rotation settings
    apply).  Raises :class:`ConfigError` as :func:`build_elements` does, having
    opened nothing."""
    _check_outputs(config)
    built: dict[int, list[Element]] = {}
    made: PcapCapture | None = None
    try:
        if hooks:
            built[_HOOKS] = list(_hooks(config, fresh=fresh))
        if capture:
            made = _capture(config)
            built[_HEAD] = _capture_head(made)
            built[_TAIL] = [] if made is None else [made.tail]
        if dump:
            built[_DUMP] = _dump(config)
    except ConfigError:
        if made is not None:
            made.close()
        raise
    retired = [e for e in current if _slot(e) in built]
    fresh_elements = [e for slot in sorted(built) for e in built[slot]]
    # A stable sort by slot keeps the order within each slot: old before new.
    chain = sorted([*current, *fresh_elements], key=_slot)
    return chain, retired
