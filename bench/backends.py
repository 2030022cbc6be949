"""Backends the proxies forward to: an nginx HTTP server (for wrk), a Python echo server (for
ping-pong and idle connections) and one-off iperf3 servers (for bulk transfer). Each runs on the
load CPU and is stopped with its process group when its context exits.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from bench import procs

BENCH = Path(__file__).resolve().parent
HTTP_BODY = b"midway bench: a small static body for keep-alive and new-connection tests.\n"


@contextlib.contextmanager
def nginx_http(*, cpus: str, workdir: Path) -> Iterator[int]:
    """A separate nginx instance (own prefix, config and temp dirs, 1 worker) serving a small
    static file; yields its port."""
    port = procs.free_port()
    nofile = procs.nofile_limit()
    prefix = workdir / f"nginx-http-{port}"
    (prefix / "www").mkdir(parents=True)
    (prefix / "www" / "index.html").write_bytes(HTTP_BODY)
    temp = {name: prefix / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir()
    (prefix / "nginx.conf").write_text(
        f"""\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile {nofile};

events {{
    worker_connections {min(20000, nofile - 100)};
}}

http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
        index index.html;
    }}
}}
"""
    )
    argv = [
        "nginx",
        "-p",
        f"{prefix}/",
        "-c",
        str(prefix / "nginx.conf"),
        "-e",
        "stderr",
    ]
    with procs.serving("nginx-http", argv, port, cpus=cpus, logdir=workdir):
        yield port


@contextlib.contextmanager
def echo_server(*, cpus: str, workdir: Path) -> Iterator[int]:
    """The Python echo server (bench/echo_server.py); yields its port."""
    port = procs.free_port()
    argv = [
        sys.executable,
        str(BENCH / "echo_server.py"),
        str(port),
        "--lifetime",
        "1800",
    ]
    with procs.serving("echo-server", argv, port, cpus=cpus, logdir=workdir):
        yield port


@contextlib.contextmanager
def reserved_port(*, cpus: str, workdir: Path) -> Iterator[int]:
    """Only a port: the scenario starts its own server on it per test (iperf3 -s -1)."""
    yield procs.free_port()


@contextlib.contextmanager
def iperf3_server(port: int, *, cpus: str, workdir: Path) -> Iterator[procs.Child]:
    """A one-off iperf3 server (serves one test, then exits) on `port`."""
    argv = ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)]
    with procs.serving("iperf3-server", argv, port, cpus=cpus, logdir=workdir) as child:
        yield child
