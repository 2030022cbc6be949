"""Builds a proxy's chain elements from its configuration.

This is the one place that knows which configuration keys turn into which
elements, and in what order they sit in the chain (the same order in both
directions).  The relay and the sessions only ever see :class:`Element` objects.
"""

from __future__ import annotations

from ..config.schema import ProxyConfig
from .base import Element

__all__ = ["build_elements"]


def build_elements(config: ProxyConfig) -> list[Element]:
    """The chain elements ``config`` asks for, in chain order."""
    elements: list[Element] = []
    return elements
