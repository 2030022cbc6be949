"""``midway connections``' table: the API's rows as they come, sorted as asked."""

from __future__ import annotations

from typing import Any

from midway.connections import format_table, sort_rows


def row(id: int, up: int, down: int, age: float, **more: Any) -> dict[str, Any]:
    return {"id": id, "proxy": "p", "worker": 1, "client": f"127.0.0.1:{id}",
            "upstream": "127.0.0.1:80", "upstream_addr": "127.0.0.1:80", "age_s": age, "bytes_up": up, "bytes_down": down,
            "state": "open", "path": "copy", "toxics": [], **more}


def test_sorted_by_bytes_both_ways_or_by_age_oldest_first() -> None:
    rows = [row(1, 10, 0, 5.0), row(2, 0, 30, 1.0), row(3, 5, 5, 9.0)]
    assert [r["id"] for r in sort_rows(rows, "bytes")] == [2, 1, 3]
    assert [r["id"] for r in sort_rows(rows, "age")] == [3, 1, 2]
    assert [r["id"] for r in sort_rows(rows[::-1], "id")] == [1, 2, 3]


def test_a_connecting_row_shows_dashes_for_what_it_has_not_yet() -> None:
    table = format_table([row(3, 0, 0, 1.04, upstream=None, upstream_addr=None, state="connecting",
                              path="none"),
                          row(12, 1, 2, 0.5, toxics=["latency_downstream", "slicer_upstream"])])
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "PROXY", "WORKER", "CLIENT", "UPSTREAM", "AGE_S",
                                "BYTES_UP", "BYTES_DOWN", "STATE", "PATH", "TOXICS"]
    assert lines[1].split() == ["3", "p", "1", "127.0.0.1:3", "-", "1.0", "0", "0",
                                "connecting", "none", "-"]
    assert lines[2].split()[-1] == "latency_downstream,slicer_upstream"
    column = lines[0].index("STATE")  # aligned: every row's state starts under its title
    assert lines[1][column:].startswith("connecting") and lines[2][column:].startswith("open")


def test_the_resolved_address_is_a_column_when_an_upstream_is_a_name() -> None:
    """As the access log's ``upstream_addr``: which address of a name took the
    connection; with IP upstreams only it would repeat UPSTREAM, and is left out."""
    by_name = row(5, 1, 2, 3.0, upstream="web.internal:80", upstream_addr="10.0.0.5:80")
    connecting = row(6, 0, 0, 0.1, upstream=None, upstream_addr=None, state="connecting")
    lines = format_table([by_name, connecting, row(7, 0, 0, 0.2)]).splitlines()
    assert lines[0].split()[3:6] == ["CLIENT", "UPSTREAM", "UPSTREAM_ADDR"]
    assert lines[1].split()[4:6] == ["web.internal:80", "10.0.0.5:80"]
    assert lines[2].split()[4:6] == ["-", "-"]
    assert lines[3].split()[4:6] == ["127.0.0.1:80", "127.0.0.1:80"]
    assert "UPSTREAM_ADDR" not in format_table([row(7, 0, 0, 0.2), connecting])


def test_sni_and_route_are_columns_when_a_connection_has_them() -> None:
    """The API's ``sni`` and ``route``: the server name a TLS client asked for and
    the SNI route that took it; with no TLS names at all they would be columns of
    dashes, and are left out."""
    routed = row(8, 5, 9, 2.0, sni="api.example.test", route="api")
    by_default = row(9, 1, 1, 1.0, sni="legacy.example.test", route=None)
    peeking = row(10, 0, 0, 0.1, upstream=None, upstream_addr=None, sni=None, route=None,
                  state="reading ClientHello", path="none")
    lines = format_table([routed, by_default, peeking]).splitlines()
    assert lines[0].split()[3:7] == ["CLIENT", "SNI", "ROUTE", "UPSTREAM"]
    assert lines[1].split()[4:6] == ["api.example.test", "api"]
    assert lines[2].split()[4:6] == ["legacy.example.test", "-"]
    assert lines[3].split()[4:7] == ["-", "-", "-"]
    column = lines[0].index("STATE")  # a state of several words is one aligned cell
    assert lines[3][column:].startswith("reading ClientHello  none")
    assert lines[0].split()[3:5] == ["CLIENT", "SNI"] and "ROUTE" not in format_table([by_default])
    assert "SNI" not in format_table([row(7, 0, 0, 0.2), peeking])
