"""What it takes to go from one target to the next: a pure function of two
targets, so a reload or an API change can be checked without running it.

Theory of operation
-------------------
:func:`plan` compares, proxy by proxy (by name), what a worker runs now with
what it should run, and sorts each difference by what applying it costs:

* a proxy only in the new target is **added**; one only in the old is
  **removed** (a reload drains it, the API closes its connections);
* a proxy in both is **changed** when anything differs, and the plan says
  which parts: its ``listen`` addresses (the only change that rebinds; port 0
  in the new target keeps the port bound now, see
  :func:`~midway.config.target.keep_ports`), its settings (upstreams, balance,
  timeouts, limits: new connections use them, open ones keep theirs), each of
  its elements (capture, dump, hooks: rebuilt for new connections, the old ones
  kept by open connections until they close), its toxics (by name: added,
  removed, updated in place when only toxicity or attributes differ, replaced
  otherwise; open connections get these, as Toxiproxy's do), its timed toxics
  (the timeline starts over, except for an API change that only removes some:
  those are **dropped**, the rest plays on) and whether it is enabled;
* server settings: those a running process can take (drain timeout, log level,
  connection limit, access log, admin token) are applied, and those it cannot
  (``workers``, ``loop``, ``admin``) keep their running value and are named in
  :attr:`Plan.restart_needed`.

A reload re-imports hooks (``reload=True``), so a proxy with hooks always has
them rebuilt then, edited module or not; and it reads TLS certificates, keys and
CAs again (:attr:`ProxyPlan.certificates`), so a proxy with TLS is reconfigured
then, renewed files or not: a renewal rewrites the files, not the configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config.load import listeners_conflict
from ..config.schema import ProxyConfig, ServerConfig, ToxicSpec
from ..config.target import Target, keep_ports

__all__ = ["Plan", "ProxyPlan", "ToxicPlan", "plan", "live_server", "RESTART_KEYS",
           "CAPTURE_KEYS", "DUMP_KEYS"]

CAPTURE_KEYS = ("pcap", "pcap_max_bytes", "pcap_keep")
DUMP_KEYS = ("dump", "dump_file", "dump_max_bytes")
_ELEMENT_KEYS = frozenset({*CAPTURE_KEYS, *DUMP_KEYS, "hooks"})
_NOT_SETTINGS = _ELEMENT_KEYS | {"name", "listen", "toxics"}
RESTART_KEYS = ("workers", "loop", "admin")
"""Server settings a running midway cannot change: the number of processes, the
event loop they run and where the admin API listens.  A reload keeps their
running values and says that a restart is needed."""


@dataclass
class ToxicPlan:
    """The toxic changes of one proxy (the toxics present from the start: a
    toxic with ``at_s`` or ``until_s`` belongs to the timeline)."""

    remove: list[str] = field(default_factory=list)
    add: list[ToxicSpec] = field(default_factory=list)
    update: list[ToxicSpec] = field(default_factory=list)
    """Same type, stream, conditions and seed: toxicity and attributes change in place."""
    replace: list[ToxicSpec] = field(default_factory=list)
    """Anything else differs: a new toxic takes the old one's place."""
    timeline: bool = False
    """The timed toxics differ: the proxy's timeline starts over."""
    drop: list[ToxicSpec] = field(default_factory=list)
    """Timed toxics an API change took out (and changed nothing else timed): each
    one's toxic is removed if it is there and its later events are cancelled;
    the timeline plays on.  (A reload that removes some starts it over.)"""

    def __bool__(self) -> bool:
        return bool(self.remove or self.add or self.update or self.replace or self.timeline
                    or self.drop)


@dataclass
class ProxyPlan:
    """How one proxy present before and after changes."""

    old: ProxyConfig
    new: ProxyConfig
    """With the running ports kept where the new target asks port 0."""
    listen: bool = False
    settings: bool = False
    capture: bool = False
    dump: bool = False
    hooks: bool = False
    toxics: ToxicPlan = field(default_factory=ToxicPlan)
    enable: bool | None = None
    """``True``: start listening, ``False``: stop (and close its connections),
    ``None``: as it is."""
    reset: bool = False
    """Close its open connections (Toxiproxy's behaviour for a moved proxy)."""
    certificates: bool = False
    """A reload of a proxy with TLS: its certificate, key and CA files are read
    again (a reconfigure builds its contexts anew), whatever else changed."""

    @property
    def elements(self) -> bool:
        return self.capture or self.dump or self.hooks


@dataclass
class Plan:
    remove: list[str] = field(default_factory=list)
    add: list[tuple[ProxyConfig, bool]] = field(default_factory=list)
    """New proxies, each with whether it starts enabled."""
    change: list[ProxyPlan] = field(default_factory=list)
    server: ServerConfig = field(default_factory=ServerConfig)
    """The server settings to run (restart-only ones kept at their running value)."""
    restart_needed: list[str] = field(default_factory=list)


def plan(old: Target, new: Target, *, reset: frozenset[str] = frozenset(),
         reload: bool = False) -> Plan:
    """The steps from ``old`` (what runs) to ``new``.  ``reset`` names proxies
    whose connections are closed; ``reload`` rebuilds every proxy's hooks."""
    server, restart = live_server(old.config.server, new.config.server)
    result = Plan(server=server, restart_needed=restart)
    before = {p.name: p for p in old.config.proxies}
    after = {p.name for p in new.config.proxies}
    result.remove = [name for name in before if name not in after]
    for proxy in new.config.proxies:
        enabled = proxy.name not in new.disabled
        current = before.get(proxy.name)
        if current is None:
            result.add.append((proxy, enabled))
            continue
        change = _proxy_plan(current, proxy, reload=reload)
        was_enabled = proxy.name not in old.disabled
        if enabled != was_enabled:
            change.enable = enabled
        change.reset = proxy.name in reset
        if (change.listen or change.settings or change.elements or change.toxics
                or change.enable is not None or change.reset or change.certificates):
            result.change.append(change)
    result.change = _givers_first(result.change)
    return result


def _givers_first(changes: list[ProxyPlan]) -> list[ProxyPlan]:
    """``changes`` in file order, except that a proxy taking a listen address
    that another changed proxy gives up (or one overlapping it) comes after that
    one: binding it first would fail with "address already in use" and undo the
    whole change.  Two proxies that swap addresses cannot both go first; they
    keep the file's order (and that reload fails, as it did)."""
    def waits(taker: ProxyPlan, giver: ProxyPlan) -> bool:
        taken = [a for a in taker.new.listen if a not in taker.old.listen]
        freed = [a for a in giver.old.listen if a not in giver.new.listen]
        return any(listeners_conflict(a, b) for a in taken for b in freed)

    pending, ordered = list(changes), []
    while pending:
        ready = next((c for c in pending
                      if not any(waits(c, g) for g in pending if g is not c)), pending[0])
        pending.remove(ready)
        ordered.append(ready)
    return ordered


def _proxy_plan(old: ProxyConfig, new: ProxyConfig, *, reload: bool) -> ProxyPlan:
    new = dataclasses.replace(new, listen=keep_ports(new.listen, old.listen))
    change = ProxyPlan(old, new)
    change.listen = new.listen != old.listen
    change.settings = any(getattr(old, f.name) != getattr(new, f.name)
                          for f in dataclasses.fields(ProxyConfig) if f.name not in _NOT_SETTINGS)
    change.capture = any(getattr(old, k) != getattr(new, k) for k in CAPTURE_KEYS)
    change.dump = any(getattr(old, k) != getattr(new, k) for k in DUMP_KEYS)
    change.hooks = old.hooks != new.hooks or (reload and bool(new.hooks))
    change.certificates = reload and bool(new.tls_cert or new.upstream_tls)
    change.toxics = _toxic_plan(old.toxics, new.toxics, reload=reload)
    return change


def _plain(spec: ToxicSpec) -> bool:
    return spec.at_s == 0 and spec.until_s is None


def _toxic_plan(old: tuple[ToxicSpec, ...], new: tuple[ToxicSpec, ...], *,
                reload: bool) -> ToxicPlan:
    result = ToxicPlan()
    before = {s.name: s for s in old if _plain(s)}
    after = {s.name: s for s in new if _plain(s)}
    result.remove = [name for name in before if name not in after]
    for name, spec in after.items():
        current = before.get(name)
        if current is None:
            result.add.append(spec)
        elif current != spec:
            in_place = (current.type, current.stream, current.conditions, current.seed) == \
                (spec.type, spec.stream, spec.conditions, spec.seed)
            (result.update if in_place else result.replace).append(spec)
    timed_before = [s for s in old if not _plain(s)]
    timed_after = [s for s in new if not _plain(s)]
    if timed_before != timed_after:
        dropped = _removed(timed_before, timed_after)
        if not reload and dropped is not None:
            result.drop = dropped
        else:
            result.timeline = True
    return result


def _removed(before: list[ToxicSpec], after: list[ToxicSpec]) -> list[ToxicSpec] | None:
    """The specs of ``before`` missing from ``after`` when ``after`` is ``before``
    with some taken out (in order), else ``None``."""
    rest = iter(after)
    removed: list[ToxicSpec] = []
    following = next(rest, None)
    for spec in before:
        if spec == following:
            following = next(rest, None)
        else:
            removed.append(spec)
    return removed if following is None else None


def live_server(old: ServerConfig, new: ServerConfig) -> tuple[ServerConfig, list[str]]:
    """The server settings to run after ``new`` is asked while ``old`` runs, and
    the keys (of :data:`RESTART_KEYS`) whose new value needs a restart."""
    restart = [key for key in RESTART_KEYS if getattr(old, key) != getattr(new, key)]
    kept = {key: getattr(old, key) for key in restart}
    return dataclasses.replace(new, **kept), restart
