"""The command line: ``midway LISTEN UPSTREAM [UPSTREAM ...] [options]`` or
``midway --config FILE``.

Flags are generated from the configuration schema, so the command line, the TOML
keys and the reference documentation cannot drift apart.  Only this module turns
errors into exit codes: 0 after a clean stop, 1 when serving could not start (a
listener could not bind), 2 for a bad command line or configuration, 130 for
Ctrl-C before serving began.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import logging
import os
import sys
import textwrap
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from ._version import __version__
from .chain.registry import check_elements
from .chain.toxics.config import toxic_table_from_spec
from .config.load import (
    admin_token,
    build_options,
    check_admin,
    check_admin_listeners,
    check_admin_port,
    check_listen_paths,
    check_resolved_listeners,
    check_server_outputs,
    check_workers,
    config_from_dict,
    load_config,
)
from .config.schema import Config, HealthConfig, OptionInfo, ProxyConfig, ServerConfig, options_of
from .control.process import EXIT_OK, EXIT_START_FAILED, loop_factory, serve, setup_logging
from .errors import ConfigError, ListenError
from .layers.tls import certificate_warnings, check_tls
from .workers import run_supervisor, worker_count

__all__ = ["main", "build_parser", "preflight", "load", "loop_factory"]

log = logging.getLogger("midway")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (SIGINT) before serving: 128 + 2, as a shell reports it.
(Serving, SIGINT drains and stops cleanly: exit 0.)"""

SUBCOMMANDS = {
    "replay": ("CAPTURE [options]", "serve a --pcap capture as a fake upstream"),
    "connections": ("[options]", "list a running midway's open connections"),
    "top": ("[options]", "watch a running midway in the terminal"),
}
"""``midway NAME ...`` is handed to ``midway.NAME.main`` (see :func:`_subcommand`),
which has flags of its own; with the synopsis and what it does, for ``midway --help``."""

_USAGE = ("midway LISTEN UPSTREAM [UPSTREAM ...] [options]\n       midway --config FILE [--check]"
          "\n       midway --admin HOST:PORT          (like toxiproxy-server)"
          f"\n       midway {{{','.join(SUBCOMMANDS)}}} ...  (midway SUBCOMMAND --help)")
_SUBCOMMAND_HELP = "\n".join(f"  {f'midway {name} {synopsis}':<32} {what}"
                              for name, (synopsis, what) in SUBCOMMANDS.items())
_EPILOG = f"""subcommands (each has its own options: midway SUBCOMMAND --help):
{_SUBCOMMAND_HELP}

""" + r"""addresses: host:port, [ipv6]:port, :port (every interface) or unix:/path.
examples:
  midway 127.0.0.1:8080 127.0.0.1:80
  midway [::]:6380 redis.internal:6379
  midway :8000 10.0.0.5:8000 10.0.0.6:8000      (round-robin)
  midway :6380 10.0.0.5:6379 10.0.0.6:6379,weight=3 10.0.0.7:6379,backup \
         --balance least_connections --health-interval-s 2 \
         --health-send 'PING\r\n' --health-expect +PONG
  midway :5433 10.0.0.5:5432 --health-interval-s 2 \
         --health-send-hex '00 00 00 08 04 d2 16 2f' --health-expect-hex 4e
                                                (PostgreSQL's SSLRequest; 'N': no TLS)
  midway 127.0.0.1:6380 127.0.0.1:6379 --toxic latency:latency=100,jitter=10
  midway --admin 127.0.0.1:8474                 (Toxiproxy's HTTP API)
  midway --config midway.toml"""


_FLAG_NAMES = {f.name: info.flag for cls in (ProxyConfig, ServerConfig)
               for f, info in options_of(cls) if info.flag}
"""Options whose flag is not named after the key (``hooks`` → ``--hook``)."""


_HEALTH = "health."
"""The ``dest`` prefix of the ``[proxy.NAME.health]`` flags (``--health-interval-s``)."""



def _relay_kind() -> str:
    """How plain connections are relayed here (docs: README, Install)."""
    from .core import accel
    if accel.AVAILABLE:
        return "compiled relay"
    if os.environ.get(accel.ENV_PURE, "") not in ("", "0"):
        return f"pure Python: {accel.ENV_PURE} is set"
    return "pure Python: the relay is not compiled"


def _flag(name: str) -> str:
    """The flag of option ``name`` (an index such as ``hooks[1]`` is ignored;
    ``health.KEY`` is ``--health-KEY``)."""
    key = name.partition("[")[0]
    if key.startswith(_HEALTH):
        return "--health-" + key.removeprefix(_HEALTH).replace("_", "-")
    return "--" + _FLAG_NAMES.get(key, key).replace("_", "-")


def _help(info: OptionInfo, default: Any) -> str:
    text = info.doc
    if info.choices:
        text += f" One of: {', '.join(info.choices)}."
    if info.const is not None:
        text += f" Given alone: {info.const}."
    word = next((w for w, value in info.words if value == default), None)
    if isinstance(default, bool):
        text += f" Default: {'on' if default else 'off'}."
    elif word is not None:  # retries: all, not the -1 that stands for it
        text += f" Default: {word}."
    elif default not in ("", ()):
        unit = f" {info.unit}" if info.unit else ""
        text += f" Default: {default:g}{unit}." if isinstance(default, float) else f" Default: {default}{unit}."
    if info.zero and isinstance(default, str | tuple):  # as docs/configuration.md says it
        text += f" Empty ('', the default): {info.zero.removeprefix('(empty) ')}."
    elif info.zero:
        text += f" 0: {info.zero}."
    return text.replace("%", "%%")


class _TypedInt(int):
    """A whole-number flag's value, shown as typed (see :func:`_number`)."""
    text = ""

    def __repr__(self) -> str:
        return self.text


class _TypedFloat(float):
    """A number flag's value, shown as typed (see :func:`_number`)."""
    text = ""

    def __repr__(self) -> str:
        return self.text


def _number(kind: type) -> Any:
    """An argparse type for a number flag: ``kind``'s value, which a refusal
    quotes as typed (``got 1e10``, ``got -1``; not ``got 10000000000.0``)."""
    typed = _TypedInt if kind is int else _TypedFloat

    def convert(text: str) -> Any:
        value = typed(text)
        value.text = text
        return value
    convert.__name__ = kind.__name__  # argparse's words: "invalid float value: 'abc'"
    return convert


def _with_words(kind: Any, words: dict[str, Any]) -> Any:
    """An argparse type that also accepts the option's words (e.g. ``auto``),
    and says so when given neither."""
    parse = _number(kind)

    def convert(text: str) -> Any:
        if text in words:
            return words[text]
        try:
            return parse(text)
        except ValueError:
            number = "a whole number" if kind is int else "a number"
            alternatives = " or ".join(repr(w) for w in words)
            raise argparse.ArgumentTypeError(
                f"expected {number} or {alternatives}, got {text!r}") from None
    convert.__name__ = kind.__name__
    return convert


def _add_schema_flags(group: argparse._ArgumentGroup, cls: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for field, info in options_of(cls):
        if not info.cli:
            continue
        kind = hints[field.name]
        kwargs: dict[str, Any] = {"dest": prefix + field.name, "default": argparse.SUPPRESS,
                                  "help": _help(info, field.default)}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:  # a list: the flag once per item
            kwargs["action"] = "append"
            kwargs["metavar"] = info.metavar or None
        else:
            kwargs["type"] = (_with_words(kind, dict(info.words)) if info.words
                              else _number(kind) if kind in (int, float) else kind)
            kwargs["metavar"] = info.metavar or ("|".join(info.choices) if info.choices else None)
            if info.const is not None:
                kwargs["nargs"] = "?"
                kwargs["const"] = info.const
        group.add_argument(_flag(prefix + field.name), **kwargs)


_FILE_ONLY = {_flag(f.name): f.name for cls in (ProxyConfig, ServerConfig)
              for f, info in options_of(cls) if not info.cli}
"""The flags of the options that only a configuration file sets (``cli=False``),
each to its key: typed anyway, the error says where the option goes."""


class _Parser(argparse.ArgumentParser):
    """argparse, naming the closest flag for a mistyped one, as a mistyped key of
    the file gets the closest key."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [w.partition("=")[0] for w in message.removeprefix(prefix).split()
                     if w.startswith("--")]
            close = difflib.get_close_matches(flags[0], self._option_string_actions, n=1) \
                if flags else []
            key = _FILE_ONLY.get(flags[0]) if flags else None
            if key is not None:  # an option the quick form has no use for
                message = (f"{flags[0]}: not a flag of the quick form; set {key} in a "
                           "configuration file (--config FILE, docs/configuration.md)")
            elif close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help lines that break at spaces only: not inside a flag (``--tcp-`` /
    ``keepalive-s``) or a mode (``srwxr-`` / ``xr-x``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="midway", usage=_USAGE, epilog=_EPILOG,
        description="A TCP proxy: every client connection gets its own upstream connection.",
        formatter_class=_Formatter,
    )
    parser.add_argument("addresses", nargs="*", metavar="LISTEN UPSTREAM",
                        help="where to listen, then one or more upstreams")
    parser.add_argument("-c", "--config", metavar="FILE", help="read proxies from a TOML file")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit (0 when valid)")
    parser.add_argument("--version", action="version",
                        version=f"midway {__version__} ({_relay_kind()})")
    proxy_group = parser.add_argument_group("proxy options (quick form)")
    _add_schema_flags(proxy_group, ProxyConfig)
    _add_schema_flags(parser.add_argument_group(
        "health checks (quick form; the [proxy.NAME.health] table)"), HealthConfig, _HEALTH)
    proxy_group.add_argument(
        "--toxic", action="append", metavar="SPEC", default=argparse.SUPPRESS,
        help="Inject a fault, e.g. 'latency:latency=100,jitter=10,stream=downstream' "
             "(TYPE:KEY=VALUE,...; repeatable; see docs/faults.md).")
    _add_schema_flags(parser.add_argument_group("server options"), ServerConfig)
    # Not a flag, on purpose: a secret on a command line is in every user's `ps`.
    # Declared, so that argparse does not take it for --admin-token-file.
    parser.add_argument("--admin-token", action=_RefuseSecret, nargs="?",
                        help=argparse.SUPPRESS)
    return parser


class _RefuseSecret(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error("--admin-token: not a flag (other users could read it in the process "
                     "list); use --admin-token-file PATH, or admin_token in the file's "
                     "[server] table")


def _split(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    proxy_keys = {f.name for f, _ in options_of(ProxyConfig)}
    server_keys = {f.name for f, info in options_of(ServerConfig) if info.cli}
    given = vars(args)
    proxy = {k: given[k] for k in proxy_keys if k in given}
    health = {}
    for key, value in given.items():
        if key.startswith(_HEALTH):
            try:
                health[key.removeprefix(_HEALTH)] = (
                    _unescape(value) if isinstance(value, str) and not key.endswith("_hex")
                    else value)
            except ValueError as exc:
                raise ConfigError("", f"{_flag(key)}: {exc}") from None
    for text_key in ("send", "expect"):
        if health.get(text_key) and health.get(f"{text_key}_hex"):
            raise ConfigError("", f"{_flag(_HEALTH + text_key + '_hex')}: give "
                                  f"{_flag(_HEALTH + text_key)} (text) or "
                                  f"{_flag(_HEALTH + text_key + '_hex')} (bytes in hex), not both")
    if health:
        proxy["health"] = health
    server = {k: given[k] for k in server_keys if k in given}
    return proxy, server


_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b", '"': '"',
            "\\": "\\"}
"""TOML's basic-string escapes (TOML 1.0, and 1.1's ``\\e``), for the health flags."""


def _unescape(text: str) -> str:
    """A ``--health-send``/``--health-expect`` value with TOML's escapes decoded
    (``PING\\r\\n``, ``\\u00ff``), so the flag means what the file's key means."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\" or i + 1 == len(text):
            out.append(c)
            i += 1
            continue
        e = text[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            digits = {"x": 2, "u": 4, "U": 8}[e]
            code = text[i + 2:i + 2 + digits]
            if len(code) != digits or any(d not in "0123456789abcdefABCDEF" for d in code):
                raise ValueError(f"{text!r}: \\{e} needs {digits} hex digits")
            point = int(code, 16)
            if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:  # as TOML refuses them
                raise ValueError(f"{text!r}: \\{e}{code} is not a Unicode scalar value")
            out.append(chr(point))
            i += 2 + digits
        else:
            raise ValueError(f"{text!r}: unknown escape \\{e} (TOML's: \\b \\t \\n "
                                  "\\f \\r \\e \\\" \\\\ \\xHH \\uHHHH \\UHHHHHHHH)")
    return "".join(out)


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the configuration from parsed arguments (raises ConfigError)."""
    proxy_opts, server_opts = _split(args)
    toxics: list[str] = getattr(args, "toxic", [])
    if args.config:
        if args.addresses:
            raise ConfigError("", "give either LISTEN UPSTREAM addresses or --config, not both")
        if toxics:
            raise ConfigError("", "--toxic: with --config, declare toxics in the file "
                                  "([[proxy.NAME.toxics]] tables)")
        if proxy_opts:
            flags = ", ".join(_flag(k) for k in sorted(proxy_opts))
            raise ConfigError("", f"{flags}: with --config, set proxy options in the file "
                                  "(a [defaults] table applies to every proxy)")
        config = load_config(args.config)
        if server_opts:
            try:
                checked = build_options(ServerConfig, server_opts, "server")
            except ConfigError as exc:
                raise ConfigError("", f"{_flag(exc.path.rsplit('.', 1)[-1])}: {exc.message}") from exc
            config = dataclasses.replace(config, server=dataclasses.replace(config.server, **checked))
            try:
                check_admin(config.server)
            except ConfigError as exc:
                raise ConfigError("", f"--admin: {exc.message}") from exc
        return config
    if not args.addresses and server_opts.get("admin"):
        # toxiproxy-server mode: no proxy yet, the admin API creates them.
        if proxy_opts or toxics:
            flags = ", ".join(_flag(k) for k in sorted(proxy_opts)) or "--toxic"
            raise ConfigError("", f"{flags}: needs LISTEN UPSTREAM (with --admin alone, "
                                  "create proxies through the API)")
        try:
            return config_from_dict({"server": server_opts})
        except ConfigError as exc:
            raise _as_cli_error(exc, "", []) from exc
    if not args.addresses:
        raise ConfigError("", "need a LISTEN address and at least one UPSTREAM "
                              "(e.g. midway 127.0.0.1:8080 127.0.0.1:80), or --config FILE")
    if len(args.addresses) == 1:
        listen = args.addresses[0]
        raise ConfigError("", f"no UPSTREAM after LISTEN {listen!r}: give at least one UPSTREAM "
                              f"address to forward to (e.g. midway {listen} 127.0.0.1:80)")
    listen, *upstreams = args.addresses
    table = {"listen": [listen], "upstreams": upstreams, **proxy_opts}
    if toxics:
        table["toxics"] = [toxic_table_from_spec(spec) for spec in toxics]
    try:
        return config_from_dict({"server": server_opts, "proxy": {"default": table}})
    except ConfigError as exc:
        raise _as_cli_error(exc, listen, upstreams, toxics) from exc


def _as_cli_error(exc: ConfigError, listen: str, upstreams: list[str],
                  toxics: Sequence[str] = ()) -> ConfigError:
    """Name the flag or argument the user typed instead of a config key path."""
    if ".toxics[" in exc.path:  # proxy.default.toxics[N].attributes.latency
        index_text, _, key = exc.path.split(".toxics[", 1)[1].partition("]")
        spec = toxics[int(index_text)]
        return ConfigError("", f"--toxic {spec!r}: {key.lstrip('.')}: {exc.message}")
    if ".health." in exc.path:  # proxy.default.health.interval_s
        return ConfigError("", f"{_flag(_HEALTH + exc.path.rsplit('.', 1)[-1])}: {exc.message}")
    if ".upstreams" in exc.path:  # proxy.default.upstreams[2].weight
        tail = exc.path.split(".upstreams", 1)[1]
        index = int(tail[1:tail.index("]")]) if tail.startswith("[") else 0
        field = tail.partition("].")[2]
        message = f"{field}: {exc.message}" if field else exc.message
        if not message.startswith(repr(upstreams[index])):
            message = f"{upstreams[index]!r}: {message}"
        return ConfigError("", f"UPSTREAM {message}")
    key = exc.path.rsplit(".", 1)[-1]
    if key.startswith(("listen", "upstreams")):
        index = int(key[key.find("[") + 1:-1]) if "[" in key else 0
        what, value = ("LISTEN", listen) if key.startswith("listen") else ("UPSTREAM", upstreams[index])
        message = exc.message
        if not message.startswith((repr(value), f"{value}: ")):  # named once
            message = f"{value!r}: {message}"
        return ConfigError("", f"{what} {message}")
    return ConfigError("", f"{_flag(key)}: {exc.message}")


def preflight(config: Config, args: argparse.Namespace) -> None:
    """Everything that would stop a start and can be known without binding,
    for ``--check``, a start and a reload alike: hooks import (anew), every
    output file (access log, dump, capture) can be written, the admin token
    can be read and its port bound, every listen host name resolves, TLS certificates, keys and CAs load, the event loop asked for is installed, what the workers
    cannot share is not asked of them.  An error names what the user typed:
    the flag when it came from the command line, the key when it came from the
    file.  Raises :class:`ConfigError`."""
    try:
        check_server_outputs(config.server)
        check_admin_port(config.server)
        admin_token(config.server)
        check_workers(config.server, config.proxies)
        for proxy in config.proxies:
            check_listen_paths(proxy)
            check_elements(proxy)
            check_tls(proxy)
        check_resolved_listeners(config.proxies)
        check_admin_listeners(config.server, config.proxies)
    except ConfigError as exc:
        typed = _as_typed(exc, args)
        if typed is exc:
            raise
        raise typed from exc
    loop_factory(config.server.loop)


def _as_typed(exc: ConfigError, args: argparse.Namespace) -> ConfigError:
    """``exc`` naming the flag when the value came from the command line (as
    ``exc`` itself when it came from the file)."""
    key = exc.path.rsplit(".", 1)[-1]
    typed = (key.partition("[")[0] in _split(args)[1] if exc.path.startswith("server.")
             else not args.config)
    if typed and key.startswith("listen"):  # LISTEN, whose address the message names
        return ConfigError("", exc.message)
    if typed:
        return ConfigError("", f"{_flag(key)}: {exc.message}")
    return exc


def _proxies(count: int) -> str:
    return "1 proxy" if count == 1 else f"{count} proxies"


def load(args: argparse.Namespace) -> Config:
    """The configuration the arguments name, validated in full: what ``--check``
    reports, a start runs and a reload applies (one function for the three).
    Raises :class:`ConfigError` naming the key, or the flag typed."""
    config = config_from_args(args)
    if not config.proxies and not config.server.admin:
        raise ConfigError("", "the configuration defines no proxy ([proxy.NAME] tables)")
    preflight(config, args)
    return config


def _subcommand(name: str, argv: list[str]) -> int:
    """``midway NAME ARGS``: a command of its own, imported only when asked for."""
    if name == "replay":  # a fake upstream: midway.replay
        from .replay import main as replay_main
        return replay_main(argv)
    if name == "connections":  # reads a running midway's admin API
        from .connections import main as connections_main
        return connections_main(argv)
    if name == "top":  # the same API, live in the terminal
        from .top import main as top_main
        return top_main(argv)
    raise ValueError(f"not a subcommand: {name!r}")  # SUBCOMMANDS lists one without a branch


def _not_an_address(word: str) -> str:
    """What is wrong with a first argument that is neither a flag, nor a
    subcommand, nor an address (every address form has a colon): a mistyped
    subcommand (``midway tpo``), ``midway help``; "" for anything else."""
    if word.startswith("-") or ":" in word:
        return ""
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1)
    if close:
        return f"unknown subcommand {word!r}; did you mean 'midway {close[0]}'?"
    return (f"{word!r} is neither a subcommand ({', '.join(SUBCOMMANDS)}) nor a LISTEN "
            "address (host:port, [ipv6]:port, :port or unix:/path); midway --help shows "
            "the usage")


def main(argv: Sequence[str] | None = None) -> int:
    """``midway ...``; Ctrl-C before serving (while hooks import, names resolve,
    a subcommand waits) exits :data:`EXIT_INTERRUPTED`, without a traceback."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _main(argv: list[str]) -> int:
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    if argv[:1] and not {"-h", "--help"} & set(argv) and (problem := _not_an_address(argv[0])):
        print(f"midway: {problem}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load(args)
        factory = loop_factory(config.server.loop)
    except ConfigError as exc:
        print(f"midway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        for proxy in config.proxies:  # what a start would log: served, but refused
            for warning in certificate_warnings(proxy):
                print(f"midway: warning: {warning}", file=sys.stderr)
        names = ", ".join(p.name for p in config.proxies) or "none yet; admin API"
        print(f"midway: configuration OK ({_proxies(len(config.proxies))}: {names})")
        return EXIT_OK
    setup_logging(config.server.log_level)
    # A reload reads the file again, with the same command-line flags on top.
    loader = (lambda: load(args)) if args.config else None
    try:
        workers = worker_count(config.server.workers)
        if workers > 1:
            return run_supervisor(config, workers, loader)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(serve(config, loader, lambda exc: _as_typed(exc, args)))
    except (ListenError, ConfigError) as exc:
        log.error("%s", exc)
        return EXIT_START_FAILED if isinstance(exc, ListenError) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
