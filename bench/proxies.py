"""The proxies under comparison: how each one is configured, started and stopped.

Each is started per measurement on a fresh loopback port, pinned with taskset, waited for until
its listening socket exists (bounded), and stopped with its whole process group afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bench import procs

REPO = Path(__file__).resolve().parent.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
KINDS = ("direct", "midway", "haproxy", "nginx", "socat")
START_TIMEOUT = 15.0
MAX_CONNECTIONS = 60000
"""HAProxy's maxconn and half nginx's worker_connections (which counts both sockets of a
proxied connection), when RLIMIT_NOFILE allows: room for the `idle50k` scenario."""


@dataclass(frozen=True)
class Proxy:
    """One proxy configuration. `threads` is midway's --workers, HAProxy's nbthread and nginx's
    worker_processes; `loop` is midway's --loop; `args` are more midway options."""

    name: str
    kind: str
    threads: int = 1
    loop: str | None = None
    args: tuple[str, ...] = ()
    pure: bool = False
    """midway without its compiled relay (MIDWAY_PURE_PYTHON=1)."""

    def argv(self, listen: int, upstream: int, workdir: Path) -> list[str]:
        builder = {
            "midway": self._midway,
            "haproxy": self._haproxy,
            "nginx": self._nginx,
            "socat": self._socat,
        }[self.kind]
        return builder(listen, upstream, workdir)

    def _midway(self, listen: int, upstream: int, workdir: Path) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "midway",
            f"127.0.0.1:{listen}",
            f"127.0.0.1:{upstream}",
        ]
        if self.threads > 1:
            argv += ["--workers", str(self.threads)]
        if self.loop:
            argv += ["--loop", self.loop]
        return argv + list(self.args)

    def _haproxy(self, listen: int, upstream: int, workdir: Path) -> list[str]:
        cfg = workdir / f"haproxy-{listen}.cfg"
        # HAProxy refuses to start if maxconn does not fit in the descriptors it can get: it
        # reserves two per connection plus two per splice pipe (maxpipes = maxconn / 4).
        maxconn = min(MAX_CONNECTIONS, int((procs.nofile_limit() - 500) / 2.5))
        cfg.write_text(
            f"""\
global
    nbthread {self.threads}
    maxconn {maxconn}

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend fe
    bind 127.0.0.1:{listen}
    default_backend be

backend be
    server upstream 127.0.0.1:{upstream}
"""
        )
        return ["haproxy", "-db", "-f", str(cfg)]

    def _nginx(self, listen: int, upstream: int, workdir: Path) -> list[str]:
        if not NGINX_STREAM_MODULE.exists():
            raise procs.StartError(f"{NGINX_STREAM_MODULE} missing (libnginx-mod-stream)")
        nofile = procs.nofile_limit()
        prefix = workdir / f"nginx-stream-{listen}"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(
            f"""\
load_module {NGINX_STREAM_MODULE};
worker_processes {self.threads};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile {nofile};

events {{
    worker_connections {min(2 * MAX_CONNECTIONS, nofile - 100)};
}}

stream {{
    server {{
        listen 127.0.0.1:{listen} backlog=4096;
        proxy_pass 127.0.0.1:{upstream};
        proxy_connect_timeout 5s;
        proxy_timeout 10m;
    }}
}}
"""
        )
        return [
            "nginx",
            "-p",
            f"{prefix}/",
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            "stderr",
        ]

    def _socat(self, listen: int, upstream: int, workdir: Path) -> list[str]:
        # bind= keeps it on loopback; backlog= because socat's default of 5 drops SYNs under
        # 50 concurrent connects (the other proxies all have backlogs in the hundreds or more).
        return [
            "socat",
            f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
            f"TCP:127.0.0.1:{upstream}",
        ]


def describe(proxy: Proxy) -> str:
    """How `proxy` is configured, for the report."""
    n = proxy.threads
    return {
        "direct": "no proxy: clients connect straight to the backend",
        "midway": "`python -m midway 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM`"
        + (f" `--workers {n}`" if n > 1 else "")
        + (f" `--loop {proxy.loop}`" if proxy.loop else "")
        + "".join(f" `{a}`" for a in proxy.args)
        + ", defaults otherwise"
        + ("" if proxy.loop else " (the event loop is midway's default choice)")
        + (", pure Python (`MIDWAY_PURE_PYTHON=1`: no compiled relay)" if proxy.pure
           else _compiled_note()),
        "haproxy": f"`haproxy -db`, mode tcp, `option splice-auto`, `nbthread {n}`, "
        "maxconn sized to RLIMIT_NOFILE, no logging",
        "nginx": f"nginx stream module, `worker_processes {n}`, `proxy_pass`, default "
        "buffers, no access log",
        "socat": "`socat TCP-LISTEN:LISTEN,bind=127.0.0.1,fork,reuseaddr,backlog=4096 "
        "TCP:127.0.0.1:UPSTREAM` (one process per connection)",
    }[proxy.kind]


@dataclass
class Running:
    """A started proxy: clients connect to `port`; `child` is None for `direct`."""

    proxy: Proxy
    port: int
    upstream_port: int
    child: procs.Child | None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def cpu_seconds(self) -> float | None:
        return procs.tree_cpu_seconds(self.child.pid) if self.child else None

    def exited(self) -> int | None:
        """The exit status if the proxy died (e.g. during a measurement), else None."""
        return self.child.proc.poll() if self.child else None


@contextlib.contextmanager
def started(
    proxy: Proxy, upstream_port: int, *, cpus: str | None, workdir: Path
) -> Iterator[Running]:
    """Start `proxy` in front of `upstream_port`; yield once it listens; always stop it."""
    if proxy.kind == "direct":
        yield Running(proxy, upstream_port, upstream_port, None)
        return
    port = procs.free_port()
    argv = proxy.argv(port, upstream_port, workdir)
    env = None
    if proxy.kind == "midway":
        # do not leave __pycache__ directories in the midway checkout
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("MIDWAY_PURE_PYTHON", None)
        if proxy.pure:
            env["MIDWAY_PURE_PYTHON"] = "1"
    with procs.serving(proxy.name, argv, port, cpus=cpus, logdir=workdir,
                       timeout=START_TIMEOUT, cwd=REPO, env=env) as child:
        if proxy.threads > 1:
            time.sleep(0.5)  # let every worker/thread reach its accept loop
        yield Running(proxy, port, upstream_port, child)


@cache
def midway_help() -> str | None:
    """`python -m midway --help` output, or None if midway cannot even print its help."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "midway", "--help"],
            capture_output=True,
            cwd=REPO,
            timeout=15,
            check=False,
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return (done.stdout + done.stderr).decode(errors="replace")


def _compiled_note() -> str:
    """How the default midway runs its relay: with the compiled part if it was built."""
    found = list((REPO / "midway" / "core").glob("_accel*.so"))
    return ", with its compiled relay" if found else \
        ", pure Python (the compiled relay is not built: `pip install -e .` builds it)"


def parse(name: str) -> Proxy:
    """A proxy from its command-line name: direct, midway, midway-pure, midway-uvloop,
    midway-asyncio, haproxy, nginx, socat."""
    if name == "midway-pure":
        return Proxy(name, "midway", pure=True)
    if name == "midway-uvloop":
        return Proxy(name, "midway", loop="uvloop")
    if name == "midway-asyncio":
        return Proxy(name, "midway", loop="asyncio")
    if name in KINDS:
        return Proxy(name, name)
    raise ValueError(
        f"unknown proxy {name!r} (choose from {', '.join(KINDS)}, midway-pure, midway-uvloop, "
        "midway-asyncio)"
    )
