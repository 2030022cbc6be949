"""Turning the admin API on: loopback unless told otherwise, one worker, next to
proxies from the command line or a file, and a clean failure when it cannot bind."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import ROOT, ProxyProcess
from .conftest import Admin, EchoServer, port_of, round_trip

pytestmark = pytest.mark.timeout(60)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midway", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("address", ["0.0.0.0:8474", ":8474", "[::]:8474",
                                     # A name, which --check resolves: this host's own.
                                     f"{socket.gethostname()}:8474"])
def test_non_loopback_admin_needs_explicit_consent(address: str) -> None:
    result = run("--admin", address, "--check")
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr
    assert "--admin-allow-remote" in result.stderr
    assert run("--admin", address, "--admin-allow-remote", "--check").returncode == 0


@pytest.mark.parametrize("address", ["127.0.0.1:8474", "localhost:8474", "[::1]:8474",
                                     "127.0.0.2:8474", "[::ffff:127.0.0.1]:8474"])
def test_loopback_admin_is_accepted(address: str) -> None:
    result = run("--admin", address, "--check")
    assert result.returncode == 0, result.stderr


def test_admin_refusals() -> None:
    for args, words in [
        (["--admin", "127.0.0.1:8474", "--admin-token-file", "/nonexistent/token"],
         "--admin-token-file: cannot read /nonexistent/token"),
        (["--workers", "2", "unix:/tmp/midway-test.sock", "127.0.0.1:1"], "workers = 1"),
        (["--admin", "127.0.0.1:8474", "--toxic", "latency"], "needs LISTEN UPSTREAM"),
        (["--admin", "unix:/tmp/x"], "TCP"),
        (["--admin", "nope"], "host:port"),
        ([], "LISTEN"),
    ]:
        result = run(*args, "--check")
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_admin_port_in_use_exits_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("--admin", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "admin API" in result.stderr and "address already in use" in result.stderr


def test_admin_port_in_use_with_workers_exits_1_before_any_worker_starts() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("127.0.0.1:0", "127.0.0.1:1", "--workers", "2", "--admin",
                     f"127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} for the admin API: address already in use" \
        in result.stderr
    assert "listening on" not in result.stderr and "[worker" not in result.stderr, \
        result.stderr  # no worker started (nor had to be stopped)
    assert "Traceback" not in result.stderr


def test_config_proxies_and_their_toxics_show_in_the_api(tmp_path: Path,
                                                         echo: EchoServer) -> None:
    config = tmp_path / "midway.toml"
    config.write_text(f"""
[server]
admin = "127.0.0.1:0"

[proxy.web]
listen = "127.0.0.1:0"
upstreams = "{echo.address}"

[[proxy.web.toxics]]
type = "latency"
attributes = {{ latency = 1 }}
""")
    process = ProxyProcess("--config", str(config))
    try:
        admin_port = int(next(line for line in process.stderr_lines if "admin API" in line)
                         .rsplit(":", 1)[1])
        admin = Admin(process)
        admin.port = admin_port
        web = admin.get("/proxies/web").json
        assert web["upstream"] == echo.address and web["enabled"] is True
        assert [t["name"] for t in web["toxics"]] == ["latency_downstream"]
        assert round_trip(port_of(web["listen"])) == b"ping"
        assert admin.delete("/proxies/web/toxics/latency_downstream").status == 204
        assert admin.get("/proxies/web").json["toxics"] == []
    finally:
        process.stop()
