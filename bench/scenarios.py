"""The benchmark scenarios: what each measures, against which backend, and how.

A scenario's `measure` gets a started proxy (or `direct`) whose upstream is the scenario's
backend, runs the load generator pinned to the load CPU, and returns metric values. Proxy CPU time
is the utime+stime of the proxy's whole process tree (all threads, workers and forked children)
read from /proc before and after the load generator ran.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench import backends, procs
from bench.proxies import Proxy, Running, midway_help

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"


@dataclass(frozen=True)
class Settings:
    duration: int  # seconds per iperf3 test / wrk run
    pingpong_n: int  # measured round trips
    idle_conns: int  # idle connections opened through the proxy
    idle_many: int  # connections asked of the idle50k scenario (capped by what fits)
    wrk_connections: int
    proxy_cpus: str  # taskset list for the proxy
    load_cpus: str  # taskset list for backends and load generators
    all_cpus: str  # taskset list for unpinned runs
    workdir: Path


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    # shown as (median of this proxy) - (median of direct): "added over direct"
    minus_direct: bool = False


class BackendFactory(Protocol):
    def __call__(self, *, cpus: str, workdir: Path) -> AbstractContextManager[int]: ...


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    about: str
    metrics: tuple[Metric, ...]
    backend: BackendFactory
    measure: Callable[[Settings, Running], dict[str, float]]
    tools: tuple[str, ...]  # executables the scenario needs besides the proxies
    with_direct: bool = True
    pinned: bool = True
    # replaces the selected proxies by scenario-specific variants (and notes on what was skipped)
    variants: Callable[[list[Proxy]], tuple[list[Proxy], list[str]]] | None = None


# ---------------------------------------------------------------------------------------------
# 1. bulk transfer (iperf3)


def _iperf(s: Settings, target: Running, streams: int) -> dict[str, float]:
    with backends.iperf3_server(target.upstream_port, cpus=s.load_cpus, workdir=s.workdir):
        before = target.cpu_seconds()
        out = procs.run(
            [
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(target.port),
                "-t",
                str(s.duration),
                "-P",
                str(streams),
                "-J",
                "--connect-timeout",
                "3000",
            ],
            cpus=s.load_cpus,
            timeout=s.duration + 30,
        )
        after = target.cpu_seconds()
    try:
        received = json.loads(out)["end"]["sum_received"]
    except (ValueError, KeyError) as exc:
        raise procs.MeasureError(f"unexpected iperf3 output: {out[-300:]!r}") from exc
    gigabytes = received["bytes"] / 1e9
    if gigabytes <= 0:
        raise procs.MeasureError("iperf3 moved no data")
    values = {f"gbps_p{streams}": received["bits_per_second"] / 1e9}
    if before is not None and after is not None:
        values[f"cpu_s_per_gb_p{streams}"] = (after - before) / gigabytes
    return values


def measure_bulk(s: Settings, target: Running) -> dict[str, float]:
    return _iperf(s, target, 1) | _iperf(s, target, 8)


def measure_bulk8(s: Settings, target: Running) -> dict[str, float]:
    return _iperf(s, target, 8)


# ---------------------------------------------------------------------------------------------
# 2 and 3. HTTP request/response through the proxy (wrk against nginx)


def _wrk(
    s: Settings, target: Running, *, close: bool, connections: int | None = None
) -> dict[str, float]:
    def argv(seconds: int) -> list[str]:
        conns = connections or s.wrk_connections
        args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
        args += ["--timeout", "5s", "-s", str(WRK_SCRIPT)]
        if close:
            args += ["-H", "Connection: close"]
        return [*args, f"http://127.0.0.1:{target.port}/"]

    # Warm-up (not measured): a freshly started proxy gets one second to settle.
    procs.run(argv(1), cpus=s.load_cpus, timeout=30)
    before = target.cpu_seconds()
    out = procs.run(argv(s.duration), cpus=s.load_cpus, timeout=s.duration + 30)
    after = target.cpu_seconds()
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise procs.MeasureError(f"no WRKJSON line in wrk output: {out[-300:]!r}")
    r = json.loads(line.removeprefix("WRKJSON "))
    if r["requests"] == 0:
        raise procs.MeasureError("wrk completed no request")
    if r["status"] > r["requests"] // 2:
        raise procs.MeasureError(f"{r['status']} of {r['requests']} responses not 2xx/3xx")
    errors = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
    values = {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": float(errors),
    }
    if before is not None and after is not None:
        values["cpu_ms_per_1k"] = (after - before) * 1000 / (r["requests"] / 1000)
    return values


def measure_keepalive(s: Settings, target: Running) -> dict[str, float]:
    return _wrk(s, target, close=False)


def measure_connclose(s: Settings, target: Running) -> dict[str, float]:
    return _wrk(s, target, close=True)


CONNCLOSE_MANY = 128
"""wrk -c for `connclose128`: the connection rate under more concurrent clients."""


def measure_connclose128(s: Settings, target: Running) -> dict[str, float]:
    return _wrk(s, target, close=True, connections=CONNCLOSE_MANY)


# ---------------------------------------------------------------------------------------------
# 4. ping-pong latency


def _percentile(sorted_values: list[int], q: float) -> float:
    return float(
        sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]
    )


def measure_pingpong(s: Settings, target: Running) -> dict[str, float]:
    """1-byte round trips over one connection (client in this process, on the load CPU)."""
    samples: list[int] = []
    deadline = time.monotonic() + 120
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clock = time.perf_counter_ns
        for i in range(500 + s.pingpong_n):
            t0 = clock()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise procs.MeasureError("echo connection closed or corrupted")
            if i >= 500:
                samples.append(clock() - t0)
            if i % 1000 == 0 and time.monotonic() > deadline:
                raise procs.MeasureError("ping-pong took longer than 120 s")
    samples.sort()
    return {
        "p50_us": _percentile(samples, 50) / 1000,
        "p99_us": _percentile(samples, 99) / 1000,
    }


# ---------------------------------------------------------------------------------------------
# 5. idle connections


@contextlib.contextmanager
def _connections(port: int, count: int, budget: float) -> Iterator[int]:
    """Open `count` connections to `port`, do one 1-byte round trip on each (so the proxy has
    surely dialled the upstream), yield how many completed it, and close them all."""
    deadline = time.monotonic() + budget
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                continue
        for sock in socks:
            try:
                sock.sendall(b".")
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            except OSError:
                pass
        ok = 0
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                with contextlib.suppress(OSError):
                    ok += ready.recv(1) == b"."
                sel.unregister(ready)
        yield ok
    finally:
        sel.close()
        for sock in socks:
            sock.close()


def _idle(target: Running, count: int, budget: float) -> dict[str, float]:
    pid = target.pid
    if pid is None:
        raise procs.MeasureError("no proxy process")
    with _connections(target.port, 20, 30):  # warm-up: first-connection allocations
        pass
    time.sleep(0.5)
    rss0, pss0, _ = procs.tree_memory_kib(pid)
    with _connections(target.port, count, budget) as ok:
        time.sleep(1.0)
        rss1, pss1, nprocs = procs.tree_memory_kib(pid)
    if ok == 0:
        raise procs.MeasureError("no connection completed a round trip")
    return {
        "established": float(ok),
        "rss_kib_per_conn": (rss1 - rss0) / ok,
        "pss_kib_per_conn": (pss1 - pss0) / ok,
        "processes": float(nprocs),
    }


def measure_idle(s: Settings, target: Running) -> dict[str, float]:
    return _idle(target, s.idle_conns, 180)


PORT_MARGIN = 3000
"""Local ports left free by `idle50k` for everything else on the machine."""


def idle_many_count(s: Settings) -> int:
    """The connections `idle50k` opens: as many as asked, if they fit. Every one has a
    client → proxy leg and a proxy → echo server leg, each from one address to one address
    and port, so at most the ephemeral port range of each fit."""
    fit_ports = procs.ephemeral_ports() - PORT_MARGIN
    # HAProxy's maxconn (the tightest, see proxies.py) within RLIMIT_NOFILE
    fit_fds = int((procs.nofile_limit() - 500) / 2.5)
    return max(1, min(s.idle_many, fit_ports, fit_fds))


def measure_idle_many(s: Settings, target: Running) -> dict[str, float]:
    return _idle(target, idle_many_count(s), 300)


def without_socat(selected: list[Proxy]) -> tuple[list[Proxy], list[str]]:
    chosen = [p for p in selected if p.kind not in ("direct", "socat")]
    notes = []
    if any(p.kind == "socat" for p in selected):
        notes.append("socat skipped: it would fork one process per connection.")
    return chosen, notes


def with_copy_variant(selected: list[Proxy]) -> tuple[list[Proxy], list[str]]:
    """The proxies chosen, and midway with ``--no-splice`` after the default midway:
    bulk that its compiled relay copies, beside bulk that splice moves."""
    chosen: list[Proxy] = []
    for p in selected:
        chosen.append(p)
        if p.kind == "midway" and p.loop is None and not p.pure and not p.args:
            chosen.append(Proxy("midway --no-splice", "midway", args=("--no-splice",)))
    return chosen, []


# ---------------------------------------------------------------------------------------------
# multi-core: midway --workers 2 vs HAProxy nbthread 2


def worker_variants(selected: list[Proxy]) -> tuple[list[Proxy], list[str]]:
    variants: list[Proxy] = []
    notes: list[str] = []
    kinds = {p.kind for p in selected}
    if "midway" in kinds:
        help_text = midway_help()
        if help_text is not None and "--workers" not in help_text:
            notes.append("midway skipped: `python -m midway --help` lists no --workers option.")
        else:  # runnable with --workers, or not runnable at all (then it shows as failed)
            variants.append(Proxy("midway --workers 2", "midway", threads=2))
    if "haproxy" in kinds:
        variants.append(Proxy("haproxy nbthread 2", "haproxy", threads=2))
    if "nginx" in kinds:
        variants.append(Proxy("nginx 2 workers", "nginx", threads=2))
    return variants, notes


# ---------------------------------------------------------------------------------------------
# bulk through a chain element: the cost of inspection and of fault injection

PASSTHROUGH_HOOK = Path(__file__).resolve().parent / "passthrough_hook.py"
CHAIN_VARIANTS = (
    ("midway +hook", ("--hook", f"{PASSTHROUGH_HOOK}:on_data")),
    # iperf3's data flows client → server: the toxic goes on that stream
    ("midway +latency 0", ("--toxic", "latency:latency=0,stream=upstream")),
)


def chain_variants(selected: list[Proxy]) -> tuple[list[Proxy], list[str]]:
    """midway plain and with each chain element (the same options otherwise), and HAProxy
    as the reference.  ``midway-pure`` adds nothing here: a chained connection is relayed
    in Python either way."""
    chosen: list[Proxy] = []
    for p in selected:
        if p.kind == "midway" and p.loop is None and not p.pure:
            chosen.append(p)
            chosen += [Proxy(name, "midway", args=args) for name, args in CHAIN_VARIANTS]
        elif p.kind == "haproxy":
            chosen.append(p)
    return chosen, []


# ---------------------------------------------------------------------------------------------

def _wrk_metrics(unit: str, *, p99: bool = True) -> tuple[Metric, ...]:
    """The figures of a wrk scenario: ``unit`` (requests, connections) per second,
    the proxy's CPU per 1000 of them, latency and errors."""
    return (
        Metric("rps", f"{unit}/s ↑", True),
        Metric("cpu_ms_per_1k", f"proxy CPU (ms per 1000 {unit}) ↓", False),
        Metric("p50_ms", "latency p50 (ms) ↓", False),
        *((Metric("p99_ms", "latency p99 (ms) ↓", False),) if p99 else ()),
        Metric("errors", "wrk errors (count) ↓", False),
    )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="bulk",
        title="1. Bulk transfer (iperf3)",
        about="iperf3 client → proxy → `iperf3 -s`, one stream (`-P 1`) and eight (`-P 8`), "
        "{duration} s each. Proxy CPU is its utime+stime per GB (10^9 bytes) received.",
        metrics=(
            Metric("gbps_p1", "throughput, 1 stream (Gbit/s) ↑", True),
            Metric("cpu_s_per_gb_p1", "proxy CPU, 1 stream (CPU-s per GB) ↓", False),
            Metric("gbps_p8", "throughput, 8 streams (Gbit/s) ↑", True),
            Metric("cpu_s_per_gb_p8", "proxy CPU, 8 streams (CPU-s per GB) ↓", False),
        ),
        backend=backends.reserved_port,
        measure=measure_bulk,
        tools=("iperf3",),
        variants=with_copy_variant,
    ),
    Scenario(
        name="keepalive",
        title="2. Keep-alive request/response (wrk → nginx)",
        about="`wrk -t1 -c{conns} -d{duration}s --latency` through the proxy to an nginx backend "
        "(1 worker) serving a {body}-byte static file over persistent connections, after a "
        "1 s warm-up.",
        metrics=_wrk_metrics("requests"),
        backend=backends.nginx_http,
        measure=measure_keepalive,
        tools=("wrk", "nginx"),
    ),
    Scenario(
        name="connclose",
        title="3. New connection per request (wrk, `Connection: close`)",
        about="As 2, with `-H 'Connection: close'`: every request opens a client connection "
        "and the proxy an upstream one.",
        metrics=_wrk_metrics("connections"),
        backend=backends.nginx_http,
        measure=measure_connclose,
        tools=("wrk", "nginx"),
    ),
    Scenario(
        name="pingpong",
        title="4. Ping-pong latency (1-byte round trips)",
        about="One TCP connection, {pingpong_n:,} sequential 1-byte round trips (after 500 "
        "warm-up ones) to a Python echo server; client and server on the load CPU.",
        metrics=(
            Metric(
                "p50_us",
                "added latency p50 over direct (µs) ↓",
                False,
                minus_direct=True,
            ),
            Metric(
                "p99_us",
                "added latency p99 over direct (µs) ↓",
                False,
                minus_direct=True,
            ),
            Metric("p50_us", "round trip p50 (µs) ↓", False),
            Metric("p99_us", "round trip p99 (µs) ↓", False),
        ),
        backend=backends.echo_server,
        measure=measure_pingpong,
        tools=(),
    ),
    Scenario(
        name="idle",
        title="5. Idle connections (memory)",
        about="{idle_conns:,} connections opened through the proxy to the echo server, one 1-byte "
        "round trip each, then held idle; growth of the proxy's memory (all its processes) "
        "divided by the connections established. Kernel memory (socket buffers, splice pipes) "
        "is not included.",
        metrics=(
            Metric("rss_kib_per_conn", "VmRSS growth per connection (KiB) ↓", False),
            Metric("pss_kib_per_conn", "PSS growth per connection (KiB) ↓", False),
            Metric("established", "connections established ↑", True),
            Metric("processes", "proxy processes while holding them", False),
        ),
        backend=backends.echo_server,
        measure=measure_idle,
        tools=(),
        with_direct=False,
    ),
    Scenario(
        name="workers",
        title="6. Multi-core: 2 workers/threads, bulk (8 streams)",
        about="iperf3 `-P 8`, {duration} s, nothing pinned: midway `--workers 2`, HAProxy "
        "`nbthread 2`, nginx `worker_processes 2`; proxy, client and server share both CPUs.",
        metrics=(
            Metric("gbps_p8", "throughput, 8 streams (Gbit/s) ↑", True),
            Metric("cpu_s_per_gb_p8", "proxy CPU (CPU-s per GB) ↓", False),
        ),
        backend=backends.reserved_port,
        measure=measure_bulk8,
        tools=("iperf3",),
        with_direct=False,
        pinned=False,
        variants=worker_variants,
    ),
    Scenario(
        name="connclose128",
        title=f"7. New connection per request, {CONNCLOSE_MANY} concurrent clients",
        about=f"As 3 with `wrk -c{CONNCLOSE_MANY}`.",
        metrics=_wrk_metrics("connections"),
        backend=backends.nginx_http,
        measure=measure_connclose128,
        tools=("wrk", "nginx"),
    ),
    Scenario(
        name="idle50k",
        title="8. Many idle connections (memory)",
        about="As 5 with {idle_many_count:,} connections ({idle_many:,} asked; what fits: "
        "the ephemeral port range, {ports:,} ports, less {margin:,} left for the machine, on "
        "each leg, and HAProxy's maxconn within RLIMIT_NOFILE {nofile:,}). socat is left out.",
        metrics=(
            Metric("rss_kib_per_conn", "VmRSS growth per connection (KiB) ↓", False),
            Metric("pss_kib_per_conn", "PSS growth per connection (KiB) ↓", False),
            Metric("established", "connections established ↑", True),
        ),
        backend=backends.echo_server,
        measure=measure_idle_many,
        tools=(),
        with_direct=False,
        variants=without_socat,
    ),
    Scenario(
        name="bulkchain",
        title="9. Bulk through a chain element (inspection, fault injection)",
        about="As 1, with midway plain, with a hook that passes every chunk on unchanged "
        "(`--hook bench/passthrough_hook.py:on_data`: both directions leave the zero-copy path "
        "and every chunk is a Python call), and with a 0 ms latency toxic on the client → "
        "server stream (`--toxic latency:latency=0,stream=upstream`); HAProxy for reference.",
        metrics=(
            Metric("gbps_p1", "throughput, 1 stream (Gbit/s) ↑", True),
            Metric("cpu_s_per_gb_p1", "proxy CPU, 1 stream (CPU-s per GB) ↓", False),
            Metric("gbps_p8", "throughput, 8 streams (Gbit/s) ↑", True),
            Metric("cpu_s_per_gb_p8", "proxy CPU, 8 streams (CPU-s per GB) ↓", False),
        ),
        backend=backends.reserved_port,
        measure=measure_bulk,
        tools=("iperf3",),
        with_direct=False,
        variants=chain_variants,
    ),
    Scenario(
        name="workers-conn",
        title="10. Multi-core: 2 workers/threads, new connection per request",
        about="As 3 (`wrk -c{conns}`, `Connection: close`), nothing pinned: midway "
        "`--workers 2`, HAProxy `nbthread 2`, nginx `worker_processes 2`; proxy, wrk and the "
        "nginx backend share both CPUs.",
        metrics=_wrk_metrics("connections", p99=False),
        backend=backends.nginx_http,
        measure=measure_connclose,
        tools=("wrk", "nginx"),
        with_direct=False,
        pinned=False,
        variants=worker_variants,
    ),
)

# TLS termination (bench/tls.py), registered last.
from bench.tls import SCENARIO as _TLS  # noqa: E402

SCENARIOS += (_TLS,)

BY_NAME = {s.name: s for s in SCENARIOS}


def describe(scenario: Scenario, settings: Settings) -> str:
    return scenario.about.format(
        duration=settings.duration,
        conns=settings.wrk_connections,
        pingpong_n=settings.pingpong_n,
        idle_conns=settings.idle_conns,
        idle_many=settings.idle_many,
        idle_many_count=idle_many_count(settings),
        ports=procs.ephemeral_ports(),
        margin=PORT_MARGIN,
        nofile=procs.nofile_limit(),
        body=len(backends.HTTP_BODY),
    )
