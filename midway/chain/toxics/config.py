"""Toxics declared in the configuration: ``[[proxy.NAME.toxics]]`` tables and
``--toxic`` flags, validated up front into :class:`~midway.config.schema.ToxicSpec`.

TOML::

    [[proxy.redis.toxics]]
    type = "latency"                      # required: a Toxiproxy toxic type
    name = "slow_replies"                 # default: TYPE_STREAM, as in Toxiproxy
    stream = "downstream"                 # or "upstream" (client -> server)
    toxicity = 1.0                        # share of connections it applies to
    attributes = { latency = 100, jitter = 10 }
    conditions = { first_n = 3 }          # midway's own, see Conditions
    seed = 42                             # repeatable draws (default: the proxy's seed)
    at_s = 5                              # timeline: added 5 s after the proxy starts
    until_s = 20                          # ... and removed at 20 s

Command line (one flag per toxic, repeatable)::

    --toxic 'latency:latency=100,jitter=10,stream=downstream'

``KEY=VALUE`` pairs after ``TYPE:`` set an attribute of the toxic type, else
``name``, ``stream``, ``toxicity``, ``seed``, ``at_s``, ``until_s``, else a condition
(``client_cidr`` may be repeated, ``first_n``, ``every_nth``, ``after_s``,
``match`` (kept as text; it cannot contain a comma), ``match_stream``, ``message``,
``message_stream``, ``framing`` (text, e.g. ``framing=line:\r\n``), ``for_s``); any
other key is an (unknown) attribute, for the validation to report.  The
attribute comes first because ``limit_time``'s ``after_s`` attribute shares its
name with the condition; that one toxic type cannot take the condition from a
flag (use a TOML table).

Every toxic is built once through :func:`~midway.chain.toxics.make_toxic` while the
configuration loads, so a bad one is a :class:`~midway.errors.ConfigError` naming
its key, e.g. ``proxy.redis.toxics[0].attributes.latency``, before anything binds.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from ...config.describe import describe_value
from ...config.load import register_list_parser
from ...config.schema import DEFAULT_TOXIC_STREAM, DEFAULT_TOXICITY, ProxyConfig, ToxicSpec
from ...errors import ConfigError
from . import TOXICS, make_toxic
from .base import Conditions, Toxic, ToxicError

__all__ = [
    "TABLE_KEYS",
    "parse_toxic_tables",
    "toxic_table_from_spec",
    "build_toxic",
    "toxic_spec",
    "static_toxics",
]

TABLE_KEYS = ("type", "name", "stream", "toxicity", "attributes", "conditions", "seed", "at_s",
              "until_s")
"""The keys of one ``[[proxy.NAME.toxics]]`` table."""

_SPEC_FIELDS = {"name": str, "stream": str, "toxicity": float, "seed": int, "at_s": float,
                "until_s": float}
_SPEC_CONDITIONS = {"first_n": int, "every_nth": int, "after_s": float, "match": str,
                    "match_stream": str, "message": int, "message_stream": str,
                    "framing": str, "for_s": float}


def parse_toxic_tables(value: Any, path: str, *, seed: int = 0) -> tuple[ToxicSpec, ...]:
    """Validate a proxy's ``toxics`` list (TOML array of tables).  Names must be
    unique among toxics that can be active at the same time.  ``seed`` is the
    proxy's (0: none), the seed of each toxic that has none of its own."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(path, "expected a list of tables, e.g. [[proxy.NAME.toxics]]")
    specs = [parse_toxic_table(item, f"{path}[{i}]", seed=seed) for i, item in enumerate(value)]
    for j, spec in enumerate(specs):
        for i, other in enumerate(specs[:j]):
            if other.name == spec.name and _overlap(other, spec):
                raise ConfigError(
                    f"{path}[{j}].name",
                    f"{spec.name!r} is already the name of toxics[{i}] while both are "
                    "active (name one of them, or make their at_s..until_s windows apart)")
    return tuple(specs)


def _where_it_goes(table: Mapping[str, Any], key: str) -> str:
    """The hint for an unknown key of a toxic table: a toxic's attribute or a
    condition written flat, as ``--toxic`` takes them, or the closest key."""
    kind = table.get("type")
    cls = TOXICS.get(kind) if isinstance(kind, str) else None
    value = table[key]
    shown = repr(value) if isinstance(value, str) else value
    if cls is not None and key in {f.name for f in fields(cls.attributes_class)}:
        return f"; an attribute of {cls.type}: attributes = {{ {key} = {shown} }}"
    if key in _SPEC_CONDITIONS or key == "client_cidr":
        return f"; a condition: conditions = {{ {key} = {shown} }}"
    close = difflib.get_close_matches(str(key), TABLE_KEYS, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_toxic_table(table: Any, path: str, *, seed: int = 0) -> ToxicSpec:
    """Validate one toxic table; see the module doc for its keys.  ``seed``: the
    proxy's (0: none)."""
    if not isinstance(table, Mapping):
        raise ConfigError(path, f"expected a table, got {describe_value(table)}")
    for key in table:
        if key not in TABLE_KEYS:
            raise ConfigError(f"{path}.{key}", f"unknown key{_where_it_goes(table, key)}")
    if "type" not in table:
        raise ConfigError(f"{path}.type", "missing (required)")
    at_s = _seconds(table.get("at_s", 0.0), f"{path}.at_s")
    until_s = None
    if "until_s" in table:
        until_s = _seconds(table["until_s"], f"{path}.until_s")
        if until_s <= at_s:
            raise ConfigError(f"{path}.until_s", f"must be after at_s ({at_s:g} s), got {until_s:g}")
    own_seed = table.get("seed")
    if own_seed is not None and (isinstance(own_seed, bool) or not isinstance(own_seed, int)
                                 or own_seed < 0):
        raise ConfigError(f"{path}.seed", f"expected a whole number of at least 0, got {own_seed!r}")
    try:
        toxic = make_toxic(
            table["type"], name=table.get("name"), stream=table.get("stream", DEFAULT_TOXIC_STREAM),
            toxicity=table.get("toxicity", DEFAULT_TOXICITY), attributes=table.get("attributes"),
            conditions=table.get("conditions"), seed=own_seed,
        )
    except ToxicError as exc:
        raise ConfigError(f"{path}.{exc.field}", exc.message) from exc
    return ToxicSpec(
        type=toxic.type, name=toxic.name, stream=toxic.stream, toxicity=toxic.toxicity,
        attributes=tuple(sorted(toxic.attributes.to_json().items())),
        conditions=tuple(sorted(_frozen(toxic.conditions.to_json()).items())),
        at_s=at_s, until_s=until_s,
        seed=own_seed if own_seed is not None else (seed or None),
    )


def toxic_table_from_spec(text: str) -> dict[str, Any]:
    """Turn a ``--toxic TYPE[:KEY=VALUE,...]`` flag into the equivalent TOML table
    (validated later with the rest of the configuration).  Numbers are converted;
    anything else is kept as text for the validation to judge.  Raises
    :class:`ConfigError` (empty path) for a malformed flag."""
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if not kind:
        raise ConfigError("", f"--toxic {text!r}: expected TYPE[:KEY=VALUE,...], "
                              "e.g. latency:latency=100,jitter=10")
    table: dict[str, Any] = {"type": kind}
    cls = TOXICS.get(kind)
    own_attributes = ({f.name: f.metadata.get("kind", int) for f in fields(cls.attributes_class)}
                      if cls else {})
    attributes: dict[str, Any] = {}
    conditions: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ConfigError("", f"--toxic {text!r}: {item!r} is not KEY=VALUE")
        if key == "client_cidr":
            conditions.setdefault(key, []).append(raw)
            continue
        if key in table or key in attributes or key in conditions:
            raise ConfigError("", f"--toxic {text!r}: {key} is given twice")
        if key in own_attributes:
            attributes[key] = _number(raw, own_attributes[key])
        elif key in _SPEC_FIELDS:
            table[key] = raw if _SPEC_FIELDS[key] is str else _number(raw, _SPEC_FIELDS[key])
        elif key in _SPEC_CONDITIONS:
            conditions[key] = (raw if _SPEC_CONDITIONS[key] is str
                               else _number(raw, _SPEC_CONDITIONS[key]))
        else:
            attributes[key] = _number(raw)
    if attributes:
        table["attributes"] = attributes
    if conditions:
        table["conditions"] = conditions
    return table


def build_toxic(spec: ToxicSpec, **kwargs: Any) -> Toxic[Any]:
    """A fresh toxic element for ``spec`` (already validated, so this does not
    fail), seeded with ``spec.seed``.  ``kwargs`` go to :func:`make_toxic`
    (``rng``, ``clock``)."""
    return make_toxic(
        spec.type, name=spec.name, stream=spec.stream, toxicity=spec.toxicity,
        attributes=dict(spec.attributes), conditions=Conditions.from_mapping(dict(spec.conditions)),
        seed=spec.seed, **kwargs,
    )


def toxic_spec(toxic: Toxic[Any]) -> ToxicSpec:
    """The spec that builds ``toxic`` again (:func:`build_toxic`): how a toxic
    made through the admin API goes down to every worker, as data."""
    return ToxicSpec(
        type=toxic.type, name=toxic.name, stream=toxic.stream, toxicity=toxic.toxicity,
        attributes=tuple(sorted(toxic.attributes.to_json().items())),
        conditions=tuple(sorted(toxic.conditions.to_json().items())),
        seed=toxic.seed if toxic.seed_given else None,  # else each worker draws its own
    )


def static_toxics(config: ProxyConfig) -> list[Toxic[Any]]:
    """The toxics present from the proxy's start (``at_s`` = 0), in file order;
    the timeline (:mod:`midway.timeline`) adds the later ones and removes any with
    ``until_s``."""
    return [build_toxic(spec) for spec in config.toxics if spec.at_s == 0]


def _seconds(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, f"expected a number of seconds, got {describe_value(value)}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(path, f"must be finite and not negative, got {value!r}")
    return float(value)


def _overlap(a: ToxicSpec, b: ToxicSpec) -> bool:
    a_end = math.inf if a.until_s is None else a.until_s
    b_end = math.inf if b.until_s is None else b.until_s
    return a.at_s < b_end and b.at_s < a_end


def _frozen(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()}


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(text: str, kind: type | None = None) -> Any:
    """A flag's number, written in plain ASCII decimal: ``-12``, ``0.5``, ``1e3``
    (only ``-12`` where ``kind`` is :class:`int`).  Anything else (``1_000``,
    ``0x10``, ``inf``, non-ASCII digits, all of which :func:`int` or
    :func:`float` would take; ``1e3`` for a whole number) stays text, for the
    validation to report with the key's name, quoting what was typed."""
    if _INTEGER.fullmatch(text):
        return int(text)
    if kind is not int and _DECIMAL.fullmatch(text):
        return float(text)
    return text


register_list_parser(
    "toxics", lambda value, path, options: parse_toxic_tables(value, path,
                                                              seed=options.get("seed", 0)))
