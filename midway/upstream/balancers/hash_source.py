"""``hash_source``: a client IP keeps its upstream (weighted rendezvous hashing).

Theory of operation
-------------------
Rendezvous, or highest-random-weight, hashing (Thaler & Ravishankar, "Using
Name-Based Mappings to Increase Hit Rates", 1998): for a client key ``k``, every
upstream ``u`` gets a pseudo-random score ``h(k, u)``, and the client goes to the
highest score.  The order of all scores is the order to try.  With weights the
score is ``-weight / ln(x)`` with ``x = h(k, u)`` mapped into (0, 1) (weighted
rendezvous, Schindelhauer & Schomaker 2005; the same formula as Resch's "logarithmic
method"): each upstream then wins for a share of keys proportional to its weight,
exactly in expectation.

Why rendezvous rather than a ring with virtual nodes:

* **minimal disruption by construction.**  When an upstream goes down, only the
  keys for which it had the top score move, each to its own second-best, so the
  other upstreams' clients stay put; when it comes back, exactly those keys return.
  A ring gives the same only with enough virtual nodes, and its balance depends on
  how many (about 100-200 per unit of weight for a few percent of spread).
* **the retry order is the fallback order.**  The second-highest score is where the
  client would go if its upstream were down, so a retry after a failed connect
  lands where the next connection will go once health checks mark the upstream
  down: the client moves once, not twice.
* **no structure to rebuild** on a reconfigure, a weight change or a health change:
  eligibility is filtered per call; nothing is cached but one hash per address.
* the cost, one hash mix per upstream per connection, is small for the tens of
  upstreams a TCP proxy has (a ring is O(log n) but needs rebuilding).

Hashes are stable across processes and restarts (BLAKE2b, not Python's salted
``hash``), so every midway worker and every midway instance behind the same
addresses agrees on where a client goes.  The client key is hashed once; each
upstream's address is hashed once and cached; the pair is combined with the
SplitMix64 finaliser (Steele, Lea & Flood, 2014), a cheap, well-mixing 64-bit
permutation.

The key is the client IP as text, normalised by the caller (an IPv4-mapped IPv6
address as IPv4), so a dual-stack listener and an IPv4 one agree.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence

from ...config.addresses import Address
from .base import U, eligible

__all__ = ["HashSource", "score"]

_MASK64 = (1 << 64) - 1


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


_ADDRESS_CACHE = 4096
"""Addresses whose hash is kept: far more than any proxy's upstreams, bounded so that
addresses churned through reconfigures cannot grow it without limit."""


@functools.lru_cache(maxsize=_ADDRESS_CACHE)
def _address_hash(address: Address) -> int:
    return _hash64(str(address))


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers with good avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def score(key_hash: int, address: Address, weight: int) -> float:
    """The weighted rendezvous score of one upstream for one key (higher wins)."""
    h = _mix64(key_hash ^ _address_hash(address))
    x = (h + 0.5) / 2.0**64  # in (0, 1): never 0 (ln) nor 1 (division by zero)
    return -weight / math.log(x)


class HashSource:
    __slots__ = ()
    name = "hash_source"

    def order(self, upstreams: Sequence[U], key: str) -> list[U]:
        candidates = eligible(upstreams)
        if len(candidates) <= 1:
            return candidates
        k = _hash64(key)
        return sorted(candidates, key=lambda u: score(k, u.address, u.weight), reverse=True)

    def connect_failed(self, address: Address) -> None:
        """Ignored: where a client goes depends only on who is eligible."""
