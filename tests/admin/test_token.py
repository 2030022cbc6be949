"""The admin token: with ``admin_token`` or ``admin_token_file`` set, every request
needs ``Authorization: Bearer TOKEN`` (else 401, as JSON, and nothing changes);
without one, nothing is needed (Toxiproxy's clients, on loopback).  A reload
takes a new token from the file.  Also ``GET /metrics`` and ``POST /reload`` on
a single process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ..helpers import ROOT, ProxyProcess, proxy_process, wait_until
from .conftest import Admin, EchoServer, port_of, round_trip

TOKEN = "s3cret-token"


def admin_of(process: ProxyProcess) -> Admin:
    api = Admin(process)
    line = next(line for line in process.stderr_lines if "admin API" in line)
    api.port = int(line.rsplit(":", 1)[1])
    return api


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_with_a_token_every_request_needs_it(tmp_path: Path, echo: EchoServer) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with proxy_process("--admin", "127.0.0.1:0", "--admin-token-file", str(token_file)) as p:
        api = admin_of(p)
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {TOKEN}"},
                        bearer(TOKEN + "x"), {"Authorization": "Bearer"}):
            reply = api.request("GET", "/proxies", headers=headers)
            assert reply.status == 401, headers
            assert reply.json == {"error": "this admin API needs a token: send "
                                           "Authorization: Bearer TOKEN", "status": 401}
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        # Refused means nothing changed.
        body = {"name": "web", "listen": "127.0.0.1:0", "upstream": echo.address}
        assert api.post("/proxies", body).status == 401
        assert api.request("GET", "/proxies", headers=bearer(TOKEN)).json == {}
        created = api.request("POST", "/proxies", body, headers=bearer(TOKEN))
        assert created.status == 201
        assert round_trip(port_of(created.json["listen"])) == b"ping"
        # The scheme's case is free (RFC 6750 follows RFC 7235's).
        reply = api.request("GET", "/metrics", headers={"Authorization": f"bearer {TOKEN}"})
        assert reply.status == 200
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0


def test_a_reload_takes_the_new_token(tmp_path: Path, echo: EchoServer) -> None:
    token_file, config = tmp_path / "token", tmp_path / "midway.toml"
    token_file.write_text(TOKEN)
    config.write_text(f"""
[server]
admin = "127.0.0.1:0"
admin_token_file = "{token_file}"

[proxy.web]
listen = "127.0.0.1:0"
upstreams = "{echo.address}"
""")
    with proxy_process("--config", str(config)) as p:
        assert wait_until(lambda: any("admin API" in line for line in p.stderr_lines))
        api = admin_of(p)
        assert api.request("GET", "/proxies", headers=bearer(TOKEN)).status == 200
        token_file.write_text("the-next-one\n")
        assert api.request("POST", "/reload", headers=bearer(TOKEN)).status == 200
        assert api.request("GET", "/proxies", headers=bearer(TOKEN)).status == 401
        assert api.request("GET", "/proxies", headers=bearer("the-next-one")).status == 200
        # A token file that went empty is a reload error: the token in force stays.
        token_file.write_text("\n")
        reply = api.request("POST", "/reload", headers=bearer("the-next-one"))
        assert reply.status == 400 and "admin_token_file" in reply.json["error"]
        assert api.request("GET", "/proxies", headers=bearer("the-next-one")).status == 200


def test_token_from_the_file_table_and_conflicts(tmp_path: Path) -> None:
    config = tmp_path / "midway.toml"
    config.write_text(f'[server]\nadmin = "127.0.0.1:0"\nadmin_token = "{TOKEN}"\n')
    with proxy_process("--config", str(config)) as p:
        api = admin_of(p)
        assert api.get("/version").status == 401
        assert api.request("GET", "/version", headers=bearer(TOKEN)).status == 200
    config.write_text(f'[server]\nadmin = "127.0.0.1:0"\nadmin_token = "{TOKEN}"\n'
                      f'admin_token_file = "{tmp_path / "t"}"\n')
    result = subprocess.run([sys.executable, "-m", "midway", "--config", str(config), "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "server.admin_token_file: give admin_token or admin_token_file, not both" \
        in result.stderr


def test_without_a_token_no_header_is_needed(admin: Admin) -> None:
    assert admin.get("/version").status == 200


def test_metrics_and_reload_on_a_single_process(admin: Admin, echo: EchoServer) -> None:
    created = admin.post("/proxies", {"name": "web", "listen": "127.0.0.1:0",
                                      "upstream": echo.address})
    port = port_of(created.json["listen"])
    for _ in range(3):
        assert round_trip(port, b"12345") == b"12345"

    def closes() -> float:
        reply = admin.get("/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        for family in text_string_to_metric_families(reply.body.decode()):
            for sample in family.samples:
                if sample.name == "midway_connection_seconds_count" and \
                        sample.labels == {"proxy": "web"}:
                    return sample.value
        return -1

    assert wait_until(lambda: closes() == 3, timeout=10)
    # Started without --config: nothing to reload, said as a 409.
    reply = admin.post("/reload")
    assert reply.status == 409 and "without --config" in reply.json["error"]


def test_the_token_is_not_a_command_line_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "midway", "--admin", "127.0.0.1:0",
                             "--admin-token", TOKEN, "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--admin-token: not a flag" in result.stderr
    assert TOKEN not in result.stderr


def test_a_token_file_others_can_read_is_warned_about(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        token_file.chmod(mode)
        with proxy_process("--admin", "127.0.0.1:0", "--admin-token-file", str(token_file)) as p:
            assert admin_of(p).request("GET", "/version", headers=bearer(TOKEN)).status == 200
            warning = f"{token_file} can be read by other users (mode 644): chmod 600 it"
            assert any(warning in line for line in p.stderr_lines) == warned, p.stderr_lines
    assert TOKEN not in "".join(p.stderr_lines)
