"""Scenario `tls`: TLS termination, bulk download, midway against HAProxy with the same certificate.

A TLS client (Python's `ssl`, on the load CPU) connects through the proxy, which terminates TLS
(midway `--tls-cert`, HAProxy `bind ... ssl crt`) and forwards plain TCP to a source server that
sends as fast as it can; the client reads for the run's duration. Throughput is what the client
decrypted; proxy CPU is per GB (10^9 bytes) moved. TLS 1.3, the client's default suite
(AES-256-GCM), an EC P-256 certificate made per run with `openssl req`.

Also runnable as the two helpers it starts: `python bench/tls.py source PORT` and
`python bench/tls.py client PORT SECONDS`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if __name__ != "__main__":
    from bench import procs
    from bench.proxies import Proxy, Running
    from bench.scenarios import Metric, Scenario, Settings

CHUNK = 1 << 20  # bytes per send by the source and per read by the client


def certificate(workdir: Path) -> Path:
    """One PEM file with a self-signed certificate for 127.0.0.1 and its key (made once)."""
    pem = workdir / "tls-bench.pem"
    if not pem.exists():
        key, cert = workdir / "tls-bench.key", workdir / "tls-bench.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=30)
        pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return pem


if __name__ != "__main__":

    @dataclass(frozen=True)
    class TlsProxy(Proxy):
        """A proxy of the comparison, terminating TLS with the run's certificate."""

        def argv(self, listen: int, upstream: int, workdir: Path) -> list[str]:
            pem = certificate(workdir)
            if self.kind == "midway":
                return [*Proxy.argv(self, listen, upstream, workdir), "--tls-cert", str(pem)]
            cfg = workdir / f"haproxy-tls-{listen}.cfg"
            cfg.write_text(f"""\
global
    nbthread {self.threads}
    maxconn 1000

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend fe
    bind 127.0.0.1:{listen} ssl crt {pem}
    default_backend be

backend be
    server upstream 127.0.0.1:{upstream}
""")
            return ["haproxy", "-db", "-f", str(cfg)]

    def variants(selected: list[Proxy]) -> tuple[list[Proxy], list[str]]:
        chosen: list[Proxy] = [TlsProxy(p.name, p.kind, p.threads, p.loop)
                               for p in selected if p.kind in ("midway", "haproxy")]
        skipped = [p.name for p in selected if p.kind not in ("midway", "haproxy")]
        notes = [f"Not in this scenario: {', '.join(skipped)} (no TLS termination configured)."
                 ] if skipped else []
        return chosen, notes

    @contextlib.contextmanager
    def source_server(*, cpus: str, workdir: Path) -> Iterator[int]:
        port = procs.free_port()
        argv = [sys.executable, str(BENCH / "tls.py"), "source", str(port)]
        with procs.serving("tls-source", argv, port, cpus=cpus, logdir=workdir):
            yield port

    def measure(s: Settings, target: Running) -> dict[str, float]:
        before = target.cpu_seconds()
        out = procs.run([sys.executable, str(BENCH / "tls.py"), "client", str(target.port),
                         str(s.duration)], cpus=s.load_cpus, timeout=s.duration + 30)
        after = target.cpu_seconds()
        try:
            got = json.loads(out)
        except ValueError as exc:
            raise procs.MeasureError(f"unexpected client output: {out[-300:]!r}") from exc
        gigabytes = got["bytes"] / 1e9
        if gigabytes <= 0:
            raise procs.MeasureError("the TLS client received nothing")
        values = {"gbps": got["bytes"] * 8 / got["seconds"] / 1e9}
        if before is not None and after is not None:
            values["cpu_s_per_gb"] = (after - before) / gigabytes
        return values

    SCENARIO = Scenario(
        name="tls",
        title="11. TLS termination, bulk download (midway vs HAProxy, same certificate)",
        about="A Python `ssl` client reads for {duration} s through the proxy terminating TLS 1.3 "
        "(EC P-256 certificate, AES-256-GCM) from a plain TCP source sending 1 MiB writes. "
        "Proxy CPU is its utime+stime per GB (10^9 bytes) received by the client.",
        metrics=(
            Metric("gbps", "throughput (Gbit/s) ↑", True),
            Metric("cpu_s_per_gb", "proxy CPU (CPU-s per GB) ↓", False),
        ),
        backend=source_server,
        measure=measure,
        tools=("openssl",),
        with_direct=False,
        variants=variants,
    )


# -- the helpers, as processes ----------------------------------------------------------------


def serve_source(port: int) -> None:
    """Send 1 MiB writes to every connection until it goes away (thread per connection)."""
    blob = bytes(CHUNK)
    listener = socket.create_server(("127.0.0.1", port), backlog=64)

    def pour(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                conn.sendall(blob)

    deadline = time.monotonic() + 1800  # gone by itself if nobody stops it
    listener.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=pour, args=(conn,), daemon=True).start()


def run_client(port: int, seconds: float) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the run's own throwaway certificate
    buffer = bytearray(CHUNK)
    total = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            n = tls.recv_into(buffer)
            if n == 0:
                break
            total += n
        elapsed = time.perf_counter() - start
    print(json.dumps({"bytes": total, "seconds": elapsed}))


if __name__ == "__main__":
    if sys.argv[1] == "source":
        serve_source(int(sys.argv[2]))
    else:
        run_client(int(sys.argv[2]), float(sys.argv[3]))
