"""Upstream order: round-robin with failover."""

import pytest

import midway.config.addresses
from midway.config.addresses import parse_address
from midway.upstream.health import HealthSettings
from midway.upstream.state import UpstreamSet, UpstreamSpec


def _pool(ups: list[midway.config.addresses.Address]) -> UpstreamSet:
    """A proxy's pool as the service builds it today (no health table yet)."""
    return UpstreamSet("p", [UpstreamSpec(u) for u in ups],
                       health=HealthSettings(eject_after=0), balancer_feedback=False)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_round_robin_rotates_the_start_then_the_rest_in_order(n: int) -> None:
    """The order midway has always used: the start rotates, failover goes on in
    the configured order from there (the smooth weighted round-robin of equal
    weights gives exactly this), also after failed connects."""
    ups = [parse_address(f"10.0.0.{i}:80", listen=False) for i in range(n)]
    pool = _pool(ups)
    for turn in range(3 * n):
        order = [u.address for u in pool.order("10.9.9.9")]
        start = turn % n
        assert order == [ups[(start + i) % n] for i in range(n)]
        pool.upstreams[0].connect_failed("connection refused")  # changes nothing here


def test_pool_needs_an_upstream() -> None:
    with pytest.raises(ValueError):
        _pool([])
