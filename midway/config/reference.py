"""The configuration reference, ``docs/configuration.md``, generated from the schema.

Every option row comes from an :func:`~midway.config.schema.option` declaration, so
the reference cannot promise what the loader and the command line do not do.  Only
``listen`` and ``upstreams`` are described by hand here: they are required keys of
each proxy, not options with a default.

Regenerate the file with::

    python -m midway.config.reference > docs/configuration.md

``tests/config/test_config_reference.py`` fails when the file and the schema disagree.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import MISSING, Field
from typing import Any

from .schema import HealthConfig, OptionInfo, ProxyConfig, ServerConfig, UpstreamConfig, options_of

__all__ = ["render_reference", "EXAMPLE_TOML"]

REGENERATE = "python -m midway.config.reference > docs/configuration.md"

EXAMPLE_TOML = """\
[server]
drain_timeout_s = 10
access_log = "-"                  # one JSON line per connection on standard output

[defaults]                        # every proxy inherits these
connect_timeout_s = 3
idle_timeout_s = 600

[proxy.redis]
listen = "127.0.0.1:6380"
upstreams = [
    "10.0.0.5:6379",
    { address = "10.0.0.6:6379", weight = 3 },      # three times the share
    "10.0.0.7:6379,backup",                         # the quick form: only when no other is up
]
balance = "least_connections"
deny = ["192.0.2.0/24"]

[proxy.redis.health]
interval_s = 2
send = "PING\\r\\n"
expect = "+PONG"

[proxy.web]
listen = [":8080", "unix:/run/midway/web.sock"]
upstreams = "127.0.0.1:8000"
idle_timeout_s = 0                # overrides [defaults]: never close an idle connection
"""
"""The example shown in the reference; the tests load it, so it stays valid."""

# Written by hand: these two keys are not `option()` fields (they have no default).
_REQUIRED_PROXY_KEYS = (
    ("listen", "`LISTEN` (1st argument)", "address, or list of addresses",
     "Where to accept clients: `host:port`, `[v6]:port`, `:port` (every interface) "
     "or `unix:/path`.  Port 0 picks a free port.  No two listeners, in any proxy, "
     "may share an address (`:6380` conflicts with `127.0.0.1:6380`), and none may "
     "take the admin API's."),
    ("upstreams", "`UPSTREAM ...` (further arguments)", "upstream entry, or list of them",
     "Where to forward each connection: `host:port`, `[v6]:port` or `unix:/path` "
     "(port 1-65535, host required).  Several are used as `balance` says; a name is "
     "looked up on every connection, so DNS changes are followed, and its addresses "
     "are tried in turn until one accepts (docs/balancing.md, *Upstreams given by "
     "name*).  An entry is an "
     "address, the quick form `ADDRESS,weight=N`, `ADDRESS,backup` (what the command "
     "line takes), or a table `{address = ..., weight = N, backup = true}`: see "
     "*Upstream entries* below.  Optional when the proxy has `routes`: they are then "
     "the default route, and without them a connection no route matches is closed "
     "(`no_route`)."),
)

_NO_FLAG = "—"

# Written by hand too: a list of tables, checked by midway.chain.toxics.config.
_PROXY_TABLE_KEYS = (
    ("`toxics`", "`--toxic` (repeatable)", "list of tables", "`[]`",
     "Fault injection: Toxiproxy's toxics (`[[proxy.NAME.toxics]]` with `type`, "
     "`name`, `stream`, `toxicity`, `attributes`, midway's `conditions`) and, for "
     "reproducible scenarios, `at_s`/`until_s`: seconds after the proxy starts when "
     "the toxic is added and removed.  On the command line, "
     "`--toxic 'latency:latency=100,jitter=10'`.  See docs/faults.md."),
    ("`routes`", _NO_FLAG, "list of tables", "`[]`",
     "SNI routes (`[[proxy.NAME.routes]]`), each with `sni` (a host name, "
     "`*.example.com` for one label, or a list of them), its own `upstreams` and "
     "optionally `balance` (default: the proxy's) and `name` (what the access log's "
     "`route` says; default: its first pattern).  A TLS connection is routed by the "
     "server name of its ClientHello, read without terminating and forwarded "
     "unchanged (or, with TLS termination, of its handshake); the most specific "
     "pattern wins; a name no route matches goes to the proxy's `upstreams`.  See "
     "docs/tls.md."),
)

def _flag(name: str) -> str:
    # The same rule as midway.cli._flag; the reference test checks every flag
    # listed here against `midway --help`, so the two cannot drift apart.
    return "--" + name.replace("_", "-")


def _word(value: Any, info: OptionInfo) -> str | None:
    """The word that stands for ``value`` (``all`` for ``retries``' -1), if any."""
    for word, meant in info.words:
        if meant == value and not isinstance(value, bool):
            return word
    return None


def _cell(text: str) -> str:
    """Make ``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _number(value: float) -> str:
    return f"{value:g}"


def _type(kind: Any, info: OptionInfo) -> str:
    if kind is bool:
        return "boolean"
    if typing.get_origin(kind) is tuple:
        return "string, or list of strings"
    if kind is str:
        if info.choices:
            return "one of " + ", ".join(f"`{c}`" for c in info.choices)
        return "string"
    name = "integer" if kind is int else "number"
    if info.words and kind is int and info.minimum is not None and info.minimum < 0:
        # retries: the negative minimum is only the word's value.
        words = " or ".join(f"`{w}`" for w, _ in info.words)
        return f"{name}, ≥ 0, or {words}"
    low, high = info.minimum, info.maximum
    if low is not None and high is not None:
        return f"{name}, {_number(low)}-{_number(high)}"
    if low is not None:
        return f"{name}, ≥ {_number(low)}"
    if high is not None:
        return f"{name}, ≤ {_number(high)}"
    return name


def _default(f: Field[Any], info: OptionInfo) -> str:
    value = f.default
    assert value is not MISSING, f"option {f.name} has no default"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    text = f"`{_number(value)}`"
    word = _word(value, info)
    if word is not None:
        return f"`{word}` ({_number(value)})"
    return f"{text} {info.unit}" if info.unit else text


def _meaning(kind: Any, info: OptionInfo) -> str:
    parts = [info.doc.strip()]
    if info.const is not None:
        parts.append(f"**Flag alone:** `{info.const}`.")
    if info.zero:
        if kind is str or typing.get_origin(kind) is tuple:
            parts.append("**Empty:** " + info.zero.removeprefix("(empty) ") + ".")
        else:
            parts.append(f"**0:** {info.zero}.")
    if info.provenance:
        parts.append(f"*Default from:* {info.provenance}.")
    return " ".join(parts)


def _option_rows(cls: type, flag_prefix: str = "", no_flag: str = _NO_FLAG) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f, info in options_of(cls):
        kind = hints[f.name]
        name = flag_prefix + f.name
        if not info.cli:
            flag = no_flag
        elif kind is bool:  # argparse.BooleanOptionalAction adds the --no- form
            flag = f"`{_flag(name)}`, `{_flag('no_' + name)}`"
        elif info.flag:  # a flag named apart from its key (hooks: --hook)
            flag = f"`{_flag(info.flag)}`"
        else:
            flag = f"`{_flag(name)}`"
        cells = [f"`{f.name}`", flag, _type(kind, info), _default(f, info), _meaning(kind, info)]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


_TABLE_HEAD = [
    "| Key | Command-line flag | Type | Default | Meaning |",
    "|---|---|---|---|---|",
]


def render_reference() -> str:
    """The whole of ``docs/configuration.md`` as a string (ends with one newline)."""
    proxy_required = [
        "| " + " | ".join(_cell(c) for c in (f"`{key}`", flag, kind, "required", text)) + " |"
        for key, flag, kind, text in _REQUIRED_PROXY_KEYS
    ]
    lines = [
        "<!-- Generated from midway/config/schema.py by midway/config/reference.py: do not",
        f"     edit by hand.  Regenerate with: {REGENERATE} -->",
        "",
        "# Configuration reference",
        "",
        "midway reads a TOML file (`midway --config FILE`) or, for a single proxy, the",
        "command line (`midway LISTEN UPSTREAM [UPSTREAM ...] [options]`).  Both are",
        "checked in full before anything binds; `midway --config FILE --check` only",
        "checks.  An error names the key path, e.g. `proxy.redis.upstreams[1]`, and an",
        "unknown key comes with the closest valid one.",
        "",
        "Units are part of the key names (`_s` is seconds); a number of seconds may have",
        "a fraction.",
        "",
        "A relative file path (`tls_cert`, `access_log`, a hook's `FILE.py`, ...) is taken",
        "from the directory midway runs in, not the configuration file's, as HAProxy",
        "does: under systemd that is `/` unless the unit sets `WorkingDirectory`, so",
        "give absolute paths there (`--check` run elsewhere would look in another place).",
        "",
        "## `[server]`: the whole process",
        "",
        *_TABLE_HEAD,
        *_option_rows(ServerConfig),
        "",
        "## `[defaults]` and `[proxy.NAME]`: each proxy",
        "",
        "Each `[proxy.NAME]` table is one proxy.  NAME is 1-64 letters, digits, `_`, `.`,",
        "`-` or `:`, starting with a letter or digit (`[proxy.\"kafka:9092\"]`, quoted for",
        "the colon).  `[defaults]` takes the same options",
        "(not `listen`, `upstreams`, `toxics` or `routes`) and every proxy inherits them unless it",
        "sets its own (a proxy's `allow` or `deny` list replaces the default's).",
        "",
        *_TABLE_HEAD,
        *proxy_required,
        *_option_rows(ProxyConfig),
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in _PROXY_TABLE_KEYS),
        "",
        "## Upstream entries",
        "",
        "Each entry of `upstreams` is an address, a table or the quick form.  This",
        "list of tables:",
        "",
        "```toml",
        'upstreams = ["10.0.0.5:6379", { address = "10.0.0.6:6379", weight = 3 },',
        '             { address = "10.0.0.7:6379", backup = true }]',
        "```",
        "",
        "means the same as this one in the quick form:",
        "",
        "```toml",
        'upstreams = ["10.0.0.5:6379", "10.0.0.6:6379,weight=3", "10.0.0.7:6379,backup"]',
        "```",
        "",
        "and as the command line `midway :6380 10.0.0.5:6379 10.0.0.6:6379,weight=3",
        "10.0.0.7:6379,backup`.  An error names the entry: `proxy.redis.upstreams[2].weight:",
        "must be 0-256 (0 = drained), got 300`.  See docs/balancing.md.",
        "",
        *_TABLE_HEAD,
        "| `address` | `ADDRESS` | string | required | The upstream's address, as in "
        "`upstreams` above. |",
        *_option_rows(UpstreamConfig, no_flag="`,KEY=VALUE` after the address"),
        "",
        "## `[proxy.NAME.health]`: health checks",
        "",
        "Active checks (off by default) and passive ejection (on by default) of each",
        "proxy's upstreams; see docs/balancing.md.  `[defaults.health]` takes the same",
        "keys, and a proxy inherits each key it does not set.  On the command line each",
        "key is a `--health-KEY` flag.",
        "",
        *_TABLE_HEAD,
        *_option_rows(HealthConfig, flag_prefix="health_"),
        "",
        "## Command line",
        "",
        "The proxy flags above configure the one proxy of the quick form; with",
        "`--config`, set them in the file instead (`[defaults]` applies them to every",
        "proxy).  The `[server]` flags work in both forms and override the file.  A key",
        "marked — has no flag.  The subcommands `midway replay`, `midway connections`",
        "and `midway top` have options of their own (`midway SUBCOMMAND --help`).",
        "",
        "## Example",
        "",
        "```toml",
        *EXAMPLE_TOML.splitlines(),
        "```",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_reference())
