"""``midway top [--admin HOST:PORT]``: a running midway in the terminal.

Theory of operation
-------------------
Each second it reads the documented admin routes a script would (``GET
/proxies``, ``GET /metrics``, ``GET /connections``) and draws, with the standard
library's :mod:`curses`, the proxies (and their upstreams when the API reports
them) on top and the connections below.  Rates are differences between two
successive ``/metrics`` reads.  Keys: ``s`` cycles the sort column, ``f`` cycles
the proxy filter, the arrow keys select a connection (the selection follows that
connection, by id, while refreshes move the rows), ``k`` kills it (``DELETE
/connections/ID``; the answer, "killed connection N", stays a few seconds), ``q``
quits; curses restores the terminal on the way out, whatever happens.  When standard output is not a terminal it prints the same
tables once, as plain text, and exits.

A midway without ``/connections`` (404) shows "connections: not available"; a
midway that does not answer shows "disconnected" and is asked again each second.
The admin token, if the API needs one, comes from ``--admin-token-file PATH``
(its first line), else ``MIDWAY_ADMIN_TOKEN``, as for ``midway connections``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .connections import add_token_flags, check_admin_address, read_token
from .errors import describe_oserror

__all__ = ["main", "build_parser", "Snapshot", "fetch", "render_lines"]

DEFAULT_ADMIN = "127.0.0.1:8474"
"""Toxiproxy's port, where ``midway --admin`` is usually put."""
REFRESH_S = 1.0
REQUEST_TIMEOUT_S = 3.0
MESSAGE_S = 5.0
"""How long the answer to a kill stays on the screen."""
TOKEN_ENV = "MIDWAY_ADMIN_TOKEN"
SORT_KEYS = ("age_s", "bytes_up", "bytes_down", "proxy", "client", "id")
DESCENDING = ("age_s", "bytes_up", "bytes_down")
"""Sorted largest first (the oldest, the busiest); ``id`` smallest first, as a number."""
CONNECTION_COLUMNS = (("id", 8), ("proxy", 12), ("client", 22), ("upstream", 22),
                      ("age_s", 8), ("bytes_up", 10), ("bytes_down", 10), ("state", 23),
                      ("path", 10), ("toxics", 24))
"""Each column's key and width; ``state``'s holds the longest state whole
(``half-closed by upstream``; midway.control.connections)."""
WORKER_COLUMN = ("worker", 6)
"""Shown after ``proxy`` when a connection is served by a worker other than the
first (``--workers N``), as ``midway connections`` shows it."""

_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class AdminError(Exception):
    """The admin API could not be asked or answered an error."""


@dataclass
class Snapshot:
    """What one poll read."""

    at: float
    proxies: dict[str, Any]
    metrics: list[tuple[str, dict[str, str], float]]
    connections: list[dict[str, Any]] | None
    """None: this midway has no ``/connections`` (404)."""
    error: str = ""

    def total(self, name: str, **labels: str) -> float:
        return sum(v for n, ls, v in self.metrics
                   if n == name and all(ls.get(k) == w for k, w in labels.items()))


@dataclass
class View:
    """What the person chose: the sort, the proxy filter, the selected connection;
    and what the screen says above the tables."""

    sort: str = SORT_KEYS[0]
    proxy: str = ""
    selected: int = 0
    """The selected row of :attr:`shown`."""
    selected_id: Any = None
    """The selected connection's id: the selection follows that connection when
    the rows move (a refresh re-sorts them, others open or close); when it has
    gone, the row now at its place is selected."""
    error: str = ""
    """Why the last poll failed ("disconnected: ..."); cleared by the next good one."""
    message: str = ""
    message_until: float = 0.0
    """The answer to the last kill, shown until then (monotonic seconds)."""
    shown: list[dict[str, Any]] = field(default_factory=list)
    """The connections as last drawn, in screen order: what ``k`` picks from."""

    def move(self, step: int) -> None:
        """The arrow keys: the row ``step`` below (above, negative) the selected one."""
        if self.shown:
            self.selected = max(0, min(self.selected + step, len(self.shown) - 1))
            self.selected_id = self.shown[self.selected].get("id")

    def say(self, message: str) -> None:
        self.message, self.message_until = message, time.monotonic() + MESSAGE_S

    def notices(self) -> list[str]:
        """The lines under the title: the poll's error, the kill's answer."""
        current = self.message if time.monotonic() < self.message_until else ""
        return [line for line in (self.error, current) if line]


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text lines ``name{label="value",...} number`` (comments skipped)."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        out.append((match.group(1), dict(_LABEL.findall(match.group(2) or "")), value))
    return out


def request(admin: str, method: str, path: str, token: str = "") -> tuple[int, bytes]:
    host, _, port = admin.rpartition(":")
    headers = {"User-Agent": "midway-top"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AdminError(f"midway at {admin} does not answer: {describe_oserror(exc)}") from None
    finally:
        conn.close()


def _get(admin: str, path: str, token: str, source: str) -> Any:
    status, body = request(admin, "GET", path, token)
    if status == 401:
        if token:
            raise AdminError(f"the admin API refused the token of {source}")
        raise AdminError(f"the admin API needs a token: give --admin-token-file PATH or "
                         f"set {TOKEN_ENV}")
    if status != 200:
        raise AdminError(f"GET {path}: {status} {body[:200].decode(errors='replace')}")
    return body


def fetch(admin: str, token: str = "", source: str = TOKEN_ENV) -> Snapshot:
    """One poll of the admin API, with ``token`` (read from ``source``, which a
    refusal names).  Raises :class:`AdminError`."""
    proxies = json.loads(_get(admin, "/proxies", token, source))
    metrics = parse_metrics(_get(admin, "/metrics", token, source).decode())
    status, body = request(admin, "GET", "/connections", token)
    connections = json.loads(body) if status == 200 else None
    return Snapshot(time.monotonic(), proxies, metrics, connections)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def render_lines(now: Snapshot, before: Snapshot | None, view: View) -> list[str]:
    """The screen as lines of text (curses and the plain table both print them)."""
    dt = (now.at - before.at) if before is not None else 0.0

    def rate(name: str, **labels: str) -> str:
        if before is None or dt <= 0:
            return "-"
        return f"{max(0.0, now.total(name, **labels) - before.total(name, **labels)) / dt:.1f}"

    # The text columns widen to their longest value (two listen addresses, a
    # long name), so that every number stays under its header.
    texts = {name: (name + ("" if proxy.get("enabled", True) else " (disabled)"),
                    str(proxy.get("listen", "")), str(proxy.get("upstream", "")))
             for name, proxy in now.proxies.items()}
    wide = [max([least, *(len(row[i]) for row in texts.values())])
            for i, least in enumerate((14, 22, 28))]
    lines = [f"{'PROXY':<{wide[0]}} {'LISTEN':<{wide[1]}} {'UPSTREAM':<{wide[2]}} {'OPEN':>5} "
             f"{'CONN/S':>7} {'UP B/S':>10} {'DOWN B/S':>10}  CLOSES"]
    for name in sorted(now.proxies):
        proxy = now.proxies[name]
        closes = ", ".join(f"{ls.get('reason')} {v:.0f}" for n, ls, v in now.metrics
                           if n == "midway_closes_total" and ls.get("proxy") == name and v)
        label, listen, upstream = texts[name]
        lines.append(
            f"{label:<{wide[0]}} {listen:<{wide[1]}} {upstream:<{wide[2]}} "
            f"{now.total('midway_connections_active', proxy=name):>5.0f} "
            f"{rate('midway_connections_total', proxy=name):>7} "
            f"{rate('midway_bytes_total', proxy=name, direction='upstream'):>10} "
            f"{rate('midway_bytes_total', proxy=name, direction='downstream'):>10}  {closes}")
        for up in proxy.get("upstreams") or []:
            route = f"route {up['route']} " if up.get("route") else ""  # an SNI route's
            lines.append(f"  {'up' if up.get('state') == 'up' else 'DOWN':<4} "
                         f"{up.get('address', ''):<28} {route}"
                         f"weight {up.get('weight', '')}{' backup' if up.get('backup') else ''} "
                         f"active {up.get('active', '')} last check "
                         f"{_last_check(up.get('last_check'))}")
    lines.append("")
    if now.connections is None:
        lines.append("connections: not available (this midway has no GET /connections)")
        view.shown = []
        return lines
    shown = [c for c in now.connections if not view.proxy or c.get("proxy") == view.proxy]
    numeric = view.sort in (*DESCENDING, "id")
    shown.sort(key=lambda c: (c.get(view.sort) or 0) if numeric else str(c.get(view.sort, "")),
               reverse=view.sort in DESCENDING)
    view.shown = shown
    ids = [c.get("id") for c in shown]
    if view.selected_id in ids:
        view.selected = ids.index(view.selected_id)
    view.selected = max(0, min(view.selected, len(shown) - 1))
    view.selected_id = ids[view.selected] if shown else None
    lines.append(f"CONNECTIONS {len(shown)} of {len(now.connections)}  sort: {view.sort}  "
                 f"proxy: {view.proxy or 'all'}")
    columns: tuple[tuple[str, int], ...] = CONNECTION_COLUMNS
    if any(c.get("worker", 1) != 1 for c in now.connections):
        columns = (*columns[:2], WORKER_COLUMN, *columns[2:])
    lines.append(" ".join(f"{key.upper():<{width}}" for key, width in columns))
    for c in shown:
        cells = []
        for key, width in columns:
            value = c.get(key, "")
            if key == "age_s" and isinstance(value, int | float):
                value = f"{value:.1f}s"
            elif key.startswith("bytes_") and isinstance(value, int | float):
                value = _bytes(value)
            elif key == "toxics" and isinstance(value, list):
                value = ",".join(map(str, value)) or "-"
            cells.append(f"{str(value):<{width}.{width}}")
        lines.append(" ".join(cells))
    return lines


def _last_check(check: Any) -> str:
    """``last_check`` as the API gives it (docs/balancing.md): null, or its time
    (Unix seconds), whether it passed and why not."""
    if not isinstance(check, dict):
        return "none"
    at = check.get("at")
    when = time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, int | float) else "?"
    if check.get("passed"):
        return f"{when} ok"
    return f"{when} failed ({check.get('reason') or 'no reason given'})"


def _plain(admin: str, token: str, source: str) -> int:
    try:
        snapshot = fetch(admin, token, source)
    except AdminError as exc:
        print(f"midway top: {exc}", file=sys.stderr)
        return 1
    print("\n".join(render_lines(snapshot, None, View())))
    return 0


def _curses(admin: str, token: str, source: str) -> int:
    import curses

    def loop(screen: Any) -> None:
        curses.curs_set(0)
        screen.timeout(int(REFRESH_S * 1000))
        view = View()
        before: Snapshot | None = None
        now: Snapshot | None = None
        next_poll = 0.0
        while True:
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + REFRESH_S
                try:
                    before, now = now, fetch(admin, token, source)
                    view.error = ""
                except AdminError as exc:
                    view.error = f"disconnected: {exc}"
            _draw(screen, now, before, view, admin)
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == ord("s"):
                view.sort = SORT_KEYS[(SORT_KEYS.index(view.sort) + 1) % len(SORT_KEYS)]
            elif key == ord("f") and now is not None:
                choices = ["", *sorted(now.proxies)]
                view.proxy = choices[(choices.index(view.proxy) + 1) % len(choices)
                                     if view.proxy in choices else 0]
            elif key == curses.KEY_DOWN:
                view.move(1)
            elif key == curses.KEY_UP:
                view.move(-1)
            elif key == ord("k") and view.shown:
                view.say(_kill(admin, view.shown[view.selected], token))
                next_poll = 0.0  # show it gone at once

    curses.wrapper(loop)
    return 0


def _kill(admin: str, connection: dict[str, Any], token: str) -> str:
    try:
        status, body = request(admin, "DELETE", f"/connections/{connection['id']}", token)
    except AdminError as exc:
        return str(exc)
    if status == 204:
        return f"killed connection {connection['id']}"
    return f"kill {connection['id']}: {status} {body[:100].decode(errors='replace')}"


def _draw(screen: Any, now: Snapshot | None, before: Snapshot | None, view: View,
          admin: str) -> None:
    import curses

    screen.erase()
    height, width = screen.getmaxyx()
    title = f"midway top - {admin} - s: sort  f: proxy  arrows: select  k: kill  q: quit"
    screen.addnstr(0, 0, title, width - 1, curses.A_REVERSE)
    row = 1
    for notice in view.notices():
        if row < height:
            screen.addnstr(row, 0, notice, width - 1, curses.A_BOLD)
            row += 1
    lines = render_lines(now, before, view) if now is not None else []
    first_connection = len(lines) - len(view.shown)
    for i, line in enumerate(lines):
        if row >= height:
            break
        header = line.startswith(("PROXY ", "CONNECTIONS ", "ID "))
        attributes = curses.A_BOLD if header else curses.A_NORMAL
        if view.shown and i - first_connection == view.selected:
            attributes = curses.A_REVERSE
        screen.addnstr(row, 0, line, width - 1, attributes)
        row += 1
    screen.refresh()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midway top",
                                     description="A running midway in the terminal, "
                                                 "from its admin API.")
    parser.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                        help=f"the admin API's address (default {DEFAULT_ADMIN})")
    add_token_flags(parser)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := check_admin_address(args.admin):
        parser.error(f"--admin: {problem}")
    token = read_token(parser, args.admin_token_file)
    source = f"--admin-token-file {args.admin_token_file}" if args.admin_token_file else TOKEN_ENV
    if not sys.stdout.isatty():
        return _plain(args.admin, token, source)
    return _curses(args.admin, token, source)
