"""Turn TOML (or the equivalent dictionaries built by the command line) into a
validated :class:`~midway.config.schema.Config`.

Everything is checked before anything binds: unknown keys (with the closest valid
key suggested), wrong types, out-of-range values, duplicate names and listeners that
would conflict.  Errors are :class:`~midway.errors.ConfigError` naming the key path,
e.g. ``proxy.redis.upstreams[1]``.

File layout::

    [server]                 # process-wide (ServerConfig)
    max_connections = 0

    [defaults]               # inherited by every proxy (ProxyConfig options)
    connect_timeout_s = 3

    [proxy.redis]            # one table per named proxy
    listen = "127.0.0.1:6380"            # a string or a list of strings
    upstreams = ["10.0.0.5:6379", {address = "10.0.0.6:6379", weight = 3}]

    [proxy.redis.health]     # HealthConfig; [defaults.health] is inherited key by key
    interval_s = 2

An upstream entry is an address, the quick form ``ADDRESS[,weight=N][,backup]``
(what the command line takes) or a table ``{address, weight, backup}``.
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import os
import stat
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import AddressError, ConfigError
from ..upstream.access import AccessList
from ..upstream.balancers import MAX_WEIGHT
from ..upstream.health import HealthSettings
from .addresses import Address, parse_address, privileged_port, resolve_listen, unmapped
from .describe import describe_value
from .hexbytes import parse_hex
from .schema import (
    BALANCERS,
    TLS_ORIGINATION_KEYS,
    TLS_TERMINATION_KEYS,
    Config,
    HealthConfig,
    OptionInfo,
    ProxyConfig,
    RouteSpec,
    ServerConfig,
    UpstreamConfig,
    options_of,
    proxy_name_problem,
)

__all__ = ["load_config", "listeners_conflict", "config_from_dict", "build_options", "health_settings", "health_bytes",
           "check_admin", "check_admin_port", "check_admin_listeners", "check_writable", "check_server_outputs",
           "check_workers", "check_resolved_listeners", "admin_token", "register_list_parser",
           "ListParser", "file_mode", "listeners_conflict"]

_TOP_KEYS = ("server", "defaults", "proxy")
_PROXY_ONLY_KEYS = ("listen", "upstreams")
_PROXY_TABLES = ("health",)
"""Per-proxy sub-tables of options (``[proxy.NAME.health]``), inheritable from
``[defaults]`` key by key."""
_PROXY_LISTS = ("toxics",)
"""Per-proxy keys holding a list of tables, each checked by its own parser."""
_ROUTES = "routes"
"""``[[proxy.NAME.routes]]``: SNI routes, checked here (:func:`_routes`)."""
_ROUTE_KEYS = ("name", "sni", "upstreams", "balance", "tls_cert", "tls_key")
_SERVER_ONLY_KEYS = frozenset(f.name for f, _ in options_of(ServerConfig)) - frozenset(
    f.name for f, _ in options_of(ProxyConfig))
"""The [server] keys a proxy does not have (``max_connections`` is in both)."""

ListParser = Callable[[Any, str, Mapping[str, Any]], tuple[Any, ...]]
"""Validates one per-proxy list of tables (the value, its key path, and the proxy's
other options, already validated: a toxic inherits the proxy's ``seed``) into the
:class:`ProxyConfig` field of the same name; raises :class:`ConfigError`."""

_LIST_PARSERS: dict[str, ListParser] = {}
_LIST_OWNERS = {"toxics": "midway.chain.toxics.config"}
"""The module that registers each list's parser, imported by name the first time
one is needed (a program may import ``midway.config.load`` alone)."""


def register_list_parser(key: str, parser: ListParser) -> None:
    """Let the layer that owns a per-proxy list of tables check it: the entries of
    ``toxics`` are toxic types only the chain knows (``midway.chain.toxics.config``
    registers its parser when imported; :data:`_LIST_OWNERS` names it, imported
    on first need), and ``config/`` imports nothing from ``chain/``."""
    if key not in _PROXY_LISTS:
        raise ValueError(f"{key!r} is not a per-proxy list of tables ({', '.join(_PROXY_LISTS)})")
    _LIST_PARSERS[key] = parser


MAX_CONFIG_BYTES = 16 << 20
"""The largest configuration file read (16 MiB, far above any real one): a
path to an endless stream (``/dev/zero``, a FIFO nobody closes) is refused
instead of read forever."""


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML configuration file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError("", f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: "
                                  "not a configuration file")
        data = tomllib.loads(raw.decode())
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: not UTF-8 text ({exc.reason} "
                              f"at byte {exc.start})") from exc
    return config_from_dict(data)


def _unknown(key: str, valid: typing.Iterable[str], path: str, *,
             proxy: bool = False) -> ConfigError:
    """``proxy``: ``path`` is a proxy's table (or [defaults]), where a key of
    [server] is said to be one (``workers`` there would be 'did you mean ...')."""
    if proxy and key in _SERVER_ONLY_KEYS:
        return ConfigError(_join(path, key),
                           "a [server] key (the whole midway process's), not a proxy's")
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(_join(path, key), f"unknown key{hint}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _table(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a table, got {describe_value(value)}")
    return value


def _coerce(value: Any, kind: Any, info: OptionInfo, path: str) -> Any:
    """Check one option value against its declared type and limits."""
    if isinstance(value, str) and value in dict(info.words):
        return dict(info.words)[value]
    if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a string or a list of them
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(path, f"expected a string or a list of strings, got {describe_value(value)}")
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{path}[{i}]", f"expected a non-empty string, got {describe_value(item)}")
        return tuple(items)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {describe_value(value)}")
        return value
    written = value  # a refusal quotes a number as written: -5, not -5.0
    words = "".join(f" or {word!r}" for word, _ in info.words)  # retries: " or 'all'"
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected a whole number{words}, got {describe_value(value)}")
        value = int(value)  # a flag's value keeps its text for the refusal alone
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {describe_value(value)}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(path, f"expected a finite number, got {written!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {describe_value(value)}")
        if info.choices and value not in info.choices:
            choices = ", ".join(info.choices)
            raise ConfigError(path, f"{value!r} is not one of: {choices}")
        return value
    if info.minimum is not None and value < info.minimum:
        if info.minimum < 0 and info.minimum in dict(info.words).values():
            # A negative minimum is only a word's value (retries' all = -1).
            raise ConfigError(path, f"must be at least 0{words}, got {written!r}")
        raise ConfigError(path, f"must be at least {info.minimum:g}, got {written!r}")
    if info.maximum is not None and value > info.maximum:
        raise ConfigError(path, f"must be at most {info.maximum:g}, got {written!r}")
    return value


def build_options(cls: type, table: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Validate the option keys of ``table`` against schema class ``cls``."""
    hints = typing.get_type_hints(cls)
    opts = {f.name: info for f, info in options_of(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in opts:
            raise _unknown(key, opts, path, proxy=cls is ProxyConfig)
        out[key] = _coerce(value, hints[key], opts[key], _join(path, key))
    return out


def _addresses(value: Any, path: str, *, listen: bool) -> tuple[Address, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(path, "expected an address or a non-empty list of addresses, "
                                f"got {describe_value(value)}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]", f"expected an address string, got "
                                              f"{describe_value(item)}")
        try:
            out.append(parse_address(item, listen=listen))
        except AddressError as exc:
            raise ConfigError(f"{path}[{i}]" if not isinstance(value, str) else path,
                              str(exc)) from exc
    return tuple(out)


_UPSTREAM_KEYS = ("address", "weight", "backup")


def _upstreams(value: Any, path: str) -> tuple[UpstreamConfig, ...]:
    """``upstreams``: an entry or a non-empty list of entries, each an address, the
    quick form ``ADDRESS[,weight=N][,backup]`` or a table ``{address, weight,
    backup}``.  Errors name the entry and key (``upstreams[2].weight``)."""
    items = [value] if isinstance(value, str | Mapping) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(path, "expected an address or a non-empty list of addresses, "
                                f"got {describe_value(value)}")
    out = []
    for i, item in enumerate(items):
        where = path if items is not value else f"{path}[{i}]"
        if isinstance(item, str):
            fields = _quick_upstream(item, where)
        elif isinstance(item, Mapping):
            fields = dict(item)
            for key in fields:
                if key not in _UPSTREAM_KEYS:
                    raise _unknown(key, _UPSTREAM_KEYS, where)
            if "address" not in fields:
                raise ConfigError(f"{where}.address", "missing (required)")
        else:
            raise ConfigError(where, f"expected an address string or a table, got "
                                     f"{describe_value(item)}")
        out.append(_upstream(fields, where))
    seen: dict[Address, int] = {}
    for i, upstream in enumerate(out):
        if upstream.address in seen:
            raise ConfigError(f"{path}[{i}]", f"{upstream.address} is listed twice "
                                              f"(also upstreams[{seen[upstream.address]}])")
        seen[upstream.address] = i
    return tuple(out)


def _quick_upstream(text: str, path: str) -> dict[str, Any]:
    """``10.0.0.6:6379,weight=3,backup`` → the fields of a table entry."""
    address, *options = [part.strip() for part in text.split(",")]
    fields: dict[str, Any] = {"address": address}
    for option in options:
        key, eq, raw = option.partition("=")
        key = key.strip()
        if key == "backup" and not eq:
            fields["backup"] = True
        elif key == "weight" and eq:
            try:
                fields["weight"] = int(raw)
            except ValueError:
                raise ConfigError(f"{path}.weight", f"expected a whole number, got "
                                                    f"{raw.strip()!r}") from None
        elif key in ("weight", "backup"):
            form = "weight=N" if key == "weight" else "backup"
            raise ConfigError(path, f"{option!r}: write {form}")
        else:
            raise ConfigError(path, f"{option!r} is not an upstream option (after the "
                                    "address: weight=N, backup)")
    return fields


def _upstream(fields: Mapping[str, Any], path: str) -> UpstreamConfig:
    address = fields["address"]
    if not isinstance(address, str):
        raise ConfigError(f"{path}.address", f"expected an address string, got "
                                             f"{describe_value(address)}")
    try:
        parsed = parse_address(address, listen=False)
    except AddressError as exc:
        raise ConfigError(path, str(exc)) from exc
    weight = fields.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ConfigError(f"{path}.weight", f"expected a whole number, got "
                                            f"{describe_value(weight)}")
    if not 0 <= weight <= MAX_WEIGHT:
        raise ConfigError(f"{path}.weight", f"must be 0-{MAX_WEIGHT} (0 = drained), got {weight}")
    backup = fields.get("backup", False)
    if not isinstance(backup, bool):
        raise ConfigError(f"{path}.backup", f"expected true or false, got "
                                            f"{describe_value(backup)}")
    return UpstreamConfig(parsed, weight=weight, backup=backup)


def _health(table: Mapping[str, Any], path: str) -> HealthConfig:
    """``[proxy.NAME.health]`` (already merged over ``[defaults.health]``)."""
    health = HealthConfig(**build_options(HealthConfig, table, path))
    for key in ("send", "expect"):
        text = getattr(health, key)
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate: only a dictionary holds one
            raise ConfigError(_join(path, key), f"{text!r} cannot be sent as UTF-8 (a lone "
                                                f"surrogate at position {exc.start})") from None
    try:
        health_bytes(health)
    except ValueError as exc:  # "send_hex: '0g': 'g' at character 2 is not ..."
        key, _, message = str(exc).partition(": ")
        raise ConfigError(_join(path, key), message) from None
    try:
        health_settings(health)
    except ValueError as exc:  # "timeout_s: must be more than 0; ..."
        key, _, message = str(exc).partition("; ")[0].partition(": ")
        if getattr(health, f"{key}_hex", ""):  # expect's bytes given as expect_hex
            key = f"{key}_hex"
        raise ConfigError(_join(path, key), message) from None
    return health


_HEX_KEYS = {"send_hex": "send", "expect_hex": "expect"}
"""Each hex key and the text key it stands in for: a table gives one of the two."""

_CHECK_KEYS = ("timeout_s", "rise", "fall", "send", "expect", "send_hex", "expect_hex")
"""The ``[proxy.NAME.health]`` keys of active checks alone: refused in a proxy's
own table while its ``interval_s`` is 0 (they would do nothing), and in
``[defaults.health]`` when no proxy checks (as ``unix_mode``)."""


def _checks_off(who: str) -> str:
    return (f"needs interval_s: active checks are off in {who} without it, so this key "
            "would do nothing")


def health_settings(health: HealthConfig) -> HealthSettings:
    """The health machine's settings for a validated ``[proxy.NAME.health]``.
    Raises :class:`ValueError` ("KEY: message") as :func:`health_bytes` and
    :class:`~midway.upstream.health.HealthSettings` do."""
    send, expect = health_bytes(health)
    return HealthSettings(
        interval_s=health.interval_s, timeout_s=health.timeout_s, rise=health.rise,
        fall=health.fall, send=send, expect=expect,
        eject_after=health.eject_after, eject_s=health.eject_s)


def health_bytes(health: HealthConfig) -> tuple[bytes, bytes]:
    """What a check sends and expects: ``send``/``expect`` as UTF-8, or
    ``send_hex``/``expect_hex`` decoded.  Raises :class:`ValueError`
    ("send_hex: message") for bad hex, or a text key and its hex key both set."""
    found = []
    for hex_key, text_key in _HEX_KEYS.items():
        hex_text, text = getattr(health, hex_key), getattr(health, text_key)
        if hex_text and text:
            raise ValueError(f"{hex_key}: give {text_key} (text) or {hex_key} (bytes in hex), "
                             "not both")
        try:
            found.append(parse_hex(hex_text) if hex_text else text.encode())
        except ValueError as exc:
            raise ValueError(f"{hex_key}: {exc}") from None
    return found[0], found[1]


def _merge_health(defaults: Mapping[str, Any], table: Mapping[str, Any]) -> dict[str, Any]:
    """``[proxy.NAME.health]`` over ``[defaults.health]``, key by key, except that
    a proxy's ``send`` replaces the defaults' ``send_hex`` and the other way
    round (likewise ``expect``): they are one setting written two ways."""
    merged = dict(defaults)
    for hex_key, text_key in _HEX_KEYS.items():
        if hex_key in table and text_key not in table:
            merged.pop(text_key, None)
        if text_key in table and hex_key not in table:
            merged.pop(hex_key, None)
    merged.update(table)
    return merged


def _check_access(kwargs: Mapping[str, Any], path: str) -> None:
    for key in ("allow", "deny"):
        try:
            AccessList.parse(**{key: kwargs.get(key, ())})
        except ValueError as exc:  # "deny[1]: '10.0.0.300' is not ..."
            index, _, message = str(exc).partition(": ")
            raise ConfigError(_join(path, index), message) from None


_TLS_KEY_SETS = (("tls_cert", TLS_TERMINATION_KEYS, "needs tls_cert (TLS termination)"),
                 ("upstream_tls", TLS_ORIGINATION_KEYS, "needs upstream_tls = true"))
"""The TLS options that need another: in a proxy's own table without it they are
refused (midway.layers.tls); inherited from ``[defaults]`` they are dropped, and
refused in ``[defaults]`` when no proxy has it (as ``proxy_protocol_trusted``)."""


_PHASE_TIMEOUTS: dict[str, tuple[Callable[[ProxyConfig], bool], str]] = {
    "proxy_protocol_timeout_s": (
        lambda p: p.proxy_protocol_in != "off",
        "needs proxy_protocol_in (v1, v2 or any): it bounds the reading of a PROXY "
        "header, and {who} reads none"),
    "sni_peek_timeout_s": (
        lambda p: bool(p.routes) and not p.tls_cert,
        "needs SNI routes ([[proxy.NAME.routes]], in a configuration file) without "
        "tls_cert: it bounds the peek at a TLS ClientHello, and {who} peeks at none (with "
        "tls_cert, routes take the handshake's server name, within tls_handshake_timeout_s)"),
    "tls_handshake_timeout_s": (
        lambda p: bool(p.tls_cert or p.upstream_tls),
        "needs tls_cert (termination) or upstream_tls = true: it bounds a TLS handshake, "
        "and {who} makes none"),
}
"""Timeouts of a phase a proxy may not have, whether it has it, and why the
timeout would do nothing without it: set in a proxy's own table they are refused
there (as ``unix_mode`` without a unix listener); inherited from ``[defaults]``
they are ignored, and refused in ``[defaults]`` when no proxy has the phase."""

_CAPTURE = "needs pcap (a capture file): it {what}, and {{who}} captures nothing"
_OUTPUT_LIMITS: dict[str, tuple[Callable[[ProxyConfig], bool], str]] = {
    "pcap_max_bytes": (lambda p: bool(p.pcap),
                       _CAPTURE.format(what="bounds the capture file before it rotates")),
    "pcap_keep": (lambda p: bool(p.pcap),
                  _CAPTURE.format(what="counts the rotated capture files kept")),
    "dump_max_bytes": (
        lambda p: p.dump != "off" or bool(p.dump_file),
        "needs dump (or dump_file): it bounds what the dump shows of each chunk, and "
        "{who} dumps nothing"),
}
"""The limits of an output a proxy may not write (a capture, a dump), refused
and ignored as :data:`_PHASE_TIMEOUTS` are."""


def _proxy(name: str, table: Mapping[str, Any], defaults: Mapping[str, Any]) -> ProxyConfig:
    path = f"proxy.{name}"
    problem = proxy_name_problem(name)
    if problem is not None:
        raise ConfigError(path, problem)
    opts = {f.name for f, _ in options_of(ProxyConfig)}
    kwargs: dict[str, Any] = {k: v for k, v in defaults.items() if k not in _PROXY_TABLES}
    rest = {}
    for key, value in table.items():
        if key in _PROXY_ONLY_KEYS or key in _PROXY_LISTS or key in _PROXY_TABLES \
                or key == _ROUTES:
            continue
        if key not in opts:
            raise _unknown(key, [*_PROXY_ONLY_KEYS, *_PROXY_LISTS, *_PROXY_TABLES, _ROUTES, *opts],
                           path, proxy=True)
        rest[key] = value
    kwargs.update(build_options(ProxyConfig, rest, path))
    for needs, keys, _ in _TLS_KEY_SETS:
        if not kwargs.get(needs):  # what [defaults] gave for TLS this proxy does not speak
            for key in keys:
                if key not in rest:
                    kwargs.pop(key, None)
    if "allow" in rest or "deny" in rest:
        _check_access(kwargs, path)
    health = _merge_health(defaults.get("health", {}),
                           _table(table.get("health", {}), _join(path, "health")))
    kwargs["health"] = _health(health, _join(path, "health"))
    own_health = table.get("health", {})
    for key in _CHECK_KEYS:
        if key in own_health and not kwargs["health"].interval_s:
            raise ConfigError(_join(path, f"health.{key}"), _checks_off("this proxy"))
    routes = _routes(table[_ROUTES], f"{path}.{_ROUTES}", kwargs.get("balance", "round_robin")) \
        if _ROUTES in table else ()
    for key in _PROXY_ONLY_KEYS:
        # With routes, the proxy's own upstreams are optional: they are the default
        # route, and without them a connection no route matches is closed.
        if key not in table and not (key == "upstreams" and routes):
            raise ConfigError(_join(path, key), "missing (required)")
    kwargs["listen"] = _addresses(table["listen"], f"{path}.listen", listen=True)
    upstreams = table.get("upstreams", [])
    kwargs["upstreams"] = () if routes and upstreams == [] else \
        _upstreams(upstreams, f"{path}.upstreams")
    if routes:
        kwargs["routes"] = routes
    _check_proxy_protocol(kwargs, path, own_trusted="proxy_protocol_trusted" in rest)
    if kwargs.get("unix_mode") and file_mode(kwargs["unix_mode"]) is None:
        raise ConfigError(_join(path, "unix_mode"), f"expected an octal mode such as \"660\", "
                                                    f"got {kwargs['unix_mode']!r}")
    if "unix_mode" in rest and rest["unix_mode"] and not _has_unix(kwargs["listen"]):
        raise ConfigError(_join(path, "unix_mode"), _unix_mode_unused("this proxy"))
    for key in ("tcp_keepalive_interval_s", "tcp_keepalive_probes"):
        if kwargs.get(key) and not kwargs.get("tcp_keepalive_s"):
            raise ConfigError(_join(path, key), "needs tcp_keepalive_s (the idle time before "
                                                "the first probe): keepalive is off without it")
    for key in _PROXY_LISTS:
        if key in table:
            parser = _LIST_PARSERS.get(key)
            if parser is None:  # nothing imported its owner yet: import it (it registers)
                importlib.import_module(_LIST_OWNERS[key])
                parser = _LIST_PARSERS[key]
            kwargs[key] = parser(table[key], _join(path, key), kwargs)
    config = ProxyConfig(name=name, **kwargs)
    for key, (has_phase, why) in (_PHASE_TIMEOUTS | _OUTPUT_LIMITS).items():
        if key in rest and not has_phase(config):
            raise ConfigError(_join(path, key), why.format(who="this proxy"))
    return config


def _has_unix(listen: typing.Iterable[Address]) -> bool:
    return any(address.is_unix for address in listen)


def _unix_mode_unused(who: str) -> str:
    return f"applies to unix: listeners only ({who} listens on TCP alone)"


def file_mode(text: str) -> int | None:
    """``unix_mode`` as permission bits (``"660"``, ``"0660"``, ``"0o660"``), or
    None when it is not an octal mode of at most 0o7777."""
    digits = text.removeprefix("0o")
    if not 3 <= len(digits) <= 4 or any(c not in "01234567" for c in digits):
        return None
    return int(digits, 8)


def _routes(value: Any, path: str, balance: str) -> tuple[RouteSpec, ...]:
    """``[[proxy.NAME.routes]]``: each table has ``sni`` (a pattern or a list of
    them), its own ``upstreams``, optionally ``balance`` (default: the proxy's)
    and ``name`` (default: its first pattern).  No pattern may appear twice in a
    proxy, nor a name."""
    # Imported here: layers.routes is the one definition of a pattern, and
    # importing it at the top would load midway.layers with the configuration.
    from ..layers.routes import RoutePatternError, normalize_pattern

    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"expected a non-empty list of tables ([[...routes]]), "
                                f"got {describe_value(value)}")
    out: list[RouteSpec] = []
    patterns: dict[str, str] = {}
    names: dict[str, str] = {}
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        route = _table(item, where)
        for key in route:
            if key not in _ROUTE_KEYS:
                raise _unknown(key, _ROUTE_KEYS, where)
        for key in ("sni", "upstreams"):
            if key not in route:
                raise ConfigError(f"{where}.{key}", "missing (required)")
        raw = route["sni"]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}.sni", "expected a host name pattern or a non-empty "
                                              f"list of them, got {describe_value(raw)}")
        sni = []
        for j, pattern in enumerate(items):
            at = f"{where}.sni" if isinstance(raw, str) else f"{where}.sni[{j}]"
            if not isinstance(pattern, str):
                raise ConfigError(at, f"expected a host name pattern, got {describe_value(pattern)}")
            try:
                name = normalize_pattern(pattern)
            except RoutePatternError as exc:
                raise ConfigError(at, str(exc)) from exc
            if name in patterns:
                raise ConfigError(at, f"{name!r} is already routed by {patterns[name]}")
            patterns[name] = where
            sni.append(name)
        route_balance = route.get("balance", balance)
        if not isinstance(route_balance, str) or route_balance not in BALANCERS:
            raise ConfigError(f"{where}.balance", f"{route_balance!r} is not one of: "
                                                  f"{', '.join(BALANCERS)}")
        label = route.get("name", sni[0])  # a pattern needs no check as a name
        if "name" in route and (not isinstance(label, str)
                                or proxy_name_problem(label) is not None):
            raise ConfigError(f"{where}.name", "a route name is 1-64 letters, digits, '_', "
                                               "'.', '-' or ':'")
        if label in names:
            raise ConfigError(f"{where}.name", f"{label!r} already names {names[label]}")
        names[label] = where
        files = {}
        for key in ("tls_cert", "tls_key"):
            if key in route:
                if not isinstance(route[key], str) or not route[key]:
                    raise ConfigError(f"{where}.{key}", "expected a file's path, got "
                                                        f"{describe_value(route[key])}")
                files[key] = route[key]
        if "tls_key" in files and "tls_cert" not in files:
            raise ConfigError(f"{where}.tls_key", "needs the route's tls_cert")
        out.append(RouteSpec(name=label, sni=tuple(sni), balance=route_balance,
                             upstreams=_addresses(route["upstreams"], f"{where}.upstreams",
                                                  listen=False), **files))
    return tuple(out)


def _check_proxy_protocol(options: Mapping[str, Any], path: str, own_trusted: bool) -> None:
    """``proxy_protocol_trusted``: valid networks, some when a header is expected
    (a PROXY header from anyone would let anyone choose their address), and none
    in a proxy's own table that reads no header (where the list would do nothing).
    A list inherited from ``[defaults]`` may go unused by some proxies:
    :func:`config_from_dict` checks that one proxy uses it."""
    from ..upstream.access import parse_network

    trusted = options.get("proxy_protocol_trusted", ())
    for i, rule in enumerate(trusted):
        try:
            parse_network(rule)
        except ValueError as exc:
            raise ConfigError(f"{path}.proxy_protocol_trusted[{i}]", str(exc)) from exc
    if options.get("proxy_protocol_in", "off") != "off" and not trusted \
            and not all(a.is_unix for a in options["listen"]):
        raise ConfigError(f"{path}.proxy_protocol_trusted",
                          "required when proxy_protocol_in is on: the networks of the load "
                          "balancers allowed to send a PROXY header (e.g. [\"10.0.0.0/8\"]); "
                          "a header from anyone would let anyone choose their address")
    if own_trusted and trusted and options.get("proxy_protocol_in", "off") == "off":
        raise ConfigError(f"{path}.proxy_protocol_trusted", _trusted_unused(""))


def _trusted_unused(where: str) -> str:
    return (f"set, but proxy_protocol_in is off{where}: no PROXY header is read, so the "
            "trusted networks would do nothing; set proxy_protocol_in (v1, v2 or any) "
            "or remove proxy_protocol_trusted")


def _families(address: Address) -> set[str]:
    """Address families a listener occupies ("" and "::" listen dual-stack)."""
    if address.host in ("", "::"):
        return {"v4", "v6"}
    if address.is_ip_literal:
        return {"v6"} if ":" in address.host else {"v4"}
    return {"v4", "v6"}  # a host name: it may resolve to either


def listeners_conflict(a: Address, b: Address) -> bool:
    """Whether two listeners cannot both bind (same port, overlapping addresses)."""
    if a.is_unix or b.is_unix:
        return a.path == b.path
    if a.port != b.port or a.port == 0 or not _families(a) & _families(b):
        return False
    wildcard = ("", "0.0.0.0", "::")
    return a.host == b.host or a.host in wildcard or b.host in wildcard


def _check_listeners(proxies: list[ProxyConfig]) -> None:
    seen: list[tuple[str, Address]] = []
    for p in proxies:
        for i, addr in enumerate(p.listen):
            for where, other in seen:
                if listeners_conflict(addr, other):
                    raise ConfigError(
                        f"proxy.{p.name}.listen[{i}]",
                        f"{addr} conflicts with {other} already used by {where}",
                    )
            seen.append((f"proxy.{p.name}", addr))


def check_admin(server: ServerConfig) -> None:
    """The admin API has no authentication: loopback only, unless told otherwise.
    Raises :class:`ConfigError` for ``server.admin``."""
    if not server.admin:
        return
    try:
        address = parse_address(server.admin, listen=True, unix=False)
    except AddressError as exc:
        raise ConfigError("server.admin", str(exc)) from exc
    if address.is_unix:
        raise ConfigError("server.admin", "the admin API listens on TCP: give host:port")
    if not server.admin_allow_remote and not _is_loopback(address.host):
        raise ConfigError("server.admin", f"{server.admin!r} is not a loopback address, where "
                                          "anyone who reaches it controls every proxy; set "
                                          "admin_allow_remote (--admin-allow-remote), and an "
                                          "admin token, to serve it there anyway")
    if server.admin_token and server.admin_token_file:
        raise ConfigError("server.admin_token_file", "give admin_token or admin_token_file, "
                                                     "not both")


def check_admin_port(server: ServerConfig) -> None:
    """The admin API's port is one this process may bind (see
    :func:`~.addresses.privileged_port`), on a host name that resolves.  Raises :class:`ConfigError` for
    ``server.admin``."""
    if not server.admin:
        return
    address = parse_address(server.admin, listen=True)
    if why := privileged_port(address.port):
        raise ConfigError("server.admin", f"cannot listen on {server.admin}: {why}")
    try:
        resolve_listen(address)
    except AddressError as exc:
        raise ConfigError("server.admin", f"cannot listen on {server.admin}: {exc}") from exc


def admin_token(server: ServerConfig) -> str:
    """The admin token in force: ``admin_token``, or the first line of
    ``admin_token_file`` (read now), or ``""`` for none.  Raises
    :class:`ConfigError` if the file cannot be read or holds no token."""
    if not server.admin_token_file:
        return server.admin_token
    path = server.admin_token_file
    try:
        with open(path, encoding="utf-8") as file:
            token = file.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("server.admin_token_file", f"cannot read {path}: {reason}") from exc
    if not token:
        raise ConfigError("server.admin_token_file", f"{path}: the first line is empty "
                                                     "(expected the token)")
    return token


def check_workers(server: ServerConfig, proxies: typing.Iterable[ProxyConfig]) -> None:
    """The one rule that needs a single process: a unix-socket listener (Linux
    has no SO_REUSEPORT for unix sockets, so workers cannot share one).  Raises
    :class:`ConfigError` naming the listener."""
    if server.workers == 1:
        return
    for proxy in proxies:
        for i, address in enumerate(proxy.listen):
            if address.is_unix:
                raise ConfigError(f"proxy.{proxy.name}.listen[{i}]",
                                  f"{address}: unix-socket listeners need workers = 1")


def _no_folder(folder: str) -> str:
    """Why no file can be made in ``folder`` because of the folder itself: it is
    not there ("no directory FOLDER"), or a directory on the way may not be
    looked into ("permission denied", as opening the file would say); "" else."""
    try:
        if stat.S_ISDIR(os.stat(folder).st_mode):
            return ""
    except PermissionError:
        return "permission denied"
    except OSError:
        pass
    return f"no directory {folder}"


def check_writable(path: str, key: str) -> None:
    """Whether a file midway will open for writing (appending or replacing) can
    be, checked without creating it: its directory exists and may be written,
    and it is not itself a directory.  Raises :class:`ConfigError` at ``key``."""
    folder = os.path.dirname(os.path.abspath(path))
    if why := _no_folder(folder):
        raise ConfigError(key, f"cannot write {path}: {why}")
    if os.path.isdir(path):
        raise ConfigError(key, f"cannot write {path}: it is a directory")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise ConfigError(key, f"cannot write {path}: permission denied")


def check_listen_paths(proxy: ProxyConfig) -> None:
    """Each listener can be made, as far as is known without binding: a TCP port
    below 1024 only with the privilege to bind it, its host name resolves (as a
    start resolves it: :func:`~.addresses.resolve_listen`); a unix socket's directory
    exists and may be written, and nothing but a socket (a stale one is replaced) is there.  Raises
    :class:`ConfigError` at the proxy's ``listen``."""
    where = f"proxy.{proxy.name}.listen"
    for address in proxy.listen:
        if not address.is_unix and (why := privileged_port(address.port)):
            raise ConfigError(where, f"cannot listen on {address}: {why}")
        if not address.is_unix:
            try:
                resolve_listen(address)
            except AddressError as exc:
                raise ConfigError(where, f"cannot listen on {address}: {exc}") from exc
        if not address.is_unix or not address.path:
            continue
        folder = os.path.dirname(os.path.abspath(address.path))
        why = _no_folder(folder)
        if not why and not os.access(folder, os.W_OK | os.X_OK):  # to make the socket file
            why = "permission denied"
        if why:
            raise ConfigError(where, f"cannot listen on {address}: {why}")
        if os.path.exists(address.path) and not stat.S_ISSOCK(os.stat(address.path).st_mode):
            raise ConfigError(where, f"cannot listen on {address}: {address.path} exists and "
                              "is not a socket (midway replaces only a stale socket)")


def check_resolved_listeners(proxies: typing.Iterable[ProxyConfig]) -> None:
    """Listeners that name a host conflict with any other that resolves to the
    same address and port, as binding them would (``localhost:6380`` and
    ``127.0.0.1:6380``; the configuration compares what was written).  Raises
    :class:`ConfigError` at the second listener."""
    seen: list[tuple[str, Address, Any]] = []
    for proxy in proxies:
        for i, address in enumerate(proxy.listen):
            if address.is_unix or address.port == 0:
                continue
            try:
                bound = _bound(address)
            except AddressError:
                continue  # check_listen_paths says so
            for where, other, other_bound in seen:
                if bound == other_bound and not (address.is_ip_literal and other.is_ip_literal):
                    raise ConfigError(f"proxy.{proxy.name}.listen[{i}]",
                                      f"{address} conflicts with {other} already used by "
                                      f"{where} (both are {bound[1]})")
            seen.append((f"proxy.{proxy.name}", address, bound))


def _bound(address: Address) -> tuple[int, str, int]:
    """What TCP ``address`` binds, as (family, host, port).  Raises
    :class:`AddressError` when its name does not resolve."""
    family, sockaddr, _ = resolve_listen(address)
    return family, str(sockaddr[0]), address.port


def check_admin_listeners(server: ServerConfig, proxies: typing.Iterable[ProxyConfig]) -> None:
    """The admin API's address is no proxy's listener: both could not bind
    (``127.0.0.1:8474`` and ``:8474`` too, or a name that resolves to it).
    Raises :class:`ConfigError` for ``server.admin``."""
    if not server.admin:
        return
    admin = parse_address(server.admin, listen=True)
    try:
        admin_bound = _bound(admin) if admin.port else None
    except AddressError:
        admin_bound = None  # check_admin_port says so
    for proxy in proxies:
        for i, address in enumerate(proxy.listen):
            same = listeners_conflict(admin, address)
            if not same and admin_bound and not address.is_unix and address.port:
                try:
                    same = _bound(address) == admin_bound
                except AddressError:
                    pass  # check_listen_paths says so
            if same:
                raise ConfigError("server.admin",
                                  f"{server.admin} conflicts with {address}, the listen "
                                  f"address of proxy {proxy.name} (proxy.{proxy.name}.listen"
                                  f"[{i}]): give the admin API a port of its own")


def check_server_outputs(server: ServerConfig) -> None:
    """The files of ``[server]`` can be opened: the access log.  (Each proxy's
    files are checked by :func:`midway.chain.registry.check_elements`.)"""
    if server.access_log and server.access_log != "-":
        check_writable(server.access_log, "server.access_log")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(unmapped(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document (or an equivalent dictionary)."""
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown(key, _TOP_KEYS, "")
    server = ServerConfig(**build_options(ServerConfig, _table(data.get("server", {}), "server"), "server"))
    check_admin(server)
    defaults_table = _table(data.get("defaults", {}), "defaults")
    for key in (*_PROXY_ONLY_KEYS, *_PROXY_LISTS, _ROUTES):
        if key in defaults_table:
            raise ConfigError(f"defaults.{key}", "belongs in each [proxy.NAME] table")
    defaults: dict[str, Any] = build_options(
        ProxyConfig, {k: v for k, v in defaults_table.items() if k not in _PROXY_TABLES},
        "defaults")
    _check_access(defaults, "defaults")
    if "health" in defaults_table:
        health = _table(defaults_table["health"], "defaults.health")
        _health(health, "defaults.health")  # its errors name [defaults.health]
        defaults["health"] = health
    proxies_table = _table(data.get("proxy", {}), "proxy")
    proxies = [
        _proxy(name, _table(table, f"proxy.{name}"), defaults)
        for name, table in proxies_table.items()
    ]
    if defaults.get("proxy_protocol_trusted") and proxies \
            and all(p.proxy_protocol_in == "off" for p in proxies):
        raise ConfigError("defaults.proxy_protocol_trusted",
                          _trusted_unused(" in every proxy"))
    if defaults.get("unix_mode") and proxies \
            and not any(_has_unix(p.listen) for p in proxies):
        raise ConfigError("defaults.unix_mode", _unix_mode_unused("every proxy"))
    for key in _CHECK_KEYS:
        if key in defaults.get("health", {}) and proxies \
                and not any(p.health.interval_s for p in proxies):
            raise ConfigError(f"defaults.health.{key}", _checks_off("every proxy"))
    for key, (has_phase, why) in (_PHASE_TIMEOUTS | _OUTPUT_LIMITS).items():
        if key in defaults and proxies and not any(has_phase(p) for p in proxies):
            raise ConfigError(f"defaults.{key}", why.format(who="every proxy"))
    plain = ProxyConfig()
    for needs, keys, words in _TLS_KEY_SETS:
        unused = [k for k in keys if k in defaults and defaults[k] != getattr(plain, k)]
        if unused and proxies and not any(getattr(p, needs) for p in proxies):
            raise ConfigError(f"defaults.{unused[0]}", f"{words} in one proxy")
    # TOML itself rejects a table defined twice, so names are unique here; a dict
    # built by code is unique by construction too.
    _check_listeners(proxies)
    check_workers(server, proxies)
    return Config(server=server, proxies=tuple(proxies))
