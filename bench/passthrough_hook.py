"""A hook that passes every chunk on unchanged: the `bulkchain` scenario's cost of inspection
(every byte goes through the chain and a Python call, none is altered)."""

from __future__ import annotations

from typing import Any


def on_data(direction: str, data: bytes, ctx: Any) -> None:
    return None  # None: the chunk goes on unchanged
