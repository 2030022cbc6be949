"""What the control plane says to a worker, and the one interface it says it
through.

Every command is plain, immutable data, answered with plain data, so the same
command can be run on the runtime of this very process (:class:`LocalHandle`,
a direct call) or sent to a worker process over its channel
(:mod:`midway.control.channel`).  A worker runs the commands it receives one at
a time, in order (:class:`~midway.control.agent.WorkerAgent`).

Where to add a command: a frozen dataclass here, a method on the agent
registered in ``WorkerAgent._commands``, and a caller in the control plane:
:meth:`~midway.control.plane.ControlPlane.gather` sends it to every worker and
returns every answer (to merge, as ``/metrics`` does), or
:meth:`~midway.control.plane.ControlPlane.ask` asks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config.addresses import Address
from ..config.schema import ToxicSpec
from ..config.target import Target
from ..errors import MidwayError

__all__ = ["Command", "Apply", "Applied", "Views", "CollectMetrics", "ListConnections",
           "CloseConnection", "AddConnectionToxic", "ListConnectionToxics",
           "RemoveConnectionToxic", "CommandFailed",
           "WorkerLost", "WorkerHandle", "LocalHandle", "COMMAND_TIMEOUT_S"]

COMMAND_TIMEOUT_S = 10.0
"""How long the control plane waits for one worker to answer one command.  Every
command is a few dictionary updates and binds per proxy; a worker that takes
longer has a blocked event loop (a hook that never returns) and is restarted.
Below the admin API's 25 s route timeout, so the API answers with the reason."""


class Command:
    """Base of the commands (a marker)."""


@dataclass(frozen=True)
class Apply(Command):
    """Run ``target`` from now on (see :func:`~midway.control.plan.plan`)."""

    target: Target
    reset: frozenset[str] = frozenset()
    """Proxies whose open connections are closed."""
    reload: bool = False
    """A reload: removed proxies drain, hooks are imported anew."""


@dataclass(frozen=True)
class Applied:
    """A worker's answer to :class:`Apply`."""

    listen: dict[str, tuple[Address, ...]] = field(default_factory=dict)
    """Each proxy's listen addresses with real ports (port 0 asked → the bound one)."""
    restart_needed: tuple[str, ...] = ()
    """Server keys whose new value needs a restart (their running value is kept)."""


@dataclass(frozen=True)
class Views(Command):
    """Every proxy's live state: answered with ``{name: ProxyView}``."""


@dataclass(frozen=True)
class CollectMetrics(Command):
    """The worker's metrics snapshot (:meth:`midway.metrics.Metrics.snapshot`)."""


@dataclass(frozen=True)
class ListConnections(Command):
    """The worker's open connections (those still connecting too), each a JSON
    object as ``GET /connections`` shows it (see
    :func:`midway.control.connections.connection_json`); ``proxy`` (when not
    empty) keeps only that proxy's.  ``id`` (when not 0) keeps only that one."""

    proxy: str = ""
    id: int = 0


@dataclass(frozen=True)
class CloseConnection(Command):
    """Close connection ``id`` (reason ``killed``); ``reset``: with an RST.
    Answered with True, or False when this worker has no such connection."""

    id: int
    reset: bool = False


@dataclass(frozen=True)
class AddConnectionToxic(Command):
    """Attach the toxic ``spec`` to connection ``id`` alone.  Answered with the
    toxic's JSON, or None when this worker has no such connection; raises
    :class:`CommandFailed` (409) when the connection has an element of that name."""

    id: int
    spec: ToxicSpec


@dataclass(frozen=True)
class ListConnectionToxics(Command):
    """The toxics of connection ``id``'s own (those :class:`AddConnectionToxic`
    attached), each as Toxiproxy's JSON; None when this worker has no such
    connection."""

    id: int


@dataclass(frozen=True)
class RemoveConnectionToxic(Command):
    """Remove the toxic ``name`` of connection ``id``'s own, live (held bytes
    flushed).  Answered with True, or None when this worker has no such
    connection; raises :class:`CommandFailed`: 404 when the connection has no
    toxic of its own by that name, 409 when ``name`` is its proxy's."""

    id: int
    name: str


class CommandFailed(MidwayError):
    """A worker could not carry out a command; ``status`` is the HTTP status the
    admin API answers with (400 for what the request got wrong, 409 for a name
    taken, 500 for what the system refused, such as an address in use)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommandFailed, (self.message, self.status))


class WorkerLost(MidwayError):
    """A worker died, or did not answer in time, before it answered a command."""


class WorkerHandle(Protocol):
    """One worker as the control plane sees it."""

    @property
    def number(self) -> int: ...

    @property
    def pid(self) -> int: ...

    async def call(self, command: Command, timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        """Run ``command`` on the worker and return its answer.  Raises
        :class:`CommandFailed` when the worker refused it, and
        :class:`WorkerLost` when the worker died or did
        not answer within ``timeout_s``."""
        ...


class _Executor(Protocol):
    async def execute(self, command: Command) -> Any: ...


class LocalHandle:
    """The worker that is this process: a command is a direct call on its agent
    (no copy, no channel, nothing added to a single process)."""

    def __init__(self, agent: _Executor, number: int = 1, pid: int = 0) -> None:
        self.agent = agent
        self.number = number
        self.pid = pid

    async def call(self, command: Command, timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        return await self.agent.execute(command)
