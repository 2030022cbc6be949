"""Re-capture the byte fixtures in tests/layers/data/ from real peers (run by hand).

    PYTHONPATH=$PWD python tests/layers/capture_fixtures.py

Needs openssl, curl and haproxy on the PATH (Debian: openssl, curl, haproxy). A
recorder listens on loopback, keeps the first bytes of every connection it
accepts (until the peer is quiet for 0.5 s) and closes; each scenario points a
real client (openssl s_client, curl) or HAProxy's send-proxy/send-proxy-v2 at it,
and the bytes are written as hex, 32 bytes a line, with a comment header that
says how they were made.  Everything stays on 127.0.0.1/::1; every wait is
bounded.  Not a test: pytest does not collect it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

DATA = Path(__file__).with_name("data")
QUIET_S = 0.5
TOTAL_S = 5.0


class Recorder:
    """Accepts connections on ``host`` and records the first bytes of each."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(TOTAL_S)
        self.port: int = self.sock.getsockname()[1]
        self.captures: list[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                return
            with conn:
                conn.settimeout(QUIET_S)
                got = b""
                deadline = time.monotonic() + TOTAL_S
                while time.monotonic() < deadline and len(got) < 65536:
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        break
                    except ConnectionResetError:  # HAProxy's health checks end with a reset
                        break
                    if not chunk:
                        break
                    got += chunk
                self.captures.append(got)

    def wait(self, count: int = 1) -> list[bytes]:
        deadline = time.monotonic() + TOTAL_S * 2
        while len(self.captures) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.captures

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(TOTAL_S * 2)


def write_fixture(name: str, how: str, data: bytes) -> None:
    lines = [f"# {line}" for line in textwrap.wrap(how, 90)]
    lines.append(f"# {len(data)} bytes")
    lines += [data[i : i + 32].hex() for i in range(0, len(data), 32)]
    (DATA / name).write_text("\n".join(lines) + "\n")
    print(f"{name}: {len(data)} bytes")


def run(cmd: list[str], stdin: bytes = b"") -> None:
    subprocess.run(cmd, input=stdin, capture_output=True, timeout=TOTAL_S * 2, check=False)


def capture_clienthello(name: str, how: str, cmd_for_port) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    try:
        run(cmd_for_port(rec.port))
        data = rec.wait()[0]
    finally:
        rec.close()
    write_fixture(name, how, data)


def openssl_version() -> str:
    return subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()


def curl_version() -> str:
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(" (")[0]


def haproxy_version() -> str:
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    return " ".join(out.splitlines()[0].split()[:3])


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int) -> None:
    deadline = time.monotonic() + TOTAL_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"haproxy did not listen on {host}:{port}")


def with_haproxy(config: str, listen: tuple[str, int], client) -> None:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(config)
        proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_listening(*listen)
            client()
        finally:
            proc.terminate()
            proc.wait(TOTAL_S)


HAPROXY_GLOBAL = """\
global
    maxconn 64
defaults
    mode tcp
    timeout connect 2s
    timeout client 5s
    timeout server 5s
"""


def capture_haproxy(name: str, option: str, bind_host: str, payload: bytes,
                    extra_bind: str = "", shown_bind: str = "", client_cmd=None, local_check: bool = False) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    port = free_port(bind_host)
    bind = f"[{bind_host}]:{port}" if ":" in bind_host else f"{bind_host}:{port}"
    check = " check inter 200ms check-send-proxy" if local_check else ""
    unique = "unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt" if "unique-id" in option else ""
    config = HAPROXY_GLOBAL + f"""
frontend fe
    bind {bind} {extra_bind}
    {unique}
    default_backend be
backend be
    server rec 127.0.0.1:{rec.port} {option}{check}
"""

    def client() -> None:
        if local_check:
            time.sleep(0.5)
            return
        if client_cmd is not None:
            run(client_cmd(port))
            return
        with socket.create_connection((bind_host, port), timeout=TOTAL_S) as c:
            c.sendall(payload)
            time.sleep(0.3)

    try:
        with_haproxy(config, (bind_host, port), client)
        # the first connection is wait_listening's probe (a header and nothing else)
        captures = [c for c in rec.wait(3 if local_check else 2) if c]
    finally:
        rec.close()
    if local_check:
        # the readiness probe of wait_listening is relayed too; take a check's bytes
        captures = [c for c in captures if c[12:13] == b"\x20"]
    how = (f"{haproxy_version()} `server ... {option}{check}` in front of a loopback "
           f"recorder; frontend `bind {bind}{' ' + shown_bind if shown_bind else ''}`; "
           + ("a health check (no client)" if local_check else
              f"client sent {payload!r}" if client_cmd is None else "client: curl, see name"))
    write_fixture(name, how, captures[-1])


def main() -> int:
    DATA.mkdir(exist_ok=True)
    ov = openssl_version()
    capture_clienthello(
        "clienthello_openssl.hex",
        f"{ov}: openssl s_client -connect 127.0.0.1:PORT -servername WWW.Example.COM "
        "-alpn h2,http/1.1 </dev/null (SNI sent in mixed case on purpose)",
        lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}", "-servername",
                   "WWW.Example.COM", "-alpn", "h2,http/1.1"],
    )
    capture_clienthello(
        "clienthello_openssl_nosni.hex",
        f"{ov}: openssl s_client -connect 127.0.0.1:PORT -noservername </dev/null",
        lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}", "-noservername"],
    )
    alpns = ",".join(["h2", "http/1.1"] + [f"proto-{i:03d}-padding-to-grow-the-hello" for i in range(20)])
    capture_clienthello(
        "clienthello_openssl_split.hex",
        f"{ov}: openssl s_client -connect 127.0.0.1:PORT -servername split.example.net "
        "-max_send_frag 512 -alpn h2,http/1.1,proto-000-padding-to-grow-the-hello,... (22 "
        "protocols, so the ClientHello is larger than 512 bytes and spans several TLS records)",
        lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}", "-servername",
                   "split.example.net", "-max_send_frag", "512", "-alpn", alpns],
    )
    cv = curl_version()
    capture_clienthello(
        "clienthello_curl.hex",
        f"{cv}: curl -sk --resolve api.example.test:PORT:127.0.0.1 https://api.example.test:PORT/",
        lambda p: ["curl", "-sk", "--max-time", "2", "--resolve", f"api.example.test:{p}:127.0.0.1",
                   f"https://api.example.test:{p}/"],
    )
    capture_clienthello(
        "clienthello_curl_tls12.hex",
        f"{cv}: curl -sk --tlsv1.2 --tls-max 1.2 --http1.1 --resolve "
        "legacy.example.test:PORT:127.0.0.1 https://legacy.example.test:PORT/",
        lambda p: ["curl", "-sk", "--max-time", "2", "--tlsv1.2", "--tls-max", "1.2", "--http1.1",
                   "--resolve", f"legacy.example.test:{p}:127.0.0.1",
                   f"https://legacy.example.test:{p}/"],
    )

    payload = b"hello from the client\n"
    capture_haproxy("proxy_v1_tcp4.hex", "send-proxy", "127.0.0.1", payload)
    capture_haproxy("proxy_v1_tcp6.hex", "send-proxy", "::1", payload)
    capture_haproxy("proxy_v2_tcp4.hex", "send-proxy-v2", "127.0.0.1", payload)
    capture_haproxy("proxy_v2_tcp6.hex", "send-proxy-v2", "::1", payload)
    capture_haproxy("proxy_v2_local.hex", "send-proxy-v2", "127.0.0.1", b"", local_check=True)
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "site.pem"
        key = Path(tmp) / "key.pem"
        crt = Path(tmp) / "crt.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=tls.example.test", "-keyout", str(key), "-out", str(crt)],
                       capture_output=True, check=True, timeout=10)
        pem.write_text(crt.read_text() + key.read_text())
        capture_haproxy(
            "proxy_v2_tlvs.hex",
            "send-proxy-v2 proxy-v2-options ssl,ssl-cipher,cert-sig,cert-key,authority,"
            "crc32c,unique-id",
            "127.0.0.1", b"", extra_bind=f"ssl crt {pem} alpn h2,http/1.1",
            shown_bind="ssl crt site.pem alpn h2,http/1.1",
            client_cmd=lambda p: ["curl", "-sk", "--max-time", "2", "--http1.1", "--resolve",
                                  f"tls.example.test:{p}:127.0.0.1",
                                  f"https://tls.example.test:{p}/"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
