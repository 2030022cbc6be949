"""Process plumbing for the benchmark: spawning pinned children, waiting for listeners,
reading CPU time and memory from /proc, and reliable teardown.

Every child is started in its own session (process group) so that it and everything it forks
(nginx workers, socat's per-connection children, midway workers) can be stopped together, and is
registered so that an exception or Ctrl-C anywhere still stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
WANTED_NOFILE = 262144


class StartError(RuntimeError):
    """A proxy or backend did not start (missing binary, bad config, never listened)."""


class MeasureError(RuntimeError):
    """A measurement could not be completed (load generator failed, timeout, bad output)."""


# ---------------------------------------------------------------------------------------------
# limits, affinity, ports


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE of this process (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(hard, WANTED_NOFILE) if os.geteuid() == 0 else hard
    for new_hard in (target, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_hard, new_hard))
            return new_hard
        except (ValueError, OSError):
            continue
    return soft


def ephemeral_ports() -> int:
    """How many local ports connect() may pick (net.ipv4.ip_local_port_range): the most
    connections from one address to one listening address and port."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 28232  # Linux's default range, 32768-60999
    return high - low + 1


def nofile_limit() -> int:
    """The (hard) RLIMIT_NOFILE children get: proxies size their connection limits by it."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def cpu_list(cpus: set[int] | list[int]) -> str:
    """A taskset-style CPU list, e.g. "0" or "0,1"."""
    return ",".join(str(c) for c in sorted(cpus))


_used_ports: set[int] = set()


def free_port() -> int:
    """A loopback TCP port that is free now and was not handed out before in this run."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("could not find a free loopback port")


def listening_ports() -> set[int]:
    """Local ports of all TCP sockets in LISTEN state (IPv4 and IPv6), read from /proc/net.

    Looking here rather than connecting has no side effects on the backend (a probe connection
    through a proxy would, for instance, be taken by a one-off iperf3 server as its test).
    """
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(port: int, child: Child | None, timeout: float) -> None:
    """Wait (bounded) until something listens on `port`; fail early if `child` exits."""
    deadline = time.monotonic() + timeout
    while port not in listening_ports():
        if child is not None and child.proc.poll() is not None:
            raise StartError(
                f"{child.name} exited with status {child.proc.returncode} before listening "
                f"on port {port}{child.log_excerpt()}"
            )
        if time.monotonic() > deadline:
            name = child.name if child else "backend"
            excerpt = child.log_excerpt() if child else ""
            raise StartError(f"{name} not listening on port {port} after {timeout:g} s{excerpt}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# children


@dataclass
class Child:
    """A process we started (in its own process group), with its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_excerpt(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n    " + "\n    ".join(text)) if text else ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the child (it stops its own workers), wait `grace` seconds, then SIGKILL
        whatever is left of its process group."""
        _live.pop(self.pid, None)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while children it forked (socat, nginx workers) linger.
        _signal_group(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_live: dict[int, Child] = {}


def stop_all() -> None:
    """Stop every child still running (called on exit, exceptions and Ctrl-C)."""
    for child in list(_live.values()):
        child.stop(grace=2.0)


atexit.register(stop_all)


def _wrap(argv: list[str], cpus: str | None) -> list[str]:
    if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
        raise StartError(f"{argv[0]} not found (not installed?)")
    prefix: list[str] = []
    if shutil.which("prlimit"):
        nofile = nofile_limit()
        prefix += ["prlimit", f"--nofile={nofile}:{nofile}"]
    if cpus is not None and shutil.which("taskset"):
        prefix += ["taskset", "-c", cpus]
    return prefix + argv


def spawn(
    name: str,
    argv: list[str],
    *,
    cpus: str | None,
    logdir: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    """Start a long-running child pinned to `cpus` (prlimit and taskset exec, so the pid we get
    is the program's own), with stdout and stderr going to a log file in `logdir`."""
    full = _wrap(argv, cpus)
    log = logdir / f"{name.replace(' ', '_')}-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    child = Child(name, proc, log)
    _live[proc.pid] = child
    return child


@contextlib.contextmanager
def serving(
    name: str,
    argv: list[str],
    port: int,
    *,
    cpus: str | None,
    logdir: Path,
    timeout: float = 10.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Child]:
    """`spawn` a server, wait (up to `timeout` s) until it listens on `port`, yield it; always
    stop it."""
    child = spawn(name, argv, cpus=cpus, logdir=logdir, cwd=cwd, env=env)
    try:
        wait_listening(port, child, timeout)
        yield child
    finally:
        child.stop()


def run(argv: list[str], *, cpus: str | None, timeout: float) -> str:
    """Run a load generator to completion (bounded); return its stdout."""
    full = _wrap(argv, cpus)
    try:
        done = subprocess.run(
            full,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"{argv[0]} did not finish within {timeout:g} s") from exc
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        err = (done.stderr.decode(errors="replace") or out).strip().splitlines()[-3:]
        raise MeasureError(f"{argv[0]} exited with status {done.returncode}: {' | '.join(err)}")
    return out


def tool_output(argv: list[str], timeout: float = 10.0) -> str:
    """stdout+stderr of a short informational command ("" if it is missing or fails)."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# /proc accounting over a process tree


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; the command name may hold spaces."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (threads are not separate entries: /proc/PID/stat of a
    process already sums all of its threads)."""
    children: dict[int, list[int]] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], deque([root])
    while queue:
        pid = queue.popleft()
        tree.append(pid)
        queue.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of `root` and its live descendants, plus the cutime+cstime they collected
    from children that already exited (socat's per-connection forks end up there)."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # fields[11..14] are stat fields 14..17: utime, stime, cutime, cstime
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / CLK_TCK


def tree_memory_kib(root: int) -> tuple[int, int, int]:
    """(sum of VmRSS, sum of Pss, number of processes) over `root`'s process tree, in KiB."""
    rss = pss = count = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        count += 1
        rss += _kib_field(status, "VmRSS:")
        try:
            pss += _kib_field(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss:")
        except OSError:
            pass
    return rss, pss, count


def _kib_field(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0
