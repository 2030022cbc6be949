"""What every toxic shares: validated attributes, conditions, and the chain element.

Theory of operation
-------------------
A :class:`Toxic` is a chain :class:`~midway.chain.base.Element` with Toxiproxy's
shared settings: ``type``, ``name``, ``stream`` (the one direction it acts on),
``toxicity`` and ``attributes`` (a frozen dataclass per toxic type, with
Toxiproxy's attribute names, units and defaults).  midway adds ``conditions``.

When a connection opens (or the toxic is added to a live one), :meth:`Toxic.attach`
decides once whether the toxic applies to it: first the conditions (client CIDR,
first N connections, every Nth connection), then one toxicity draw from the
connection's random source (``rng.random() < toxicity``, as Toxiproxy's
``rand.Float32() < toxicity``).  That source is a generator of the connection's own,
seeded from (seed, toxic name, connection sequence number), and the stage draws
from it too (jitter, slice sizes, corrupted bytes): with the same seed and the same
connection order a run repeats exactly, however the traffic's timing interleaves
the connections.  A toxic given no seed draws one and logs it on its first
connection, so a failing run can be replayed; an injected ``rng`` is used as is,
shared by every connection (for tests).  If it applies, the attachment carries one
:class:`ToxicStage` on the toxic's stream and nothing on the other, so the other
direction keeps the relay's fast path.

Stages block only through :meth:`ToxicStage.pause`, a wrapper of ``out.sleep``.  When
a sleep is cut short (the toxic is being removed, or the connection is closing) the
stage switches to *bypass*: it passes on what it holds, in order, and never waits
again.  That is how removal loses, duplicates and reorders nothing.

Timers that must fire without data (the ``timeout`` toxic) run as a task the stage
owns, armed by :meth:`ToxicStage.start`.  The current relay protocol has no "stage
installed" call, so a stage arms itself on its first ``data``/``eof``; a relay that
calls ``start(out)`` when it installs a stage makes the timer count from that moment
instead (as Toxiproxy does).  ``close()`` cancels the task.  The task waits with
``out.sleep`` while the relay may be calling the stage, so an ``Output`` must allow
a stage's task to sleep concurrently with the stage (and cut both short on removal).

``after_s`` (a condition that depends on time, not on the connection) is applied per
chunk by :class:`AfterGate`: until the toxic is ``after_s`` old the chunk passes
unchanged.  The toxic's age is measured on the relay's clock (``out.now()``).  Pass
``clock`` to record the creation time at once; without one (for example a toxic
built from the configuration before the event loop runs) the creation time is taken
lazily, the first time any stage of the toxic sees a chunk, i.e. ``after_s`` then
counts from the first traffic through the toxic.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import ipaddress
import itertools
import logging
import math
import random
import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, Self, TypeVar

from midway.chain.base import (
    DIRECTIONS,
    DOWNSTREAM,
    UPSTREAM,
    Attachment,
    ConnectionInfo,
    Direction,
    Element,
    Output,
    Stage,
)
from midway.chain.framing import make_framer
from midway.chain.toxics.match import StreamMatcher, compile_pattern
from midway.chain.toxics.message import DEFAULT_FRAMING, MessageCounter
from midway.chain.toxics.trigger import Finder, MatchGate, MatchWatch, Trigger
from midway.config.schema import (
    DEFAULT_TOXIC_STREAM,
    DEFAULT_TOXICITY,
    NAME_MAX_LEN,
    toxic_name_problem,
)
from midway.core.clock import Clock
from midway.errors import MidwayError

__all__ = [
    "ToxicError",
    "Attributes",
    "attribute",
    "Conditions",
    "Toxic",
    "ToxicStage",
    "AfterGate",
    "HOLD_S",
    "spawn",
]

HOLD_S = 3600.0
"""How long one wait of a stage that holds data "forever" lasts (blackhole,
bandwidth rate 0); it simply waits again, until cut short."""

SEED_RANGE = 2**32
"""Drawn seeds are from 1 to below this: ten digits at most in a log line, and as
many distinct runs as anyone replays (never 0, which a proxy's ``seed`` option
reads as "no seed")."""

log = logging.getLogger("midway")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ToxicError(MidwayError, ValueError):
    """A toxic's settings are invalid.  ``field`` names the offending setting
    (``stream``, ``toxicity``, ``attributes.jitter``, ``conditions.first_n``...)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def attribute(default: float, unit: str, doc: str, *, minimum: float = 0,
              maximum: float | None = None, kind: builtins.type = int) -> Any:
    """Declare one toxic attribute in ``unit``, from ``minimum`` to ``maximum``.
    ``kind`` is ``int`` (Toxiproxy's attributes are all JSON integers) or, for
    midway's own toxics, ``float`` (a number: integers are accepted too)."""
    return field(default=default, metadata={
        "unit": unit, "doc": doc, "minimum": minimum, "maximum": maximum, "kind": kind,
    })


INT_MAXIMUM = 2**63 - 1
"""The largest integer attribute: Toxiproxy's attributes are Go ``int64``, and
it refuses a larger number in a body."""


@dataclass(frozen=True)
class Attributes:
    """Base of each toxic's attribute dataclass.  Construction validates: every
    field is an ``int`` (not ``bool``), or a finite number for a ``float``
    attribute, within its bounds."""

    toxic_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            unit = f.metadata.get("unit", "")
            minimum = f.metadata.get("minimum", 0)
            maximum = f.metadata.get("maximum")
            if f.metadata.get("kind", int) is int and maximum is None:
                maximum = INT_MAXIMUM
            if f.metadata.get("kind", int) is float:
                if not _is_number(value) or not math.isfinite(value):
                    raise ToxicError(
                        f"attributes.{f.name}", f"must be a number ({unit}), got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif not _is_int(value):
                raise ToxicError(
                    f"attributes.{f.name}",
                    f"must be an integer ({unit}), got {value!r}",
                )
            if value < minimum:
                need = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
                raise ToxicError(f"attributes.{f.name}", f"{need} ({unit}), got {value!r}")
            if maximum is not None and value > maximum:
                raise ToxicError(
                    f"attributes.{f.name}", f"must be at most {maximum:g} ({unit}), got {value!r}"
                    if isinstance(maximum, float) else
                    f"must be at most {maximum} ({unit}), got {value!r}")
        self.check()

    def check(self) -> None:
        """Cross-field validation; override where attributes constrain each other."""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object] | None) -> Self:
        """Build from a JSON/TOML mapping; missing attributes take their defaults
        (as Toxiproxy's zero values).  Raises :class:`ToxicError` naming the
        attribute that is unknown or invalid."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ToxicError("attributes", f"must be a mapping, got {raw!r}")
        known = [f.name for f in fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                names = ", ".join(known) or "none"
                raise ToxicError(
                    f"attributes.{key}",
                    f"unknown attribute of the {cls.toxic_type} toxic (known: {names})",
                )
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self) -> dict[str, float]:
        """Every attribute, defaults included, under Toxiproxy's names."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Conditions:
    """midway's extra conditions on when a toxic applies (all must hold).  The
    default (no conditions) applies to every connection."""

    client_cidr: tuple[Network, ...] = ()
    """Apply only to clients whose IP is in one of these networks.  Empty: any
    client.  Unix-socket clients never match a non-empty list.  An IPv4-mapped
    IPv6 client (``::ffff:1.2.3.4``) also matches IPv4 networks."""
    first_n: int | None = None
    """Apply only to the proxy's first N connections (``info.sequence <= N``).
    ``None``: no limit."""
    every_nth: int | None = None
    """Apply only to every Nth connection (``info.sequence % N == 0``).  ``None``: all."""
    after_s: float = 0.0
    """Seconds after the toxic's creation before it takes effect, checked per chunk
    (earlier chunks pass unchanged).  0: at once."""
    match: str | None = None
    """A regular expression over bytes (the string encoded as UTF-8): the toxic
    applies on a connection from the first byte of its first match on (see
    :mod:`midway.chain.toxics.trigger`).  ``None``: from the start."""
    match_stream: Direction | None = None
    """The stream searched for ``match``.  ``None``: the toxic's own."""
    message: int | None = None
    """The toxic applies on a connection from the first byte of its Nth message
    (from 1) under ``framing`` on ``message_stream`` (see
    :mod:`midway.chain.toxics.message`).  ``None``: from the start.  Not with
    ``match``."""
    message_stream: Direction | None = None
    """The stream whose messages ``message`` counts.  ``None``: the toxic's own."""
    framing: str | None = None
    """With ``message``: how messages are cut, a :func:`~midway.chain.framing.make_framer`
    spec (``line:\\r\\n``, ``length:4:big``, ``fixed:16``).  ``None``: ``line``
    (lines ending in ``\\n``, which ``\\r\\n`` lines do too)."""
    for_s: float = 0.0
    """With ``match`` or ``message``: seconds after the trigger when the toxic
    stops applying, checked per chunk.  0: for the rest of the connection."""

    KEYS: ClassVar[tuple[str, ...]] = ("client_cidr", "first_n", "every_nth", "after_s",
                                       "match", "match_stream", "message", "message_stream",
                                       "framing", "for_s")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object] | None) -> Conditions:
        """Validate a JSON/TOML mapping.  ``client_cidr`` is a CIDR string or a list
        of them (a bare address means a single host; host bits are ignored)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ToxicError("conditions", f"must be a mapping, got {raw!r}")
        for key in raw:
            if key not in cls.KEYS:
                raise ToxicError(
                    f"conditions.{key}",
                    f"unknown condition (known: {', '.join(cls.KEYS)})",
                )
        match = _parse_match(raw.get("match"))
        for_s = _parse_seconds("for_s", raw.get("for_s", 0.0))
        match_stream = _parse_stream("match_stream", raw.get("match_stream"))
        if match is None and match_stream is not None:
            raise ToxicError("conditions.match_stream", "needs a match condition")
        message = _parse_count("message", raw.get("message"))
        message_stream = _parse_stream("message_stream", raw.get("message_stream"))
        framing = _parse_framing(raw.get("framing"))
        if message is None and (message_stream is not None or framing is not None):
            key = "framing" if framing is not None else "message_stream"
            raise ToxicError(f"conditions.{key}", "needs a message condition")
        if match is not None and message is not None:
            raise ToxicError("conditions.message",
                             "give match or message, not both (one trigger per toxic)")
        if match is None and message is None and for_s:
            raise ToxicError("conditions.for_s", "needs a match or message condition")
        return cls(
            client_cidr=_parse_cidrs(raw.get("client_cidr", ())),
            first_n=_parse_count("first_n", raw.get("first_n")),
            every_nth=_parse_count("every_nth", raw.get("every_nth")),
            after_s=_parse_seconds("after_s", raw.get("after_s", 0.0)),
            match=match,
            match_stream=match_stream,
            message=message,
            message_stream=message_stream,
            framing=framing,
            for_s=for_s,
        )

    def matches(self, info: ConnectionInfo) -> bool:
        """Whether the per-connection conditions hold (``after_s`` is per chunk)."""
        if self.first_n is not None and info.sequence > self.first_n:
            return False
        if self.every_nth is not None and info.sequence % self.every_nth != 0:
            return False
        if self.client_cidr:
            return _client_in(info.client_addr, self.client_cidr)
        return True

    def to_json(self) -> dict[str, object]:
        """The conditions that are set, in the form :meth:`from_mapping` reads."""
        out: dict[str, object] = {}
        if self.client_cidr:
            out["client_cidr"] = [str(n) for n in self.client_cidr]
        if self.first_n is not None:
            out["first_n"] = self.first_n
        if self.every_nth is not None:
            out["every_nth"] = self.every_nth
        if self.after_s:
            out["after_s"] = self.after_s
        if self.match is not None:
            out["match"] = self.match
        if self.match_stream is not None:
            out["match_stream"] = self.match_stream
        if self.message is not None:
            out["message"] = self.message
        if self.message_stream is not None:
            out["message_stream"] = self.message_stream
        if self.framing is not None:
            out["framing"] = self.framing
        if self.for_s:
            out["for_s"] = self.for_s
        return out


def _parse_cidrs(raw: object) -> tuple[Network, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ToxicError("conditions.client_cidr", f"must be a CIDR or a list of them, got {raw!r}")
    nets: list[Network] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ToxicError(f"conditions.client_cidr[{i}]", f"must be a string, got {item!r}")
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ToxicError(f"conditions.client_cidr[{i}]", f"not a CIDR: {item!r}") from exc
    return tuple(nets)


def _parse_count(key: str, raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ToxicError(f"conditions.{key}", f"must be an integer of at least 1, got {raw!r}")
    return raw


def _parse_seconds(key: str, raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ToxicError(f"conditions.{key}", f"must be a number of seconds, got {raw!r}")
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ToxicError(f"conditions.{key}", f"must be finite and not negative, got {raw!r}")
    return value


def _parse_stream(key: str, raw: object) -> Direction | None:
    if raw is None:
        return None
    if raw not in DIRECTIONS:
        raise ToxicError(f"conditions.{key}", f'must be "upstream" or "downstream", got {raw!r}')
    return UPSTREAM if raw == UPSTREAM else DOWNSTREAM


def _parse_framing(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ToxicError("conditions.framing", f"must be a framing spec (a string), got {raw!r}")
    try:
        make_framer(raw)
    except ValueError as exc:
        raise ToxicError("conditions.framing", str(exc)) from exc
    return raw


def _parse_match(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        raise ToxicError("conditions.match", f"must be a non-empty regular expression, got {raw!r}")
    try:
        compile_pattern(raw)
    except re.error as exc:
        raise ToxicError("conditions.match", f"not a regular expression: {exc}") from exc
    return raw


def _fresh_seed() -> int:
    """A seed for a toxic given none, from the operating system (an injected
    ``rng`` is left untouched), in a range that is easy to copy from a log line."""
    return random.SystemRandom().randrange(1, SEED_RANGE)


def _client_in(addr: tuple[str, int] | None, nets: tuple[Network, ...]) -> bool:
    if addr is None:  # unix socket client
        return False
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c in n for c in candidates for n in nets)


A = TypeVar("A", bound=Attributes)


_STATE_KEYS = itertools.count(1)
"""Numbers the toxics' state keys: unlike ``id()``, never reused by a toxic built
after another was freed, so a toxic added again never finds its predecessor's
state on a connection."""


class Toxic(Element, Generic[A]):
    """One toxic's shared settings.  Immutable once built; build through
    :func:`midway.chain.toxics.make_toxic` or a subclass's constructor (both
    validate, raising :class:`ToxicError`)."""

    type: ClassVar[str]
    """Toxiproxy's type name (``latency``, ``bandwidth``...)."""
    attributes_class: ClassVar[builtins.type[Attributes]]

    def __init__(
        self,
        attributes: A | None = None,
        *,
        name: str | None = None,
        stream: str = DEFAULT_TOXIC_STREAM,
        toxicity: float = DEFAULT_TOXICITY,
        conditions: Conditions | Mapping[str, object] | None = None,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        seed: int | None = None,
    ) -> None:
        if stream not in DIRECTIONS:
            raise ToxicError("stream", f'must be "upstream" or "downstream", got {stream!r}')
        if not _is_number(toxicity) or not 0.0 <= toxicity <= 1.0:
            raise ToxicError("toxicity", f"must be a number from 0 to 1, got {toxicity!r}")
        if name is not None:
            if not isinstance(name, str):
                raise ToxicError("name", f"must be a string, got {name!r}")
            problem = toxic_name_problem(name)
            if problem is not None:
                got = repr(name) if len(name) <= NAME_MAX_LEN else f"{len(name)} characters"
                raise ToxicError("name", f"{problem}, got {got}")
        if attributes is None:
            attributes = self.attributes_class()  # type: ignore[assignment]
        if not isinstance(attributes, self.attributes_class):
            raise ToxicError("attributes", f"must be {self.attributes_class.__name__}")
        if not isinstance(conditions, Conditions):
            conditions = Conditions.from_mapping(conditions)
        self.stream: Direction = UPSTREAM if stream == UPSTREAM else DOWNSTREAM
        self.name = name if name is not None else f"{self.type}_{self.stream}"
        self.toxicity = float(toxicity)
        self.attributes: A = attributes
        self.conditions = conditions
        self.pattern = None if conditions.match is None else compile_pattern(conditions.match)
        if seed is not None and not _is_int(seed):
            raise ToxicError("seed", f"must be an integer, got {seed!r}")
        self.rng = rng
        """An injected random source shared by every connection (tests); ``None``:
        each connection gets its own generator derived from :attr:`seed`."""
        self.seed_given = seed is not None
        self.seed: int = seed if seed is not None else _fresh_seed()
        """The seed in use (given, or drawn and logged on the first connection)."""
        self._seed_logged = self.seed_given or rng is not None
        self.state_key = f"midway.toxic-state.{next(_STATE_KEYS)}"
        """The key of this toxic's per-connection state in ``info.extra``, for
        stages that keep some (:attr:`ToxicStage.stateful`).  An update hands it
        to the new toxic, so the state outlives the update, as Toxiproxy keeps a
        stateful toxic's state in the connection's stub."""
        self.created_at: float | None = clock.now() if clock is not None else None
        """Creation time on the relay's clock; ``None`` until first needed if no
        clock was given (see the module doc)."""
        self.superseded = False
        """Set (the one change after building) when an update puts another toxic of
        the same type and stream in its place: its stages are then ending because
        of an update, not a removal.  Only ``timeout`` tells the two apart, as
        Toxiproxy runs a toxic's ``Cleanup`` on removal and not on update."""

    def connection_rng(self, sequence: int) -> random.Random:
        """The random source of connection number ``sequence``: the injected
        ``rng`` if there is one, else a generator seeded from (seed, name,
        sequence), so a connection's draws depend on nothing but those three."""
        if self.rng is not None:
            return self.rng
        # A str seed is hashed with SHA-512 (random.seed version 2): the same in
        # every process, unlike hash(), which PYTHONHASHSEED randomises.
        return random.Random(f"midway:{self.seed}:{self.name}:{sequence}")

    def attach(self, info: ConnectionInfo) -> Attachment | None:
        if not self.conditions.matches(info):
            return None
        if not self._seed_logged:
            self._seed_logged = True
            log.info("toxic %r: random seed %d (give seed = %d to replay this run)",
                     self.name, self.seed, self.seed)
        rng = self.connection_rng(info.sequence)
        if not rng.random() < self.toxicity:
            return None
        inner = self.make_stage()
        inner.rng = rng
        if inner.stateful:
            state = info.extra.setdefault(self.state_key, {})
            assert isinstance(state, dict)
            inner.adopt_state(state)
        stage: Stage = AfterGate(inner, self) if self.conditions.after_s > 0 else inner
        watch: Stage | None = None
        finder = self._finder()
        if finder is not None:
            trigger = Trigger()
            c = self.conditions
            own = (c.match_stream if self.pattern is not None else c.message_stream) \
                in (None, self.stream)
            stage = MatchGate(stage, finder if own else None, trigger, c.for_s)
            if not own:
                watch = MatchWatch(finder, trigger)
        if self.stream == UPSTREAM:
            return Attachment(upstream=stage, downstream=watch)
        return Attachment(downstream=stage, upstream=watch)

    def _finder(self) -> Finder | None:
        """A fresh per-connection finder of the ``match`` or ``message`` trigger."""
        if self.pattern is not None:
            return StreamMatcher(self.pattern)
        if self.conditions.message is not None:
            return MessageCounter(self.conditions.message,
                                  self.conditions.framing or DEFAULT_FRAMING)
        return None

    @abc.abstractmethod
    def make_stage(self) -> ToxicStage[A]:
        """A fresh per-connection stage."""

    def active_at(self, out: Output) -> bool:
        """Whether ``after_s`` has passed (on ``out``'s clock)."""
        if self.created_at is None:
            self.created_at = out.now()
        return out.now() >= self.created_at + self.conditions.after_s

    def to_json(self) -> dict[str, object]:
        """Toxiproxy's JSON shape.  Conditions are midway's own and are left out,
        so strict Toxiproxy clients see exactly what they expect; use
        ``conditions.to_json()``."""
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": self.attributes.to_json(),
        }

    def __repr__(self) -> str:
        return (
            f"<{builtins.type(self).__name__} {self.name!r} {self.stream}"
            f" toxicity={self.toxicity} {self.attributes}>"
        )


class ToxicStage(Stage, Generic[A]):
    """Base of the per-connection stages: the toxic's attributes, and waits that
    switch the stage to bypass once cut short."""

    stateful: ClassVar[bool] = False
    """Whether the stage keeps per-connection state across an update of its toxic
    (Toxiproxy's ``StatefulToxic``: only ``limit_data``, whose count of bytes
    passed goes on).  Such a stage gets it through :meth:`adopt_state`."""

    def adopt_state(self, state: dict[str, object]) -> None:
        """Take this connection's state dict for the toxic: empty on a new
        connection, what the replaced stage left in it after an update.  It lives
        in ``info.extra`` until the connection closes."""

    def __init__(self, toxic: Toxic[A]) -> None:
        self.toxic = toxic
        self.attributes: A = toxic.attributes
        self.rng: random.Random = toxic.connection_rng(0)
        """This connection's random source (set by :meth:`Toxic.attach`)."""
        self.bypass = False
        """Set once a wait was cut short (removal, or the connection closing): from
        then on the stage passes everything straight on and never waits again."""

    def start(self, out: Output) -> None:
        """Arm timers that must run even when no data arrives.  Idempotent; the
        default has none.  See the module doc for who calls it."""

    async def pause(self, out: Output, seconds: float) -> bool:
        """Wait ``seconds``; ``True`` if the full time passed.  Returns ``False`` at
        once in bypass, and enters bypass when ``out.sleep`` is cut short."""
        if self.bypass:
            return False
        if seconds <= 0:
            return True
        if await out.sleep(seconds):
            return True
        self.bypass = True
        return False

    async def hold(self, out: Output) -> None:
        """Wait until cut short (a stall: nothing passes until the toxic goes)."""
        while await self.pause(out, HOLD_S):
            pass


class AfterGate(Stage):
    """Passes chunks unchanged until the toxic is ``after_s`` old, then hands every
    call to the toxic's stage (it stays active: the clock is monotonic)."""

    def __init__(self, inner: Stage, toxic: Toxic[Any]) -> None:
        self.inner = inner
        self.toxic = toxic
        self.active = False

    def _check(self, out: Output) -> bool:
        if not self.active and self.toxic.active_at(out):
            self.active = True
        return self.active

    def start(self, out: Output) -> None:
        if self._check(out):
            self.inner.start(out)

    async def data(self, data: bytes, out: Output) -> None:
        if self._check(out):
            await self.inner.data(data, out)
        else:
            await out.send(data)

    async def eof(self, out: Output) -> None:
        if self._check(out):
            await self.inner.eof(out)
        else:
            await out.send_eof()

    async def flush(self, out: Output) -> None:
        if self.active:
            await self.inner.flush(out)

    def close(self) -> None:
        self.inner.close()


def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Start a stage-owned background task (the stage cancels it in ``close``)."""
    return asyncio.get_running_loop().create_task(coro)
