"""Toxiproxy 2.x's HTTP API over midway's control plane: the routes, with no
networking (the HTTP server is :mod:`midway.admin.server`).

Theory of operation
-------------------
:meth:`ToxiproxyAPI.handle` takes one parsed request (method, path, User-Agent,
body bytes) and returns a :class:`Response`.  It never touches a live proxy: it
reads the target (:class:`~midway.config.target.Target`, the configuration every
worker runs) and the workers' live views, and describes each change as an edit
of the target, which the control plane (:class:`~midway.admin.host.AdminHost`)
applies on every worker before the answer.  Every change is validated in full
before anything is touched: a bad body or attribute answers Toxiproxy's error
and changes nothing.  A change is all or nothing on each worker: a move and an
enable are one step, ``/reset`` enables every proxy and removes every toxic in
one step (if a proxy cannot be bound, nothing changed), ``/populate`` replaces
what it replaces in one step.

The shapes, defaults and status codes are Toxiproxy's (``api.go``,
``proxy_collection.go``, ``toxic_collection.go`` of Shopify/toxiproxy v2):

* a proxy is ``{"name", "listen", "upstream", "enabled", "toxics": [...]}`` (plus
  midway's ``upstreams``, each upstream's state, which a proxy body may carry back
  and which is ignored); a
  toxic is ``{"name", "type", "stream", "toxicity", "attributes"}``; an error is
  ``{"error": "...", "status": N}``;
* ``POST /proxies`` answers 201, a taken name 409 ``proxy already exists``, a
  missing name or upstream 400 ``missing required field: name``; an address that
  cannot be bound 500 with the reason;
* a toxic's name defaults to ``<type>_<stream>``, its stream to ``downstream``, its
  toxicity to 1; a taken name is 409 ``toxic already exists``, an unknown type 400
  ``invalid toxic type``, a bad stream 400 ``stream was invalid, ...``;
* ``POST /populate`` checks every proxy first, keeps those whose listen and
  upstream are unchanged (and their toxics), replaces the others, answers 201
  ``{"proxies": [...]}``, and on failure changes nothing;
* ``POST /reset`` enables every proxy and removes every toxic (204), or if a
  proxy cannot be bound answers 500 naming it and changes nothing;
* ``DELETE`` answers 204; a missing proxy or toxic 404; ``GET /version`` answers
  ``{"version": "..."}``; a browser (User-Agent ``Mozilla/...``) gets 403, as
  Toxiproxy guards against cross-site requests to a local API.

Deliberate differences are listed in docs/faults.md ("Admin API").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from .._version import __version__
from ..chain.toxics import TOXICS, ToxicError, make_toxic
from ..chain.toxics.base import Toxic
from ..chain.toxics.config import build_toxic, toxic_spec
from ..chain.toxics.live import toxic_json
from ..config.load import check_workers, config_from_dict
from ..config.schema import (
    DEFAULT_TOXIC_STREAM,
    DEFAULT_TOXICITY,
    ProxyConfig,
    ServerConfig,
    ToxicSpec,
)
from ..config.target import Edit, Target
from ..errors import ConfigError
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .host import AdminHost, HostError, ProxyView

__all__ = ["ToxiproxyAPI", "Response", "TOXIPROXY_API_VERSION", "UI_HEADER", "toxic_types"]

log = logging.getLogger("midway")

TOXIPROXY_API_VERSION = "2.12.0"
"""The Toxiproxy release whose HTTP API this implements, reported by ``/version``
(clients use it to tell a 2.x server from a 1.x one)."""

DEFAULT_LISTEN = "127.0.0.1:0"
"""Where a proxy created without ``listen`` listens.  Toxiproxy binds every
interface on a random port; midway stays on loopback."""

UI_HEADER = "X-Midway-UI"
"""A browser's request is answered (not 403) when it carries this header: the
dashboard (``/ui/``) sends it.  Another site's page cannot: a custom header makes
the browser ask first (a CORS preflight), which this API never allows.  The
User-Agent guard, Toxiproxy's, stays for every other browser request."""

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

# Toxiproxy's error messages (api.go), word for word.
BAD_BODY = "bad request body"
MISSING_FIELD = "missing required field"
PROXY_NOT_FOUND = "proxy not found"
PROXY_EXISTS = "proxy already exists"
INVALID_STREAM = "stream was invalid, can be either upstream or downstream"
INVALID_TYPE = "invalid toxic type"
TOXIC_EXISTS = "toxic already exists"
TOXIC_NOT_FOUND = "toxic not found"
CONNECTION_NOT_FOUND = "connection not found"


PROXY_FIELDS = ("name", "listen", "upstream", "enabled", "toxics", "upstreams")
"""What a proxy body may hold: Toxiproxy's proxy JSON (``toxics`` is its output
field, accepted and ignored so that a proxy read back can be sent again)."""
TOXIC_FIELDS = ("name", "type", "stream", "toxicity", "attributes", "conditions", "seed")
"""What a toxic body may hold: Toxiproxy's toxic JSON, plus midway's ``conditions``
and ``seed`` (default: the proxy's ``seed`` option, else drawn and logged)."""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


class ApiError(Exception):
    """An error answered as Toxiproxy's ``{"error": message, "status": status}``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


Handler = Callable[..., Awaitable[Response]]


class ToxiproxyAPI:
    """The routes, over an :class:`~midway.admin.host.AdminHost` (the control
    plane).  Holds only what Toxiproxy reports but midway's configuration does
    not keep: the ``listen`` and ``upstream`` text each proxy was created with,
    and where it was last bound."""

    def __init__(self, host: AdminHost) -> None:
        self.host = host
        self._listen_text: dict[str, str] = {}
        self._upstream_text: dict[str, str] = {}
        self._last_bound: dict[str, str] = {}
        # (path shape, method) -> handler; "*" stands for one path segment.
        self._routes: dict[tuple[tuple[str, ...], str], Handler] = {
            (("version",), "GET"): self.version,
            (("reset",), "POST"): self.reset,
            (("populate",), "POST"): self.populate,
            (("metrics",), "GET"): self.metrics,
            (("reload",), "POST"): self.reload,
            (("toxic-types",), "GET"): self.toxic_type_index,
            (("proxies",), "GET"): self.proxy_index,
            (("proxies",), "POST"): self.proxy_create,
            (("proxies", "*"), "GET"): self.proxy_show,
            (("proxies", "*"), "POST"): self.proxy_update,
            (("proxies", "*"), "PATCH"): self.proxy_update,
            (("proxies", "*"), "DELETE"): self.proxy_delete,
            (("proxies", "*", "toxics"), "GET"): self.toxic_index,
            (("proxies", "*", "toxics"), "POST"): self.toxic_create,
            (("proxies", "*", "toxics", "*"), "GET"): self.toxic_show,
            (("proxies", "*", "toxics", "*"), "POST"): self.toxic_update,
            (("proxies", "*", "toxics", "*"), "PATCH"): self.toxic_update,
            (("proxies", "*", "toxics", "*"), "DELETE"): self.toxic_delete,
            (("connections",), "GET"): self.connection_index,
            (("connections", "*"), "GET"): self.connection_show,
            (("connections", "*"), "DELETE"): self.connection_delete,
            (("connections", "*", "toxics"), "GET"): self.connection_toxic_index,
            (("connections", "*", "toxics"), "POST"): self.connection_toxic,
            (("connections", "*", "toxics", "*"), "DELETE"): self.connection_toxic_delete,
        }
        self._shapes = {shape for shape, _ in self._routes}

    async def handle(self, method: str, path: str, body: bytes = b"",
                     user_agent: str = "", from_ui: bool = False) -> Response:
        """Answer one request.  Never raises for a bad request.  ``from_ui``: the
        request carried :data:`UI_HEADER` (same-origin), so a browser is served."""
        if user_agent.startswith("Mozilla/") and not from_ui:
            return Response(403, b"User agent not allowed\n", TEXT)
        path, _, query_text = path.partition("?")
        segments = [unquote(s) for s in path.split("/")[1:]]
        shape = tuple("*" if i % 2 and s and segments[0] in ("proxies", "connections") else s
                      for i, s in enumerate(segments))
        if "" in segments or shape not in self._shapes:
            return Response(404, b"404 page not found\n", TEXT)
        handler = self._routes.get((shape, method))
        if handler is None:
            allowed = ", ".join(sorted(m for (s, m) in self._routes if s == shape))
            return Response(405, b"", TEXT, (("Allow", allowed),))
        args = [s for s, k in zip(segments, shape, strict=True) if k == "*"]
        try:
            if segments[0] == "connections":
                query = {k: v[-1] for k, v in parse_qs(query_text).items()}
                return await handler(*args, body=body, query=query)
            return await handler(*args, body=body)
        except ApiError as exc:
            return _error(exc.message, exc.status)
        except HostError as exc:
            return _error(exc.message, exc.status)

    # -- midway's own ---------------------------------------------------------

    async def metrics(self, body: bytes) -> Response:
        """Prometheus's text format, summed over the workers (docs/metrics.md)."""
        return Response(200, (await self.host.metrics()).encode(), METRICS_CONTENT_TYPE)

    async def reload(self, body: bytes) -> Response:
        """Re-read the configuration file, as SIGHUP does; 400 names the key
        that is wrong (and nothing changed)."""
        return _json(200, await self.host.reload())

    async def toxic_type_index(self, body: bytes) -> Response:
        """Every toxic type with its attributes, defaults and units (the
        dashboard's forms are built from it)."""
        return _json(200, toxic_types())

    # -- proxies -------------------------------------------------------------

    async def version(self, body: bytes) -> Response:
        text = json.dumps({"version": TOXIPROXY_API_VERSION, "midway": __version__})
        return Response(200, (text + "\n").encode(), "application/json;charset=utf-8")

    async def proxy_index(self, body: bytes) -> Response:
        views = await self.host.views(merged=True)
        return _json(200, {p.name: self._proxy_json(p, views.get(p.name))
                           for p in self.host.target.config.proxies})

    async def proxy_show(self, name: str, body: bytes) -> Response:
        self._proxy(self.host.target, name)
        return await self._answer(200, name)

    async def proxy_create(self, body: bytes) -> Response:
        fields = _proxy_fields(_object(body, PROXY_FIELDS))
        name, listen, upstream = fields["name"], fields["listen"], fields["upstream"]
        if not name:
            raise ApiError(f"{MISSING_FIELD}: name", 400)
        if not upstream:
            raise ApiError(f"{MISSING_FIELD}: upstream", 400)
        listen = listen or DEFAULT_LISTEN
        config = _proxy_config(name, listen, upstream, self.host.target.config.server)
        enabled = True if fields["enabled"] is None else fields["enabled"]

        def create(target: Target) -> Edit:
            if target.proxy(name) is not None:
                raise ApiError(PROXY_EXISTS, 409)
            return Edit(target.with_proxy(config).enabled(name, enabled))

        await self.host.change(create)
        self._forget(name)
        self._listen_text[name], self._upstream_text[name] = listen, upstream
        return await self._answer(201, name)

    async def proxy_update(self, name: str, body: bytes) -> Response:
        target = self.host.target
        current = self._proxy(target, name)
        fields = _proxy_fields(_object(body, PROXY_FIELDS))
        listen, upstream = fields["listen"], fields["upstream"]
        views = await self.host.views()
        view = views.get(name)
        was_enabled = name not in target.disabled
        enabled = was_enabled if fields["enabled"] is None else fields["enabled"]
        moved = (listen is not None and listen not in self._listen_forms(current, view)) or (
            upstream is not None and upstream != self._upstream(current))
        if not moved:
            if enabled != was_enabled:
                def enable(target: Target) -> Edit:
                    self._proxy(target, name)
                    return Edit(target.enabled(name, enabled))

                await self.host.change(enable)
            return await self._answer(200, name)
        # Toxiproxy restarts the proxy: its connections are dropped.  The move and
        # the enabling are one step: if the new address cannot be bound, nothing
        # changed (Toxiproxy would keep the new address on the disabled proxy).
        listen = listen if listen is not None else self._listen(current, view)
        upstream = upstream if upstream is not None else self._upstream(current)
        config = _proxy_config(name, listen, upstream, target.config.server, base=current)

        def move(target: Target) -> Edit:
            base = self._proxy(target, name)
            moved_config = dataclasses.replace(base, listen=config.listen,
                                               upstreams=config.upstreams)
            return Edit(target.with_proxy(moved_config).enabled(name, enabled),
                        reset=frozenset({name}))

        await self.host.change(move)
        self._forget(name)
        self._listen_text[name], self._upstream_text[name] = listen, upstream
        return await self._answer(200, name)

    async def proxy_delete(self, name: str, body: bytes) -> Response:
        def delete(target: Target) -> Edit:
            self._proxy(target, name)
            return Edit(target.without_proxy(name))

        await self.host.change(delete)
        self._forget(name)
        return Response(204)

    async def populate(self, body: bytes) -> Response:
        kept: set[str] = set()
        try:
            plans = self._populate_plans(body)
            views = await self.host.views()
            target = await self.host.change(lambda t: self._populate(t, views, plans, kept))
        except (ApiError, HostError) as exc:
            # Toxiproxy answers a failed populate with the error and the proxies
            # field together.
            return _json(exc.status, {"error": exc.message, "status": exc.status,
                                      "proxies": []})
        for config, listen, upstream, _ in plans:
            if config.name not in kept:
                self._forget(config.name)
                self._listen_text[config.name] = listen
                self._upstream_text[config.name] = upstream
        views = await self.host.views(merged=True)
        return _json(201, {"proxies": [self._proxy_json(self._proxy(target, c.name),
                                                        views.get(c.name))
                                       for c, _, _, _ in plans]})

    def _populate_plans(self, body: bytes) -> list[tuple[ProxyConfig, str, str, bool]]:
        """Check every proxy of a populate request before anything changes."""
        items = _parse(body)
        if not isinstance(items, list):
            raise ApiError(f"{BAD_BODY}: expected a JSON array of proxies", 400)
        server = self.host.target.config.server
        plans: list[tuple[ProxyConfig, str, str, bool]] = []
        names: set[str] = set()
        for i, item in enumerate(items, 1):
            if not isinstance(item, Mapping):
                raise ApiError(f"{BAD_BODY}: proxy {i} is not a JSON object", 400)
            _known_fields(item, PROXY_FIELDS, f" at proxy {i}")
            fields = _proxy_fields(item)
            name, listen, upstream = fields["name"], fields["listen"], fields["upstream"]
            if not name:
                raise ApiError(f"{MISSING_FIELD}: name at proxy {i}", 400)
            if not upstream:
                raise ApiError(f"{MISSING_FIELD}: upstream at proxy {i}", 400)
            if name in names:
                raise ApiError(f"{BAD_BODY}: duplicate proxy name {name!r}", 400)
            names.add(name)
            listen = listen or DEFAULT_LISTEN
            enabled = True if fields["enabled"] is None else fields["enabled"]
            plans.append((_proxy_config(name, listen, upstream, server), listen, upstream,
                          enabled))
        return plans

    def _populate(self, target: Target, views: dict[str, ProxyView],
                  plans: list[tuple[ProxyConfig, str, str, bool]], kept: set[str]) -> Edit:
        """Keep the proxies whose listen and upstream are unchanged (with their
        toxics; named in ``kept``); replace the others (their connections are
        closed)."""
        replaced: set[str] = set()
        for config, listen, upstream, enabled in plans:
            existing = target.proxy(config.name)
            if existing is not None and listen in self._listen_forms(
                    existing, views.get(config.name)) and upstream == self._upstream(existing):
                kept.add(config.name)
                continue
            if existing is not None:
                replaced.add(config.name)
            target = target.with_proxy(config).enabled(config.name, enabled)
        return Edit(target, reset=frozenset(replaced))

    async def reset(self, body: bytes) -> Response:
        """Every proxy enabled, then every toxic removed: if a proxy cannot be
        bound, nothing changed (Toxiproxy stops half way)."""
        def reset(target: Target) -> Edit:
            proxies = tuple(dataclasses.replace(p, toxics=()) for p in target.config.proxies)
            return Edit(Target(dataclasses.replace(target.config, proxies=proxies)))

        await self.host.change(reset)
        return Response(204)

    # -- toxics --------------------------------------------------------------

    async def toxic_index(self, proxy: str, body: bytes) -> Response:
        return _json(200, list((await self._view(proxy)).toxics))

    async def toxic_show(self, proxy: str, toxic: str, body: bytes) -> Response:
        for data in (await self._view(proxy)).toxics:
            if data["name"] == toxic:
                return _json(200, data)
        raise ApiError(TOXIC_NOT_FOUND, 404)

    async def toxic_create(self, proxy: str, body: bytes) -> Response:
        toxic = _toxic_from_body(body, self._proxy(self.host.target, proxy).seed)
        name = toxic.name
        view = await self._view(proxy)
        taken = set(view.elements)

        def create(target: Target) -> Edit:
            config = self._proxy(target, proxy)
            if name in taken or any(t.name == name for t in config.toxics):
                raise ApiError(TOXIC_EXISTS, 409)
            spec = toxic_spec(toxic)
            return Edit(target.with_proxy(dataclasses.replace(config,
                                                              toxics=(*config.toxics, spec))))

        await self.host.change(create)
        return _json(200, toxic_json(toxic))

    async def toxic_update(self, proxy: str, toxic: str, body: bytes) -> Response:
        spec = await self._spec(proxy, toxic)
        data = _object(body, TOXIC_FIELDS)
        attributes = data.get("attributes")
        if attributes is not None and not isinstance(attributes, Mapping):
            raise ApiError(f"{BAD_BODY}: attributes: expected an object", 400)
        toxicity = data.get("toxicity")
        try:
            updated = build_toxic(dataclasses.replace(
                spec, toxicity=spec.toxicity if toxicity is None else toxicity,
                attributes=tuple(sorted({**dict(spec.attributes), **(attributes or {})}.items()))))
        except ToxicError as exc:
            raise ApiError(f"{BAD_BODY}: {exc}", 400) from None
        new_spec = dataclasses.replace(toxic_spec(updated), seed=spec.seed)

        def update(target: Target) -> Edit:
            config = self._proxy(target, proxy)
            toxics = tuple(new_spec if t.name == toxic and t.at_s == 0 and t.until_s is None
                           else t for t in config.toxics)
            return Edit(target.with_proxy(dataclasses.replace(config, toxics=toxics)))

        await self.host.change(update)
        return _json(200, toxic_json(updated))

    async def toxic_delete(self, proxy: str, toxic: str, body: bytes) -> Response:
        """Remove it, as Toxiproxy does; a toxic of the timeline too: its spec
        leaves the target, which takes it out of the timeline (removed now, its
        later events cancelled) and lets the rest of the scenario play on."""
        try:
            gone = await self._spec(proxy, toxic)
        except TimedToxic as exc:
            gone = exc.spec

        def delete(target: Target) -> Edit:
            config = self._proxy(target, proxy)
            toxics = tuple(t for t in config.toxics if t != gone)
            return Edit(target.with_proxy(dataclasses.replace(config, toxics=toxics)))

        await self.host.change(delete)
        return Response(204)

    # -- connections (midway's own) -------------------------------------------

    async def connection_index(self, body: bytes, query: Mapping[str, str]) -> Response:
        """Every open connection of every worker (``?proxy=NAME``: of one proxy)."""
        return _json(200, await self.host.connections(query.get("proxy", "")))

    async def connection_show(self, id: str, body: bytes, query: Mapping[str, str]) -> Response:
        found = await self.host.connection(_connection_id(id))
        if found is None:
            raise ApiError(CONNECTION_NOT_FOUND, 404)
        return _json(200, found)

    async def connection_delete(self, id: str, body: bytes,
                                query: Mapping[str, str]) -> Response:
        """Close it (reason ``killed``); ``?reset=true``: with an RST."""
        reset = query.get("reset", "false").lower()
        if reset not in ("true", "false", "1", "0"):
            raise ApiError(f"reset: expected true or false, got {reset!r}", 400)
        if not await self.host.close_connection(_connection_id(id), reset in ("true", "1")):
            raise ApiError(CONNECTION_NOT_FOUND, 404)
        return Response(204)

    async def connection_toxic(self, id: str, body: bytes, query: Mapping[str, str]) -> Response:
        """Attach a toxic (a body as for ``/proxies/NAME/toxics``) to this one
        connection; the seed defaults to the connection's proxy's."""
        number = _connection_id(id)
        found = await self.host.connection(number)
        if found is None:
            raise ApiError(CONNECTION_NOT_FOUND, 404)
        config = self.host.target.proxy(found["proxy"])
        toxic = _toxic_from_body(body, config.seed if config is not None else 0)
        answer = await self.host.add_connection_toxic(number, toxic_spec(toxic))
        if answer is None:  # it closed meanwhile
            raise ApiError(CONNECTION_NOT_FOUND, 404)
        return _json(200, answer)

    async def connection_toxic_index(self, id: str, body: bytes,
                                     query: Mapping[str, str]) -> Response:
        """The toxics of this connection's own (the proxy's are under
        ``/proxies/NAME/toxics``)."""
        toxics = await self.host.connection_toxics(_connection_id(id))
        if toxics is None:
            raise ApiError(CONNECTION_NOT_FOUND, 404)
        return _json(200, toxics)

    async def connection_toxic_delete(self, id: str, toxic: str, body: bytes,
                                      query: Mapping[str, str]) -> Response:
        """Remove a toxic of this connection's own, live: what it holds is
        flushed, nothing lost (404 ``toxic not found``; 409 for the proxy's)."""
        if not await self.host.remove_connection_toxic(_connection_id(id), toxic):
            raise ApiError(CONNECTION_NOT_FOUND, 404)
        return Response(204)

    # -- helpers -------------------------------------------------------------

    def _proxy(self, target: Target, name: str) -> ProxyConfig:
        config = target.proxy(name)
        if config is None:
            raise ApiError(PROXY_NOT_FOUND, 404)
        return config

    async def _view(self, name: str) -> ProxyView:
        self._proxy(self.host.target, name)
        view = (await self.host.views()).get(name)
        if view is None:
            raise ApiError(PROXY_NOT_FOUND, 404)
        return view

    async def _spec(self, proxy: str, toxic: str) -> ToxicSpec:
        """The toxic's spec in the target: one the configuration or the API put
        there.  Raises :class:`TimedToxic` (409) for an active toxic of the
        timeline, 404 for any other name."""
        config = self._proxy(self.host.target, proxy)
        for spec in config.toxics:
            if spec.name == toxic and spec.at_s == 0 and spec.until_s is None:
                return spec
        listed = next((t for t in (await self._view(proxy)).toxics if t["name"] == toxic), None)
        timed = [s for s in config.toxics if s.name == toxic]
        if listed is None or not timed:
            raise ApiError(TOXIC_NOT_FOUND, 404)
        # Names repeat only in windows apart: the active one is the one listed.
        raise TimedToxic(toxic, next((s for s in timed if _lists_as(s, listed)), timed[0]))

    async def _answer(self, status: int, name: str) -> Response:
        config = self._proxy(self.host.target, name)
        return _json(status, self._proxy_json(config, (await self.host.views(merged=True)).get(name)))

    def _forget(self, name: str) -> None:
        for texts in (self._listen_text, self._upstream_text, self._last_bound):
            texts.pop(name, None)

    def _listen(self, config: ProxyConfig, view: ProxyView | None) -> str:
        """Where the proxy listens: the bound address (real port) while enabled or
        once it has been, else the address it was given (as Toxiproxy reports it)."""
        if view is not None and view.enabled and view.bound:
            bound = self._last_bound[config.name] = ",".join(view.bound)
            return bound
        text = self._last_bound.get(config.name) or self._listen_text.get(config.name)
        return text if text is not None else ",".join(str(a) for a in config.listen)

    def _listen_forms(self, config: ProxyConfig, view: ProxyView | None) -> set[str]:
        """Every text that names the proxy's current listen address."""
        forms = {self._listen(config, view), ",".join(str(a) for a in config.listen)}
        forms.discard("")
        text = self._listen_text.get(config.name)
        if text is not None:
            forms.add(text)
        return forms

    def _upstream(self, config: ProxyConfig) -> str:
        text = self._upstream_text.get(config.name)
        return text if text is not None else ",".join(str(u) for u in config.upstreams)

    def _proxy_json(self, config: ProxyConfig, view: ProxyView | None) -> dict[str, Any]:
        return {
            "name": config.name,
            "listen": self._listen(config, view),
            "upstream": self._upstream(config),
            "enabled": config.name not in self.host.target.disabled,
            "toxics": list(view.toxics) if view is not None else [],
            # midway's own (docs/balancing.md): each upstream's weight, health,
            # active connections and last check (``at`` in Unix time), as the
            # first worker that answered sees them.
            "upstreams": list(view.upstreams) if view is not None else [],
        }


class TimedToxic(ApiError):
    """A change asked of a toxic of the timeline, which only the configuration
    changes (409); ``spec`` is the one active now."""

    def __init__(self, name: str, spec: ToxicSpec) -> None:
        super().__init__(
            f"toxic {name!r} belongs to the configuration's timeline (at_s/until_s), "
            "which adds and removes it at set times; the API does not change such a "
            "toxic, the file describes the scenario: change it there and reload, or "
            "DELETE it", 409)
        self.spec = spec


def _lists_as(spec: ToxicSpec, listed: Mapping[str, Any]) -> bool:
    """Whether a toxic listed by a worker (Toxiproxy's JSON) is built from ``spec``."""
    return (listed["type"], listed["stream"], listed["toxicity"], listed["attributes"]) == (
        spec.type, spec.stream, spec.toxicity, dict(spec.attributes))


def _toxic_from_body(body: bytes, proxy_seed: int) -> Toxic[Any]:
    """A toxic from a request body, with Toxiproxy's defaults and errors."""
    data = _object(body, TOXIC_FIELDS)
    given = data.get("stream")
    if given is None or given == "":
        given = DEFAULT_TOXIC_STREAM
    # Toxiproxy's ParseDirection lower-cases the text (Toxiproxy.Net sends
    # "UpStream"); its default name keeps the text as sent.
    stream = given.lower() if isinstance(given, str) else None
    if stream not in ("upstream", "downstream"):
        raise ApiError(INVALID_STREAM, 400)
    kind = data.get("type")
    name = data.get("name") or f"{kind}_{given}"
    if not isinstance(name, str):
        raise ApiError(f"{BAD_BODY}: name: expected a string, got {name!r}", 400)
    if not isinstance(kind, str) or kind not in TOXICS:
        raise ApiError(INVALID_TYPE, 400)
    toxicity = data.get("toxicity")
    try:
        return make_toxic(kind, name=name, stream=stream,
                          toxicity=DEFAULT_TOXICITY if toxicity is None else toxicity,
                          attributes=data.get("attributes") or {},
                          conditions=data.get("conditions"),
                          seed=_seed(data.get("seed"), proxy_seed))
    except ToxicError as exc:
        raise ApiError(f"{BAD_BODY}: {exc}", 400) from None


MAX_ID_DIGITS = 20
"""Digits of the largest connection id: ids are unsigned 64-bit counts
(:class:`~midway.control.worker.ConnectionIds`), 2**64 - 1 has 20.  Longer text
names no connection; without the cap ``int()`` would refuse 4300 digits or more
(ValueError, Python's int_max_str_digits) and the request would answer 500."""


def _connection_id(text: str) -> int:
    """A connection id from the path: ASCII decimal digits only (``str.isdigit``
    also takes ``²`` or ``٣``, which ``int()`` refuses or reads as 3), at most
    :data:`MAX_ID_DIGITS`.  Anything else, or 0, names no connection (404
    ``connection not found``, as an unknown one)."""
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_ID_DIGITS \
            or int(text) < 1:
        raise ApiError(CONNECTION_NOT_FOUND, 404)
    return int(text)


def toxic_types() -> list[dict[str, Any]]:
    """``GET /toxic-types``: ``[{"type", "doc", "attributes": [{"name",
    "default", "unit", "doc", "minimum", "maximum", "integer"}]}]``, from
    :data:`~midway.chain.toxics.TOXICS` (so it cannot drift from what the toxics
    accept)."""
    out = []
    for kind, cls in TOXICS.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n", 1)[0]
        attributes = [{"name": f.name, "default": f.default, "unit": f.metadata.get("unit", ""),
                       "doc": f.metadata.get("doc", ""),
                       "minimum": f.metadata.get("minimum", 0),
                       "maximum": f.metadata.get("maximum"),
                       "integer": f.metadata.get("kind", int) is int}
                      for f in dataclasses.fields(cls.attributes_class)]
        out.append({"type": kind, "doc": " ".join(doc.replace("``", "").split()), "attributes": attributes})
    return out


def _seed(given: object, proxy_seed: int) -> int | None:
    """A toxic's seed from a body: its own if given, else the proxy's (0: none)."""
    if given is None:
        return proxy_seed or None
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        raise ApiError(f"{BAD_BODY}: seed: expected a whole number of at least 0, got {given!r}",
                       400)
    return given


def _json(status: int, value: Any) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


def _error(message: str, status: int) -> Response:
    return _json(status, {"error": message, "status": status})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(f"{BAD_BODY}: not UTF-8 text", 400) from None
    except RecursionError:  # [[[[...]]]]: the decoder recurses once per level
        raise ApiError(f"{BAD_BODY}: nested too deeply", 400) from None
    except ValueError as exc:
        raise ApiError(f"{BAD_BODY}: {exc}", 400) from None


def _object(body: bytes, known: tuple[str, ...]) -> Mapping[str, Any]:
    data = _parse(body)
    if not isinstance(data, Mapping):
        raise ApiError(f"{BAD_BODY}: expected a JSON object", 400)
    _known_fields(data, known)
    return data


def _known_fields(data: Mapping[str, Any], known: tuple[str, ...], where: str = "") -> None:
    """Ignore a field midway does not know, as Toxiproxy does (its clients may send
    fields of newer versions), but say so: a typo such as ``enable`` would otherwise
    answer 200 and change nothing without a word.  Logged once per field name."""
    for key in data:
        if key not in known and key not in _WARNED_FIELDS \
                and len(_WARNED_FIELDS) < _MAX_WARNED_FIELDS:
            _WARNED_FIELDS.add(str(key))
            log.warning("admin API: ignoring unknown field %r%s (known: %s)", key, where,
                        ", ".join(known))


_WARNED_FIELDS: set[str] = set()
_MAX_WARNED_FIELDS = 256
"""Bound on the remembered names, so a client sending random keys cannot grow it."""


def _proxy_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The proxy fields of a request body, type-checked (absent: ``None``)."""
    out: dict[str, Any] = {}
    for key in ("name", "listen", "upstream"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ApiError(f"{BAD_BODY}: {key}: expected a string, got {value!r}", 400)
        out[key] = value
    enabled = data.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ApiError(f"{BAD_BODY}: enabled: expected true or false, got {enabled!r}", 400)
    out["enabled"] = enabled
    return out


def _upstream_entries(text: str) -> list[str]:
    """A comma-separated ``upstream`` into entries, each in the quick form: a
    ``weight=N`` or ``backup`` after an address belongs to it
    (``a:1,weight=3,b:2`` is two upstreams)."""
    entries: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if entries and (part == "backup" or part.startswith("weight=")):
            entries[-1] += "," + part
        else:
            entries.append(part)
    return entries


def _proxy_config(name: str, listen: str, upstream: str, server: ServerConfig,
                  base: ProxyConfig | None = None) -> ProxyConfig:
    """Validate a proxy's name and addresses (comma-separated lists allowed),
    for the running ``server`` (with workers, no unix-socket listener)."""
    table = {"listen": [a.strip() for a in listen.split(",")],
             "upstreams": _upstream_entries(upstream)}
    try:
        config = config_from_dict({"proxy": {name: table}}).proxies[0]
        check_workers(server, (config,))
    except ConfigError as exc:
        key = exc.path.removeprefix(f"proxy.{name}").lstrip(".") or "name"
        if key.startswith("upstreams"):  # the body's field is Toxiproxy's "upstream"
            key = "upstream" + key.removeprefix("upstreams")
        raise ApiError(f"{BAD_BODY}: {key}: {exc.message}", 400) from None
    if base is not None:
        config = dataclasses.replace(base, listen=config.listen, upstreams=config.upstreams)
    return config
