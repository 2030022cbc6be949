"""The target: the configuration every worker runs, as plain data, and a change
to it.  The control plane (:mod:`midway.control`) keeps one and sends it down to
every worker; the admin routes describe their changes as edits of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .addresses import Address
from .schema import Config, ProxyConfig

__all__ = ["Target", "Edit", "keep_ports"]


@dataclass(frozen=True)
class Target:
    """What every worker runs: a whole configuration (the file's, changed by the
    API since: proxies created, moved or removed, toxics added, updated or
    removed, all as :class:`~midway.config.schema.ToxicSpec` entries of their
    proxy), and which proxies are disabled (Toxiproxy's ``enabled = false``)."""

    config: Config
    disabled: frozenset[str] = frozenset()

    def proxy(self, name: str) -> ProxyConfig | None:
        """The proxy called ``name``, or ``None``."""
        return next((p for p in self.config.proxies if p.name == name), None)


    def with_proxy(self, proxy: ProxyConfig) -> Target:
        """This target with ``proxy`` in place of the one of its name (or added last)."""
        proxies = list(self.config.proxies)
        for i, old in enumerate(proxies):
            if old.name == proxy.name:
                proxies[i] = proxy
                break
        else:
            proxies.append(proxy)
        return dataclasses.replace(self, config=dataclasses.replace(self.config,
                                                                    proxies=tuple(proxies)))

    def without_proxy(self, name: str) -> Target:
        proxies = tuple(p for p in self.config.proxies if p.name != name)
        return Target(dataclasses.replace(self.config, proxies=proxies), self.disabled - {name})

    def enabled(self, name: str, enabled: bool) -> Target:
        disabled = self.disabled - {name} if enabled else self.disabled | {name}
        return dataclasses.replace(self, disabled=disabled)


@dataclass(frozen=True)
class Edit:
    """A change: the next target, and the proxies whose open connections are to
    be closed (Toxiproxy drops them when a proxy moves or is replaced)."""

    target: Target
    reset: frozenset[str] = frozenset()


def keep_ports(new: tuple[Address, ...], current: tuple[Address, ...]) -> tuple[Address, ...]:
    """Port 0 ("any port") in a changed configuration keeps a port already in
    use at the same host: each port-0 address takes, in order, the first current
    address of its host that the new list does not name itself, so a proxy asked
    on port 0 stays where it was bound, also when addresses are added or removed
    beside it."""
    spare = [a for a in current if not a.is_unix and a not in new]
    kept: list[Address] = []
    for address in new:
        match = None
        if address.port == 0 and not address.is_unix:
            match = next((a for a in spare if a.host == address.host), None)
        if match is None:
            kept.append(address)
        else:
            spare.remove(match)
            kept.append(match)
    return tuple(kept)
