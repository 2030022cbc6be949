"""hash_source over 10 000 simulated clients: even spread, stability, and only the
clients of an upstream that goes down (or comes back) move."""

from __future__ import annotations

import ipaddress
from collections import Counter

from midway.config.addresses import Address
from midway.upstream.balancers import HashSource

from .fakes import Up, ups

CLIENTS = [str(ipaddress.IPv4Address(0x0A000000 + i * 7919)) for i in range(10_000)]


def mapping(upstreams: list[Up]) -> dict[str, str]:
    b = HashSource()
    return {c: b.order(upstreams, c)[0].address.host for c in CLIENTS}


def test_spread_is_even_and_follows_weights() -> None:
    share = Counter(mapping(ups(1, 1, 1, 1, 1)).values())
    assert all(abs(n - 2000) < 150 for n in share.values()), share
    weighted = Counter(mapping(ups(3, 1)).values())
    assert abs(weighted["10.0.0.1"] / 10_000 - 0.75) < 0.015, weighted


def test_a_client_keeps_its_upstream() -> None:
    u = ups(1, 1, 1, 1)
    first = mapping(u)
    assert mapping(u) == first
    # Every worker and every restart agrees: the hash is BLAKE2b, not Python's
    # salted hash(), so the order is a constant (computed once, pinned here).
    assert [x.address.host for x in HashSource().order(u, "203.0.113.9")] == [
        "10.0.0.4", "10.0.0.2", "10.0.0.3", "10.0.0.1"]


def test_only_the_clients_of_a_down_upstream_move_and_they_come_back() -> None:
    u = ups(1, 1, 1, 1, 1)
    before = mapping(u)
    u[2].up = False
    during = mapping(u)
    moved = {c for c in CLIENTS if before[c] != during[c]}
    assert moved == {c for c in CLIENTS if before[c] == "10.0.0.3"}
    assert abs(len(moved) - 2000) < 150  # about its share, 1/5
    # The moved clients spread over the others rather than piling onto one.
    assert all(abs(n - 500) < 100 for n in Counter(during[c] for c in moved).values())
    u[2].up = True
    assert mapping(u) == before


def test_draining_behaves_like_down_for_new_connections() -> None:
    u = ups(1, 1, 1)
    before = mapping(u)
    u[0].weight = 0
    during = mapping(u)
    assert {c for c in CLIENTS if before[c] != during[c]} == {
        c for c in CLIENTS if before[c] == "10.0.0.1"}


def test_adding_an_upstream_moves_clients_only_onto_it() -> None:
    u = ups(1, 1, 1)
    before = mapping(u)
    grown = [*u, Up(Address("10.0.0.9", 80))]
    after = mapping(grown)
    moved = {c for c in CLIENTS if before[c] != after[c]}
    assert {after[c] for c in moved} == {"10.0.0.9"}
    assert abs(len(moved) - 2500) < 150


def test_the_retry_order_is_where_the_client_goes_next() -> None:
    u = ups(1, 1, 1, 1)
    b = HashSource()
    for c in CLIENTS[:500]:
        order = b.order(u, c)
        first = order[0]
        first.up = False
        assert b.order(u, c)[0] is order[1]
        first.up = True


def test_mapped_and_plain_ipv4_keys_agree_when_normalised() -> None:
    from midway.upstream.access import client_ip

    u = ups(1, 1, 1, 1)
    b = HashSource()
    for c in CLIENTS[:200]:
        assert b.order(u, str(client_ip(f"::ffff:{c}"))) == b.order(u, c)
