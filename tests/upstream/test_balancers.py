"""Every balancer, driven directly: which upstreams are eligible, in which order,
and how picks spread over many connections."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from midway.config.addresses import Address
from midway.upstream.balancers import (
    Balancer,
    LeastConnections,
    RandomTwo,
    RoundRobin,
    available,
    create,
)

from .fakes import Up, ups

NAMES = available()  # every registered policy goes through the shared tests


def make(name: str) -> Balancer:
    return create(name, rng=random.Random(7))


def firsts(b: Balancer, upstreams: list[Up], n: int, keys: bool = False) -> Counter[str]:
    picks: Counter[str] = Counter()
    for i in range(n):
        order = b.order(upstreams, f"192.0.2.{i % 250}" if keys else "192.0.2.1")
        picks[order[0].address.host] += 1
    return picks


# -- the registry --------------------------------------------------------------


def test_registry_names_every_policy() -> None:
    assert available() == ["hash_source", "least_connections", "random_two", "round_robin"]
    for name in NAMES:
        assert make(name).name == name


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown balance 'fastest'.*hash_source, least_connections"):
        create("fastest")


# -- eligibility, the same for every policy ------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_down_and_drained_upstreams_get_no_connection(name: str) -> None:
    u = ups(1, 1, 0, 1)
    u[1].up = False
    b = make(name)
    for i in range(200):
        order = b.order(u, f"198.51.100.{i}")
        assert sorted(x.address.host for x in order) == ["10.0.0.1", "10.0.0.4"]


@pytest.mark.parametrize("name", NAMES)
def test_backups_only_while_no_primary_is_usable(name: str) -> None:
    u = ups(1, 1, 1, backup=(2,))
    b = make(name)
    assert u[2] not in b.order(u, "192.0.2.1")
    u[0].up = False
    assert u[2] not in b.order(u, "192.0.2.1")  # one primary is enough
    u[1].weight = 0  # drained primaries do not count as usable (HAProxy's rule)
    assert b.order(u, "192.0.2.1") == [u[2]]
    u[1].weight = 1
    assert u[2] not in b.order(u, "192.0.2.1")  # back to primaries at once


@pytest.mark.parametrize("name", NAMES)
def test_everything_down_gives_an_empty_order(name: str) -> None:
    u = ups(1, 1, 1, backup=(2,))
    for x in u:
        x.up = False
    assert make(name).order(u, "192.0.2.1") == []
    u[2].up = True
    u[2].weight = 0  # a drained backup is no help either
    assert make(name).order(u, "192.0.2.1") == []


@pytest.mark.parametrize("name", NAMES)
def test_single_upstream(name: str) -> None:
    u = ups(5)
    assert make(name).order(u, "192.0.2.1") == u


upstream_sets = st.lists(
    st.tuples(st.integers(0, 256), st.booleans(), st.booleans(), st.integers(0, 100)),
    min_size=1, max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(spec=upstream_sets, name=st.sampled_from(NAMES), key=st.ip_addresses().map(str),
       calls=st.integers(1, 5))
def test_order_is_every_eligible_upstream_exactly_once(
        spec: list[tuple[int, bool, bool, int]], name: str, key: str, calls: int) -> None:
    u = [Up(Address(f"10.0.0.{i + 1}", 80), w, backup, is_up, active)
         for i, (w, backup, is_up, active) in enumerate(spec)]
    usable = [x for x in u if x.up and x.weight > 0]
    expected = [x for x in usable if not x.backup] or [x for x in usable if x.backup]
    b = make(name)
    for _ in range(calls):
        order = b.order(u, key)
        assert len(order) == len(set(map(id, order)))  # no upstream twice
        assert set(map(id, order)) == set(map(id, expected))  # never a down/drained one


# -- round_robin ---------------------------------------------------------------


def test_round_robin_is_nginx_smooth_weighted() -> None:
    # The sequence in nginx's commit that introduced smooth weighted round-robin
    # (weights 5, 1, 1): the heavy upstream never gets a long burst.
    u = ups(5, 1, 1)
    b = RoundRobin()
    seq = "".join("abc"[u.index(b.order(u, "")[0])] for _ in range(14))
    assert seq == "aabacaa" * 2


def test_round_robin_weights_are_exact_over_each_cycle() -> None:
    u = ups(3, 1, 2)
    picks = firsts(RoundRobin(), u, 600)
    assert picks == {"10.0.0.1": 300, "10.0.0.2": 100, "10.0.0.3": 200}


def test_round_robin_equal_weights_rotate() -> None:
    u = ups(1, 1, 1)
    b = RoundRobin()
    seq = [b.order(u, "")[0].address.host for _ in range(6)]
    assert seq == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_round_robin_retry_order_covers_the_rest() -> None:
    u = ups(1, 1, 1)
    order = RoundRobin().order(u, "")
    assert order[0] is u[0] and set(map(id, order[1:])) == {id(u[1]), id(u[2])}


def test_round_robin_keeps_its_place_across_a_reconfigure() -> None:
    b = RoundRobin()
    u = ups(1, 1, 1)
    assert b.order(u, "")[0] is u[0]
    rebuilt = ups(1, 1, 1)  # new objects, same addresses (a reconfigure)
    assert b.order(rebuilt, "")[0] is rebuilt[1]


def test_round_robin_failed_connect_slows_an_upstream_then_it_recovers() -> None:
    u = ups(4, 4)
    b = RoundRobin()
    b.connect_failed(u[0].address)  # unknown yet: harmless
    firsts(b, u, 8)
    b.connect_failed(u[0].address)
    early = firsts(b, u, 8)
    assert early["10.0.0.1"] < early["10.0.0.2"]
    later = firsts(b, u, 80)
    assert later["10.0.0.1"] == later["10.0.0.2"] == 40


# -- least_connections ---------------------------------------------------------


def test_least_connections_sends_to_the_idle_upstream() -> None:
    u = ups(1, 1)
    u[0].active = 50
    b = LeastConnections()
    for _ in range(20):
        order = b.order(u, "")
        assert order == [u[1], u[0]]


def test_least_connections_weighs_the_counts() -> None:
    u = ups(2, 1)
    b = LeastConnections()
    for _ in range(300):  # long-lived connections: each pick holds one
        b.order(u, "")[0].active += 1
    assert (u[0].active, u[1].active) == (200, 100)


def test_least_connections_ties_rotate_by_weight() -> None:
    # Short connections: everything is idle at every pick, so the tie-break alone
    # decides, and it follows the weights (plain rotation would give 50/50).
    u = ups(3, 1)
    assert firsts(LeastConnections(), u, 400) == {"10.0.0.1": 300, "10.0.0.2": 100}
    e = ups(1, 1, 1)
    b = LeastConnections()
    assert [b.order(e, "")[0] for _ in range(3)] == e


def test_least_connections_retry_order_is_by_load() -> None:
    u = ups(1, 1, 1)
    u[0].active, u[1].active, u[2].active = 9, 1, 5
    assert LeastConnections().order(u, "") == [u[1], u[2], u[0]]


# -- random_two ----------------------------------------------------------------


def test_random_two_idle_spread_follows_weights() -> None:
    u = ups(3, 1)
    picks = firsts(RandomTwo(random.Random(1)), u, 8000)
    assert abs(picks["10.0.0.1"] / 8000 - 0.75) < 0.02
    e = ups(1, 1, 1, 1)
    picks = firsts(RandomTwo(random.Random(2)), e, 8000)
    assert all(abs(n / 8000 - 0.25) < 0.02 for n in picks.values())


def test_random_two_never_picks_the_busiest_of_the_pair() -> None:
    u = ups(1, 1, 1)
    u[0].active = 50
    b = RandomTwo(random.Random(3))
    picks = firsts(b, u, 2000)
    assert picks["10.0.0.1"] == 0
    assert abs(picks["10.0.0.2"] - picks["10.0.0.3"]) < 200


def test_random_two_keeps_long_connections_even() -> None:
    u = ups(1, 1, 1, 1, 1, 1, 1, 1)
    b = RandomTwo(random.Random(4))
    for _ in range(800):
        b.order(u, "")[0].active += 1
    counts = [x.active for x in u]
    assert max(counts) - min(counts) <= 4  # one random choice spreads ~±30 here


def test_random_two_is_reproducible_with_a_seeded_source() -> None:
    u = ups(1, 2, 3)
    one, two = RandomTwo(random.Random(9)), RandomTwo(random.Random(9))
    a = [one.order(u, "") for _ in range(50)]
    b = [two.order(u, "") for _ in range(50)]
    assert a == b and len({tuple(map(id, o)) for o in a}) > 1
