"""What one connection costs the proxy, in figures that machine load does not distort.

`python bench/conncost.py [--proxy midway|haproxy|floor] [--loop asyncio|uvloop] WHAT`, WHAT one of:

* ``syscalls``: ``strace -c -f -p PID`` on the proxy over N connect/send/recv/close loops
  (system calls per connection, by name);
* ``calls``: a cProfile of the proxy process over the same loop (Python function calls
  per connection, and the functions that make them); midway only;
* ``cpu``: utime+stime of the proxy (from /proc/PID/stat) per 1000 connections, the
  median of several runs;
* ``idle``: the proxy's VmRSS growth per connection with N connections held idle (one
  1-byte round trip each), for each N given.

The client runs C connections at once (``--concurrency``, default 8), each in a loop:
connect, send 16 bytes, read the 16 bytes echoed back, close.  The backend is
bench/echo_server.py (two of them for ``idle``, so that more connections than the
ephemeral port range holds can be opened to the upstreams; the clients spread over
several 127.0.0.x source addresses for the same reason).  Everything is bounded in count
and time, and every child is stopped at the end.  Unlike bench/run.py this measures one
proxy at a time, with nothing pinned: it is meant for before/after comparisons of a
change on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD = b"0123456789abcdef"
NOFILE = 250_000
"""Descriptors asked for every process here: 50 000 idle connections are 100 000 in the
proxy.  Without CAP_SYS_RESOURCE the hard limit stays where it is (20 000 in the
container this was written in): then at most about half of it can be held idle."""
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
"""Client source addresses: each has its own ~28 000 ephemeral ports towards the proxy."""


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def _child(argv: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def _setup(args: argparse.Namespace, backends: int = 1) -> Iterator[tuple[int, int]]:
    """(proxy port, proxy pid) with ``backends`` echo servers behind it."""
    with contextlib.ExitStack() as stack:
        ports = [_free_port() for _ in range(backends)]
        for port in ports:
            stack.enter_context(_child([sys.executable, str(HERE / "echo_server.py"), str(port),
                                        "--lifetime", "900"]))
        for port in ports:
            _wait_port(port)
        listen = _free_port()
        if args.proxy == "haproxy":
            cfg = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".cfg"))
            servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(ports))
            cfg.write(f"""global
    maxconn {(resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) * 2 // 5}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    option splice-auto
frontend f
    bind 127.0.0.1:{listen}
    default_backend b
backend b
    balance roundrobin
{servers}
""")
            cfg.flush()
            argv = ["haproxy", "-db", "-f", cfg.name]
        elif args.proxy == "floor":
            argv = [sys.executable, str(HERE / "floor.py"), str(listen), str(ports[0])]
        else:
            runner = [sys.executable, str(Path(__file__).resolve()), "--serve-midway"]
            argv = [*runner, f"127.0.0.1:{listen}", *(f"127.0.0.1:{p}" for p in ports),
                    "--loop", args.loop, "--log-level", "warning"]
        proc = stack.enter_context(_child(argv))
        _wait_port(listen)
        yield listen, proc.pid


# -- the load ------------------------------------------------------------------------


def connection_loop(port: int, count: int, concurrency: int, budget_s: float = 120.0) -> int:
    """``count`` connect/send/recv/close cycles, ``concurrency`` at a time; returns how
    many completed."""
    sel = selectors.DefaultSelector()
    started = done = 0
    deadline = time.monotonic() + budget_s

    def begin() -> None:
        nonlocal started
        started += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sel.register(sock, selectors.EVENT_WRITE, [b""])

    for _ in range(min(concurrency, count)):
        begin()
    while sel.get_map() and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(PAYLOAD)
                except OSError:
                    sel.unregister(sock)
                    sock.close()
                    if started < count:
                        begin()
                    continue
                sel.modify(sock, selectors.EVENT_READ, key.data)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            key.data[0] += data
            if data and len(key.data[0]) < len(PAYLOAD):
                continue
            done += key.data[0] == PAYLOAD
            sel.unregister(sock)
            sock.close()
            if started < count:
                begin()
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return done


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- the measurements ----------------------------------------------------------------------


def measure_cpu(args: argparse.Namespace) -> None:
    with _setup(args) as (port, pid):
        connection_loop(port, 500, args.concurrency)  # warm-up
        per_1000, user, system = [], [], []
        for _ in range(args.runs):
            u0, s0 = _cpu_ticks(pid)
            ok = connection_loop(port, args.count, args.concurrency)
            u1, s1 = _cpu_ticks(pid)
            scale = 1000 / CLK_TCK * 1000 / ok
            user.append((u1 - u0) * scale)
            system.append((s1 - s0) * scale)
            per_1000.append(user[-1] + system[-1])
        print(f"cpu {args.proxy}/{args.loop}: CPU-ms per 1000 connections, median "
              f"{statistics.median(per_1000):.1f} (user {statistics.median(user):.1f}, system "
              f"{statistics.median(system):.1f}) of {', '.join(f'{v:.0f}' for v in per_1000)}")


def measure_syscalls(args: argparse.Namespace) -> None:
    with _setup(args) as (port, pid):
        connection_loop(port, 500, args.concurrency)
        out = tempfile.NamedTemporaryFile(suffix=".strace", delete=False)
        out.close()
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out.name, "-p", str(pid)],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # strace attaches
        ok = connection_loop(port, args.count, args.concurrency)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        text = Path(out.name).read_text()
        os.unlink(out.name)
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls = int(parts[3])
            rows.append((calls, parts[-1]))
    rows.sort(reverse=True)
    total = sum(c for c, _ in rows)
    print(f"syscalls {args.proxy}/{args.loop}: {total / ok:.1f} per connection ({ok} connections)")
    for calls, name in rows:
        if calls / ok >= 0.05:
            print(f"  {name:<16} {calls / ok:6.2f}")


def measure_calls(args: argparse.Namespace) -> None:
    if args.proxy != "midway":
        raise SystemExit("calls: midway only")
    with _setup(args) as (port, pid):
        connection_loop(port, 500, args.concurrency)
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)
        ok = connection_loop(port, args.count, args.concurrency)
        stats = Path(tempfile.gettempdir()) / f"conncost-{pid}.prof"
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not stats.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    import pstats
    st = pstats.Stats(str(stats))
    os.unlink(stats)
    total = sum(v[1] for v in st.stats.values())  # type: ignore[attr-defined]
    python = sum(v[1] for k, v in st.stats.items() if k[1])  # type: ignore[attr-defined]
    print(f"calls midway/{args.loop}: {total / ok:.1f} Python-visible calls per connection, "
          f"{python / ok:.1f} of them to Python functions ({ok} connections)")
    key = 2 if args.by_time else 1
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][key])  # type: ignore[attr-defined]
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in rows[:args.top]:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"  {nc / ok:5.2f}  {tt / ok * 1e6:6.1f} µs  {name} ({where})")
    if args.callers:
        st.print_callers(args.callers)


def _hold(port: int, count: int, budget_s: float) -> list[socket.socket]:
    """Open ``count`` connections through the proxy, one round trip each."""
    deadline = time.monotonic() + budget_s
    socks: list[socket.socket] = []
    no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
    for i in range(count):
        if time.monotonic() > deadline:
            break
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_IP, no_port, 1)
        sock.bind((SOURCES[i % len(SOURCES)], 0))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b".")
        except OSError:
            sock.close()
            continue
        socks.append(sock)
        if len(socks) % 500 == 0:  # collect the echoes as we go: bounded queues
            _collect(socks[-500:])
    _collect(socks[len(socks) - len(socks) % 500:])
    return socks


def _collect(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.recv(1)
        except OSError:
            pass


def measure_idle(args: argparse.Namespace) -> None:
    """Connections are added up to each count in turn (held all along), so each figure
    is the growth over the same baseline, and the last step's is the marginal cost."""
    with _setup(args, backends=2) as (port, pid):
        for sock in _hold(port, 50, 30):  # warm-up: first-connection allocations
            sock.close()
        time.sleep(1.0)
        base = _rss_kib(pid)
        held: list[socket.socket] = []
        last = (0, base)
        try:
            for n in sorted(args.idle):
                held += _hold(port, n - len(held), 300)
                time.sleep(1.0)
                rss = _rss_kib(pid)
                step = (rss - last[1]) / max(1, len(held) - last[0])
                print(f"idle {args.proxy}/{args.loop}: {len(held)} connections, VmRSS "
                      f"+{rss - base} KiB, {(rss - base) / len(held):.2f} KiB per connection "
                      f"({step:.2f} KiB each for the last {len(held) - last[0]})", flush=True)
                last = (len(held), rss)
        finally:
            for sock in held:
                sock.close()


# -- the profiled midway (calls) ----------------------------------------------------------


def serve_midway(argv: list[str]) -> int:
    """midway's CLI, with SIGUSR1 starting a cProfile and SIGUSR2 writing it out."""
    import cProfile

    from midway.cli import main

    profile = cProfile.Profile()

    def start(*_: object) -> None:
        profile.enable()

    def stop(*_: object) -> None:
        profile.disable()
        profile.dump_stats(str(Path(tempfile.gettempdir()) / f"conncost-{os.getpid()}.prof"))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(argv)


def main() -> None:
    if sys.argv[1:2] == ["--serve-midway"]:
        sys.exit(serve_midway(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["syscalls", "calls", "cpu", "idle"])
    parser.add_argument("--proxy", choices=["midway", "haproxy", "floor"], default="midway")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--count", type=int, default=2000, help="connections per run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5, help="runs of cpu (the median is shown)")
    parser.add_argument("--idle", type=int, nargs="*", default=[5000, 7500],
                        help="idle connections held (50000 needs RLIMIT_NOFILE > 100000)")
    parser.add_argument("--top", type=int, default=25, help="functions shown by calls")
    parser.add_argument("--by-time", action="store_true",
                        help="calls: order functions by their own time, not their count")
    parser.add_argument("--callers", default="", help="calls: show who calls functions "
                        "matching this regular expression")
    args = parser.parse_args()
    _raise_nofile()
    {"syscalls": measure_syscalls, "calls": measure_calls, "cpu": measure_cpu,
     "idle": measure_idle}[args.what](args)


if __name__ == "__main__":
    main()
