"""Toxiproxy-compatible fault injection: toxics as chain elements.

Usage::

    from midway.chain.toxics import make_toxic

    slow = make_toxic("latency", attributes={"latency": 200, "jitter": 20})
    cut = make_toxic("limit_data", stream="upstream", attributes={"bytes": 1024},
                     conditions={"client_cidr": ["10.0.0.0/8"], "first_n": 3})
    slow.to_json()   # Toxiproxy's JSON, e.g. for GET /proxies/{proxy}/toxics

Every toxic keeps Toxiproxy's type name, attribute names, units and defaults, and
the behaviour of Toxiproxy v2 except where its module doc says otherwise.  Each
toxic type lives in its own module; :data:`TOXICS` maps type names to classes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from midway.chain.toxics.bandwidth import BandwidthToxic
from midway.chain.toxics.base import Attributes, Conditions, Toxic, ToxicError, ToxicStage
from midway.chain.toxics.blackhole import BlackholeToxic
from midway.chain.toxics.corrupt import CorruptToxic
from midway.chain.toxics.latency import LatencyToxic
from midway.chain.toxics.limit_data import LimitDataToxic
from midway.chain.toxics.limit_time import LimitTimeToxic
from midway.chain.toxics.noop import NoopToxic
from midway.chain.toxics.reset_peer import ResetPeerToxic
from midway.chain.toxics.slicer import SlicerToxic
from midway.chain.toxics.slow_close import SlowCloseToxic
from midway.chain.toxics.stall import StallToxic
from midway.chain.toxics.timeout import TimeoutToxic
from midway.config.schema import DEFAULT_TOXIC_STREAM, DEFAULT_TOXICITY
from midway.core.clock import Clock

__all__ = [
    "TOXICS",
    "make_toxic",
    "Toxic",
    "ToxicError",
    "ToxicStage",
    "Attributes",
    "Conditions",
    "LatencyToxic",
    "BandwidthToxic",
    "SlowCloseToxic",
    "TimeoutToxic",
    "ResetPeerToxic",
    "SlicerToxic",
    "LimitDataToxic",
    "BlackholeToxic",
    "NoopToxic",
    "LimitTimeToxic",
    "StallToxic",
    "CorruptToxic",
]

TOXICS: dict[str, type[Toxic[Any]]] = {
    cls.type: cls
    for cls in (
        LatencyToxic,
        BandwidthToxic,
        SlowCloseToxic,
        TimeoutToxic,
        ResetPeerToxic,
        SlicerToxic,
        LimitDataToxic,
        BlackholeToxic,
        NoopToxic,
        LimitTimeToxic,
        StallToxic,
        CorruptToxic,
    )
}
"""Every toxic type by its Toxiproxy name (``blackhole``, ``limit_time``,
``stall`` and ``corrupt`` are midway's own)."""


def make_toxic(
    type: str,
    *,
    name: str | None = None,
    stream: str = DEFAULT_TOXIC_STREAM,
    toxicity: float = DEFAULT_TOXICITY,
    attributes: Mapping[str, object] | None = None,
    conditions: Conditions | Mapping[str, object] | None = None,
    rng: random.Random | None = None,
    clock: Clock | None = None,
    seed: int | None = None,
) -> Toxic[Any]:
    """Build and validate a toxic from Toxiproxy-style fields.

    ``name`` defaults to ``f"{type}_{stream}"`` as in Toxiproxy; ``stream`` is
    ``"upstream"`` (client → server) or ``"downstream"`` (the default);
    ``toxicity`` is the probability, from 0 to 1, that it applies to a connection;
    missing ``attributes`` take Toxiproxy's defaults.  ``conditions`` are midway's
    (see :class:`Conditions`).  ``seed`` makes every random draw (toxicity,
    jitter, slice sizes, corrupted bytes) repeat from run to run: each connection
    gets its own generator derived from (seed, name, connection sequence number);
    without one a seed is drawn and logged on the first connection.  ``rng``, if
    given, is used as is for every connection instead (a fixed source for tests).
    ``clock`` lets ``after_s`` count from now (see :mod:`midway.chain.toxics.base`).

    Raises :class:`ToxicError` (a ``ValueError``) whose ``field`` names the
    offending setting: ``type``, ``name``, ``stream``, ``toxicity``,
    ``attributes.<name>``, ``conditions.<name>`` or ``seed``.
    """
    cls = TOXICS.get(type) if isinstance(type, str) else None
    if cls is None:
        known = ", ".join(sorted(TOXICS))
        raise ToxicError("type", f"unknown toxic type {type!r} (known: {known})")
    return cls(
        cls.attributes_class.from_mapping(attributes),
        name=name,
        stream=stream,
        toxicity=toxicity,
        conditions=conditions,
        rng=rng,
        clock=clock,
        seed=seed,
    )
