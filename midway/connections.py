"""``midway connections``: the open connections of a running midway, as a table,
read from its admin API (``GET /connections``, docs/faults.md) with the standard
library alone.

The token: ``--admin-token-file PATH`` (its first line, as the server reads
it), else the environment variable ``MIDWAY_ADMIN_TOKEN``, else none.  Never a
flag holding the token itself: other users could read it in the process list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

__all__ = ["main", "fetch", "proxy_names", "format_table", "sort_rows", "check_admin_address", "DEFAULT_ADMIN",
           "TOKEN_ENV", "UnreachableAdmin", "add_token_flags", "read_token"]

DEFAULT_ADMIN = "127.0.0.1:8474"
"""Toxiproxy's port, where ``--admin`` is usually put."""
TOKEN_ENV = "MIDWAY_ADMIN_TOKEN"
TIMEOUT_S = 10.0
"""How long to wait for the admin API (a worker that does not answer makes it
answer 503 within its own 10 s)."""

COLUMNS = (("ID", "id"), ("PROXY", "proxy"), ("WORKER", "worker"), ("CLIENT", "client"),
           ("SNI", "sni"), ("ROUTE", "route"), ("UPSTREAM", "upstream"), ("UPSTREAM_ADDR", "upstream_addr"), ("AGE_S", "age_s"),
           ("BYTES_UP", "bytes_up"), ("BYTES_DOWN", "bytes_down"), ("STATE", "state"),
           ("PATH", "path"), ("TOXICS", "toxics"))
"""The table's columns: a title and the API's key.  ``UPSTREAM_ADDR`` is shown
only when it says more than ``UPSTREAM``: when some row's upstream is a name,
the address it resolved to (for an IP address it is the same text).  ``SNI``
and ``ROUTE`` are shown only when some row has one (TLS names, SNI routes)."""

_SOMETIMES = ("sni", "route")
"""The columns left out when no row has a value."""


class UnreachableAdmin(Exception):
    """The admin API could not be asked, or refused; the message says why."""


def check_admin_address(text: str) -> str:
    """What is wrong with ``text`` as the admin API's ``HOST:PORT`` (``[v6]:PORT``),
    for ``--admin``; "" when nothing is."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or text.startswith("unix:"):
        return f"expected HOST:PORT (e.g. {DEFAULT_ADMIN}), got {text!r}"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:{port}"
    if not (port.isascii() and port.isdigit()):
        return f"{text!r}: port {port!r} is not a number"
    if not 1 <= int(port) <= 65535:
        return f"{text!r}: port must be between 1 and 65535"
    return ""


def fetch(admin: str, proxy: str = "", token: str = "") -> list[dict[str, Any]]:
    """``GET /connections`` from the admin API at ``admin`` (``HOST:PORT``)."""
    rows: list[dict[str, Any]] = _get(admin, "/connections" + (
        f"?proxy={quote(proxy)}" if proxy else ""), token)
    return rows


def proxy_names(admin: str, token: str = "") -> list[str]:
    """The names of the proxies the admin API at ``admin`` serves (``GET /proxies``)."""
    return sorted(_get(admin, "/proxies", token))


def _get(admin: str, path: str, token: str) -> Any:
    url = f"http://{admin}{path}"
    headers = {"User-Agent": "midway-connections"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise UnreachableAdmin(f"the admin API at {admin} answered {exc.code}: "
                               f"{_error_text(exc)}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise UnreachableAdmin(f"cannot reach the admin API at {admin}: {text.lower()}") from None
    except (OSError, ValueError) as exc:  # a timeout, a body that is not JSON
        raise UnreachableAdmin(f"cannot read the admin API at {admin}: {exc}") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except (OSError, ValueError):
        return str(exc.reason)


def sort_rows(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """``bytes``: most bytes (both ways) first; ``age``: oldest first; else by id."""
    if by == "bytes":
        return sorted(rows, key=lambda r: (-(r["bytes_up"] + r["bytes_down"]), r["id"]))
    if by == "age":
        return sorted(rows, key=lambda r: (-r["age_s"], r["id"]))
    return sorted(rows, key=lambda r: r["id"])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value) or "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned columns under a header line (see :data:`COLUMNS`)."""
    resolved = any(row.get("upstream_addr") not in (None, row.get("upstream")) for row in rows)
    shown = {key for key in _SOMETIMES if any(row.get(key) is not None for row in rows)}
    columns = [c for c in COLUMNS if (resolved or c[1] != "upstream_addr")
               and (c[1] not in _SOMETIMES or c[1] in shown)]
    table = [[title for title, _ in columns]]
    table += [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
                     .rstrip() for line in table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="midway connections",
        description="List the open connections of a running midway (read from its admin API).")
    parser.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                        help=f"the admin API's address (default {DEFAULT_ADMIN})")
    parser.add_argument("--sort", choices=("id", "bytes", "age"), default="id",
                        help="order: by id (default), most bytes first, or oldest first")
    parser.add_argument("--proxy", default="", metavar="NAME", help="only this proxy's")
    add_token_flags(parser)
    return parser


class _RefuseSecret(argparse.Action):
    """``--admin-token``, declared so that argparse does not take it for an
    abbreviation of ``--admin-token-file`` (and print the secret as a path)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error("--admin-token: not a flag (other users could read it in the process "
                     f"list); use --admin-token-file PATH or ${TOKEN_ENV}")


def add_token_flags(parser: argparse.ArgumentParser) -> None:
    """``--admin-token-file`` of the admin API's clients (``midway connections``,
    ``midway top``), and the refusal of a token given as a flag."""
    parser.add_argument("--admin-token-file", default="", metavar="PATH",
                        help=f"the admin token's file (else ${TOKEN_ENV}, else no token)")
    parser.add_argument("--admin-token", action=_RefuseSecret, nargs="?", help=argparse.SUPPRESS)


def read_token(parser: argparse.ArgumentParser, path: str) -> str:
    """The token of ``--admin-token-file PATH`` (its first line, as the server
    reads it), else of ``$MIDWAY_ADMIN_TOKEN``, else "".  A file that cannot be
    read, or whose first line is empty, is a usage error (exit 2)."""
    if not path:
        return os.environ.get(TOKEN_ENV, "").strip()
    try:
        with open(path, encoding="utf-8") as file:
            token = file.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        parser.error(f"--admin-token-file: cannot read {path}: {reason}")
    if not token:
        parser.error(f"--admin-token-file: {path}: the first line is empty (expected the token)")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    """``midway connections``: 0 with the table printed, 1 when the admin API
    cannot be reached or refuses, or ``--proxy`` names no proxy (the reason on
    stderr), 2 for a bad command line (a token file it cannot read included)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := check_admin_address(args.admin):
        parser.error(f"--admin: {problem}")
    token = read_token(parser, args.admin_token_file)
    try:
        rows = fetch(args.admin, args.proxy, token)
        # An empty list for a name the API does not know is a typo, not an idle proxy.
        names = proxy_names(args.admin, token) if args.proxy and not rows else [args.proxy]
    except UnreachableAdmin as exc:
        print(f"midway connections: {exc}", file=sys.stderr)
        return 1
    if args.proxy not in names and args.proxy:
        known = ", ".join(names) or "none"
        print(f"midway connections: --proxy: no proxy named {args.proxy!r} (proxies: {known})",
              file=sys.stderr)
        return 1
    print(format_table(sort_rows(rows, args.sort)))
    return 0
