"""The named toxics of a live proxy: list, find, add, update, remove, reset.

Toxics are ordinary chain elements of a proxy (see :mod:`midway.chain.base`), so
adding or removing one applies to open connections as well as new ones, and no byte
is lost, duplicated or reordered.  This module adds what Toxiproxy's API means by
"the toxics of a proxy": a name unique within the proxy, the Toxiproxy listing
order, update-by-merging, and reset.  The library API, the admin HTTP API and the
configuration timeline all go through it, so they agree.

Everything here must run on the proxy's event loop thread (the element list is not
locked); it never blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar

from ...errors import MidwayError, at_callers_line
from ..base import UPSTREAM, Element
from . import make_toxic
from .base import Toxic

__all__ = [
    "ChainHost",
    "ToxicNotFound",
    "ToxicExists",
    "list_toxics",
    "toxic_json",
    "get_toxic",
    "add_toxic",
    "update_toxic",
    "replace_toxic",
    "remove_toxic",
    "reset_toxics",
    "ToxicHandle",
]

T = TypeVar("T")


class ChainHost(Protocol):
    """What a live proxy offers (a :class:`~midway.service.ProxyService` does)."""

    @property
    def elements(self) -> list[Element]: ...

    def add_element(self, element: Element, index: int | None = None) -> None: ...

    def remove_element(self, element: Element) -> None: ...

    def replace_element(self, old: Element, new: Element) -> None: ...


class ToxicNotFound(MidwayError, LookupError):
    """No toxic of that name on this proxy (Toxiproxy's 404 "toxic not found")."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"toxic not found: {name!r}")


class ToxicExists(MidwayError):
    """A chain element of that name is already on this proxy (Toxiproxy's 409
    "toxic already exists")."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"toxic already exists: {name!r}")


def toxic_json(toxic: Toxic[Any]) -> dict[str, Any]:
    """A toxic as Toxiproxy's API shows it, plus midway's ``conditions`` when any
    are set (absent otherwise, so strict clients see Toxiproxy's shape)."""
    data = toxic.to_json()
    conditions = toxic.conditions.to_json()
    if conditions:
        data["conditions"] = conditions
    return data


def list_toxics(host: ChainHost) -> list[Toxic[Any]]:
    """The proxy's toxics in Toxiproxy's order: upstream ones first, then
    downstream ones, each in the order they were added."""
    toxics = [e for e in host.elements if isinstance(e, Toxic)]
    return sorted(toxics, key=lambda t: 0 if t.stream == UPSTREAM else 1)


def get_toxic(host: ChainHost, name: str) -> Toxic[Any]:
    """The toxic called ``name``; raises :class:`ToxicNotFound`."""
    for element in host.elements:
        if isinstance(element, Toxic) and element.name == name:
            return element
    raise ToxicNotFound(name)


def add_toxic(host: ChainHost, toxic: Toxic[Any]) -> Toxic[Any]:
    """Add ``toxic`` at the end of the chain, live.  Raises :class:`ToxicExists`
    when any element of the proxy already has its name (and changes nothing)."""
    if any(element.name == toxic.name for element in host.elements):
        raise ToxicExists(toxic.name)
    host.add_element(toxic)
    return toxic


def update_toxic(
    host: ChainHost,
    name: str,
    *,
    toxicity: float | None = None,
    attributes: Mapping[str, object] | None = None,
) -> Toxic[Any]:
    """Change a toxic's ``toxicity`` and/or some ``attributes`` (the others keep
    their values), live, in place in the chain.  Type, stream, name and conditions
    stay.  Raises :class:`ToxicNotFound`, or
    :class:`~midway.chain.toxics.ToxicError` (nothing changed) for a bad value.

    Open connections get the new settings at once: each drops its old stage
    (flushing what it held, as on removal, but a ``timeout`` toxic's connections
    are not closed) and draws its toxicity again, as Toxiproxy does when it
    updates a toxic."""
    old = get_toxic(host, name)
    merged = {**old.attributes.to_json(), **(attributes or {})}
    new = make_toxic(
        old.type, name=old.name, stream=old.stream,
        toxicity=old.toxicity if toxicity is None else toxicity,
        attributes=merged, conditions=old.conditions, rng=old.rng,
        seed=old.seed,
    )
    # The after_s condition keeps counting from the original creation.
    new.created_at = old.created_at
    # Per-connection state (limit_data's count) goes on, as in Toxiproxy.
    new.state_key = old.state_key
    old.superseded = True
    host.replace_element(old, new)
    return new


def replace_toxic(host: ChainHost, new: Toxic[Any]) -> Toxic[Any]:
    """Put ``new`` in the place of the toxic of its name, live: a reload that
    changes more than :func:`update_toxic` can (conditions, seed, stream or
    type).  Open connections get it as on an update.  With the same type and
    stream it is the same toxic with other settings, so per-connection state
    (limit_data's count) goes on; otherwise the new one starts from nothing.
    Returns the old toxic; raises :class:`ToxicNotFound`."""
    old = get_toxic(host, new.name)
    if (new.type, new.stream) == (old.type, old.stream):
        new.state_key = old.state_key
        old.superseded = True
    host.replace_element(old, new)
    return old


def remove_toxic(host: ChainHost, name: str) -> Toxic[Any]:
    """Remove the toxic called ``name``, live; held bytes are flushed, none lost.
    Raises :class:`ToxicNotFound`."""
    toxic = get_toxic(host, name)
    host.remove_element(toxic)
    return toxic


def reset_toxics(host: ChainHost) -> None:
    """Remove every toxic of the proxy (other chain elements stay)."""
    for toxic in list_toxics(host):
        host.remove_element(toxic)


def _here(fn: Callable[[], T]) -> T:
    return fn()


class ToxicHandle:
    """A toxic added from Python: :meth:`remove` it, :meth:`update` it, or use the
    handle as a context manager that removes the toxic on exit::

        with proxy.add_toxic("latency", latency=200):
            ...                                    # every reply 200 ms late

    ``runner`` runs a function on the proxy's event loop thread and returns its
    result (the default calls it right here, for code already on that thread; a
    :class:`~midway.BackgroundProxy` passes its own, so the handle is thread-safe)."""

    def __init__(self, host: ChainHost, toxic: Toxic[Any],
                 runner: Callable[[Callable[[], Any]], Any] = _here) -> None:
        self._host = host
        self._toxic = toxic
        self.runner = runner

    @property
    def name(self) -> str:
        return self._toxic.name

    @property
    def toxic(self) -> Toxic[Any]:
        """The toxic as it is now (a new object after each :meth:`update`)."""
        return self._toxic

    @property
    def active(self) -> bool:
        """Whether the toxic is still on the proxy."""
        return bool(self.runner(lambda: any(e is self._toxic for e in self._host.elements)))

    @at_callers_line
    def remove(self) -> None:
        """Remove the toxic, live (held bytes are flushed, none lost).  Does nothing
        if it is already gone."""
        def remove() -> None:
            if any(e is self._toxic for e in self._host.elements):
                self._host.remove_element(self._toxic)
        self.runner(remove)

    @at_callers_line
    def update(self, *, toxicity: float | None = None, **attributes: Any) -> Toxic[Any]:
        """Change the toxicity and/or some attributes, live (see
        :func:`update_toxic`).  Raises :class:`ToxicNotFound` if it was removed,
        :class:`~midway.chain.toxics.ToxicError` for a bad value."""
        def update() -> Toxic[Any]:
            if not any(e is self._toxic for e in self._host.elements):
                raise ToxicNotFound(self._toxic.name)
            return update_toxic(self._host, self._toxic.name, toxicity=toxicity,
                                attributes=attributes)
        self._toxic = self.runner(update)
        return self._toxic

    def __enter__(self) -> ToxicHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<ToxicHandle {self._toxic!r}>"
