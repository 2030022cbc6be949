"""The live state of one proxy's upstreams: what the balancer reads, what the
session reports back, and what survives a reconfigure.

Theory of operation
-------------------
This is every proxy's pool (:attr:`midway.service.ProxyService.pool`): the service
reports each dial and close to it, with the proxy's ``balance``, its
``[proxy.NAME.health]`` settings (passive health on by default) and balancer
feedback on (round-robin's slow start after a failed connect).

* :class:`UpstreamSpec` is one configured upstream (address, weight, backup): data.
* :class:`UpstreamState` is its live state: active connections, counters, and its
  :class:`~.health.HealthMachine`.  It is what a balancer orders (it keeps the
  :class:`~.balancers.UpstreamView` contract) and what the session reports to:
  ``connect_failed(reason)`` after a failed dial, ``connected()`` once dialled, and
  ``closed()`` when that connection ends.
* :class:`UpstreamSet` holds the states of one proxy, its balancer and its health
  settings.  ``order(key)`` gives the upstreams to try for one connection.
  ``reconfigure(...)`` applies a new configuration *keeping state by address*: an
  upstream whose address stays keeps its health, counters and active connections
  (new weight and backup flag applied); a new address starts fresh (up, as in
  HAProxy); a removed one is dropped from the set, while connections already open
  to it keep their own reference and report to it harmlessly.  The balancer keeps
  its rotation when ``balance`` does not change.

A session holds the :class:`UpstreamState` it dialled, never an index, so a
reconfigure in the middle of a connection cannot misattribute its close.

Ownership: one :class:`UpstreamSet` per proxy per worker, used from the event
loop's thread only (no locks).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.addresses import Address
from .balancers import DEFAULT_BALANCE, MAX_WEIGHT, Balancer, create
from .health import HealthChange, HealthMachine, HealthSettings, log_change

__all__ = ["UpstreamSpec", "UpstreamState", "UpstreamSet", "RESET_BEFORE_RESPONSE",
           "merge_snapshots"]

log = logging.getLogger("midway")

RESET_BEFORE_RESPONSE = "reset before its first byte"
"""The passive-health reason for a connection the upstream reset before replying."""


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One configured upstream."""

    address: Address
    weight: int = 1
    """0-256 (HAProxy's range); 0 = drained: no new connections, open ones go on."""
    backup: bool = False
    """Takes connections only while no non-backup upstream is up."""

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight: must be 0-{MAX_WEIGHT}")


class UpstreamState:
    """The live state of one upstream of one proxy."""

    __slots__ = ("address", "text", "pair", "weight", "backup", "active", "connects",
                 "connect_failures", "health", "_feedback")

    def __init__(self, spec: UpstreamSpec, health: HealthMachine,
                 feedback: Callable[[Address], None]) -> None:
        self.address = spec.address
        self.text = str(spec.address)
        """The address as text: one string for every connection to it."""
        self.pair: tuple[str, int] | None = (
            (spec.address.host, spec.address.port) if spec.address.is_ip_literal else None)
        """(host, port) of an IP-literal address (``None``: a name or a unix socket)."""
        self.weight = spec.weight
        self.backup = spec.backup
        self.active = 0
        """Connections open to this upstream now."""
        self.connects = 0
        """Successful connects since this state was created."""
        self.connect_failures = 0
        self.health = health
        self._feedback = feedback

    @property
    def up(self) -> bool:
        return self.health.up

    def connect_failed(self, reason: str) -> None:
        """A dial to this upstream failed (``reason`` as logged, e.g. ``connection
        refused``); counts towards passive ejection."""
        self.connect_failures += 1
        self._feedback(self.address)
        self.health.connect_failed(reason)

    def connected(self) -> None:
        """A dial succeeded: one more active connection, until :meth:`closed`."""
        self.connects += 1
        self.active += 1

    def abandoned(self) -> None:
        """A connection :meth:`connected` counted was given up without a verdict
        of its own on the upstream's health: before it was relayed (its TLS
        handshake failed, told by :meth:`connect_failed`), or cut by midway
        because the upstream was marked down.  One less active."""
        if self.active > 0:
            self.active -= 1

    def closed(self, *, reset_before_response: bool = False) -> None:
        """A connection :meth:`connected` earlier has ended.  With
        ``reset_before_response`` (the upstream reset it before sending a byte)
        it counts towards passive ejection; any other end clears the count."""
        if self.active > 0:
            self.active -= 1
        if reset_before_response:
            self.health.connect_failed(RESET_BEFORE_RESPONSE)
        else:
            self.health.connection_ok()

    def apply(self, spec: UpstreamSpec) -> None:
        self.weight = spec.weight
        self.backup = spec.backup

    def snapshot(self) -> dict[str, Any]:
        """For the admin API's ``upstreams`` list."""
        last = self.health.last_check
        return {
            "address": str(self.address),
            "weight": self.weight,
            "backup": self.backup,
            "state": "up" if self.up else "down",
            "active": self.active,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "last_check": None if last is None else
            {"at": last[0], "passed": last[1], "reason": last[2]},
        }


def merge_snapshots(per_worker: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One ``upstreams`` list from each worker's (:meth:`UpstreamState.snapshot`),
    as the admin API shows it with several workers: ``active``, ``connects`` and
    ``connect_failures`` add up; ``state`` is ``down`` when any worker has the
    upstream down (as ``midway_upstream_up`` takes the minimum: that worker
    sends it no client); ``last_check`` is the latest of any worker's.  Entries
    are matched by ``route`` (an SNI route's upstreams have their own state;
    absent or None for the proxy's own) and address, in the first worker's
    order (one only some workers have yet, in the middle of a change, comes
    after).  Pure."""
    merged: dict[tuple[str | None, str], dict[str, Any]] = {}
    for entries in per_worker:
        for entry in entries:
            where = (entry.get("route"), entry["address"])
            into = merged.get(where)
            if into is None:
                merged[where] = dict(entry)
                continue
            for key in ("active", "connects", "connect_failures"):
                into[key] += entry[key]
            if entry["state"] == "down":
                into["state"] = "down"
            last, mine = into["last_check"], entry["last_check"]
            if mine is not None and (last is None or mine["at"] > last["at"]):
                into["last_check"] = mine
    return list(merged.values())


class UpstreamSet:
    """Every upstream of one proxy, its balancer and its health settings.

    ``now`` is the monotonic clock for ejection timers, ``rng`` the random source of
    the balancers that draw, ``on_change`` receives every health change (default:
    logged), and ``on_health``, when given, the address and new state of each
    change (the service tells its observers: ``midway_upstream_up``).  With ``balancer_feedback`` off a failed connect is not told to the
    balancer (no slow start after a failure: round-robin keeps its plain rotation,
    as midway's proxies do until their configuration chooses a policy).  With
    ``empty_ok`` the list may be empty (a proxy whose SNI routes hold every
    upstream: the service then never asks this set for an order)."""

    __slots__ = ("proxy", "balance", "balancer", "health", "upstreams", "_now", "_rng",
                 "_on_change", "_on_health", "_outage", "_balancer_feedback",
                 "_panic_turn")

    def __init__(
        self,
        proxy: str,
        specs: Sequence[UpstreamSpec],
        *,
        balance: str = DEFAULT_BALANCE,
        health: HealthSettings | None = None,
        now: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_change: Callable[[HealthChange], None] = log_change,
        on_health: Callable[[Address, bool], None] | None = None,
        balancer_feedback: bool = True,
        empty_ok: bool = False,
    ) -> None:
        self.proxy = proxy
        self._on_health = on_health
        self._balancer_feedback = balancer_feedback
        self._now = now
        self._rng = rng
        self._on_change = on_change
        self._outage = ""
        """What was said of the outage under way: "" (none), "closed" (clients
        refused, no_upstream) or "panic" (ejected upstreams dialled anyway)."""
        self._panic_turn = 0
        self.balance = balance
        self.balancer: Balancer = create(balance, rng=rng)
        self.health = health if health is not None else HealthSettings()
        self.upstreams: tuple[UpstreamState, ...] = ()
        _check(specs, empty_ok)
        self._apply(specs, {})

    def order(self, key: str, retries: int | None = None) -> list[UpstreamState]:
        """The upstreams to try for one new connection from client IP ``key``: the
        balancer's pick first, then at most ``retries`` others (None = every
        eligible upstream once).  Empty when every upstream is down or drained:
        the caller closes the client with ``no_upstream``; that is logged once per
        outage here, not per connection."""
        upstreams = self.upstreams
        if len(upstreams) == 1:  # the common case, without the balancer: eligible or not
            only = upstreams[0]
            found = [only] if only.weight > 0 and only.health.up else []
        else:
            found = self.balancer.order(upstreams, key)
        if not found:
            found = self._panic()
            if not found:
                if self._outage != "closed":
                    self._outage = "closed"
                    log.warning("proxy %s: no upstream is up; new clients are closed "
                                "(no_upstream)", self.proxy)
                return found
            if self._outage != "panic":
                self._outage = "panic"
                log.warning("proxy %s: no upstream is up; dialling those ejected by passive "
                            "health anyway until one is back", self.proxy)
        elif self._outage:
            self._outage = ""
            log.info("proxy %s: an upstream is up again", self.proxy)
        return found if retries is None else found[: retries + 1]

    def _panic(self) -> list[UpstreamState]:
        """The panic rule (nginx's, and Envoy's panic threshold at its
        extreme): when nothing is eligible and the upstreams left out are down
        only by passive ejection, each new connection dials them anyway, in
        turn (primaries before backups), rather than refusing every client until
        ``eject_s`` runs out.  A lone upstream that restarted is then used again
        at once, not 10 s later.  An upstream down by active checks, or drained
        (weight 0), is never dialled: the checks and the operator have the last
        word.  Their state is untouched: still down, counted as such
        (``midway_upstream_up``), and back as passive health says."""
        candidates = [u for u in self.upstreams if u.weight > 0 and u.health.ejected()]
        primaries = [u for u in candidates if not u.backup]
        found = primaries or candidates
        if len(found) > 1:
            turn = self._panic_turn = (self._panic_turn + 1) % len(found)
            found = found[turn:] + found[:turn]
        return found

    def reconfigure(self, specs: Sequence[UpstreamSpec], *, balance: str | None = None,
                    health: HealthSettings | None = None, empty_ok: bool = False) -> None:
        """Apply a new configuration, keeping each kept address's state.  Raises
        :class:`ValueError` (and changes nothing) for an empty (unless ``empty_ok``:
        a proxy whose SNI routes have every upstream) or duplicated list."""
        _check(specs, empty_ok)
        if balance is not None and balance != self.balance:
            self.balancer = create(balance, rng=self._rng)
            self.balance = balance
        if health is not None and health != self.health:
            self.health = health
            kept = {spec.address for spec in specs}
            for u in self.upstreams:
                if u.address in kept:  # a removed one is not told it is up again
                    u.health.replace_settings(health)
        self._apply(specs, {u.address: u for u in self.upstreams})

    def settle(self) -> None:
        """Notice each passive ejection whose ``eject_s`` has run out, as the next
        connection's look would (logged and told to the observers then): a scrape
        of an idle proxy then shows such an upstream up, as ``GET /proxies`` does,
        rather than down until a client comes."""
        for u in self.upstreams:
            u.health.up  # noqa: B018 (the look is what ends an ejection)

    def checked(self) -> list[UpstreamState]:
        """The upstreams an active checker should probe (all, when checks are on)."""
        return list(self.upstreams) if self.health.active else []

    def snapshot(self) -> list[dict[str, Any]]:
        """For the admin API: each upstream's state, with ``last_check.at`` in
        wall-clock seconds (Unix time)."""
        offset = time.time() - self._now()
        out = [u.snapshot() for u in self.upstreams]
        for entry in out:
            last = entry["last_check"]
            if last is not None:
                last["at"] = round(last["at"] + offset, 3)
        return out

    def _apply(self, specs: Iterable[UpstreamSpec], old: dict[Address, UpstreamState]) -> None:
        states = []
        for spec in specs:
            state = old.get(spec.address)
            if state is None:
                label = f"upstream {spec.address} of proxy {self.proxy}"
                machine = HealthMachine(self.health, label, self._now,
                                        self._changed(spec.address))
                state = UpstreamState(spec, machine, self._feedback)
            else:
                state.apply(spec)
            states.append(state)
        self.upstreams = tuple(states)

    def _changed(self, address: Address) -> Callable[[HealthChange], None]:
        """The ``on_change`` of one upstream's machine: the set's, then ``on_health``."""
        def changed(change: HealthChange) -> None:
            self._on_change(change)
            if self._on_health is not None:
                self._on_health(address, change.up)
        return changed

    def _feedback(self, address: Address) -> None:
        if self._balancer_feedback:
            self.balancer.connect_failed(address)


def _check(specs: Sequence[UpstreamSpec], empty_ok: bool = False) -> None:
    if not specs and not empty_ok:
        raise ValueError("a proxy needs at least one upstream")
    seen: set[Address] = set()
    for spec in specs:
        if spec.address in seen:
            raise ValueError(f"upstream {spec.address} is listed twice")
        seen.add(spec.address)
