"""TLS termination and origination end to end (issue 11 items 1-2), with real
peers from Debian: curl and ``openssl s_client`` as clients, ``openssl s_server``
as an upstream, and Python's ``ssl`` where a test needs a checked 16 MiB each way.
midway runs as a child process (``python -m midway``), certificates are made at
test time (tests/tlspki.py), everything on loopback.

TLS never splices, so each test runs once per event loop (``per_loop``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import midway

from .. import helpers
from ..helpers import http_server, proxy_process, run, serve, sha256, wait_until
from ..tlspki import Pki, leaf, make_pki
from .test_balancing import _api_upstreams

pytestmark = pytest.mark.per_loop

TIMEOUT_S = 20.0
BLOB_SIZE = 16 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(helpers.needs(tool, apt=tool))


@contextlib.contextmanager
def tcp_server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A plain TCP server that ``handle``s one connection at a time (enough here)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT_S)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(TIMEOUT_S)
                    handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def echo_server() -> contextlib.AbstractContextManager[int]:
    """A plain TCP echo server."""
    return tcp_server(_echo)


@contextlib.contextmanager
def s_server(cert: Path, key: Path) -> Iterator[int]:
    """``openssl s_server -rev``: a TLS server that answers each line reversed."""
    port = helpers.free_port()
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert),
         "-key", str(key), "-rev", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False
        assert wait_until(up, 10), "openssl s_server did not start"
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def s_client(port: int, *args: str, data: bytes = b"") -> str:
    """``openssl s_client`` against midway: what it printed (stdout and stderr)."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         *args], input=data, capture_output=True, timeout=TIMEOUT_S)
    return (done.stdout + done.stderr).decode(errors="replace")


def test_curl_through_termination_reaches_a_plain_http_app(pki: Pki, tmp_path: Path) -> None:
    _needs("curl")
    page = os.urandom(300_000)
    (tmp_path / "page.bin").write_bytes(page)
    with http_server(tmp_path) as app, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{app}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key)) as mw:
        got = subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", str(pki.ca), "--resolve",
             f"localhost:{mw.port}:127.0.0.1", f"https://localhost:{mw.port}/page.bin"],
            capture_output=True, timeout=TIMEOUT_S)
    assert got.returncode == 0, got.stderr.decode()
    assert sha256(got.stdout) == sha256(page)


def test_a_chain_and_key_in_one_file_serve_the_whole_chain(pki: Pki) -> None:
    _needs("openssl")
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_chain)) as mw:
        out = s_client(mw.port, "-CAfile", str(pki.ca), "-showcerts", data=b"")
    assert "Verify return code: 0 (ok)" in out
    assert out.count("-----BEGIN CERTIFICATE-----") == 2  # leaf and CA sent


def test_alpn_is_negotiated_with_openssl_s_client(pki: Pki) -> None:
    _needs("openssl")
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key), "--tls-alpn", "h2",
            "--tls-alpn", "http/1.1") as mw:
        both = s_client(mw.port, "-CAfile", str(pki.ca), "-alpn", "h2,http/1.1")
        old = s_client(mw.port, "-CAfile", str(pki.ca), "-alpn", "http/1.1")
        none = s_client(mw.port, "-CAfile", str(pki.ca), "-alpn", "smtp")
    assert "ALPN protocol: h2" in both
    assert "ALPN protocol: http/1.1" in old
    assert "No ALPN negotiated" in none  # no shared protocol: served without one


def test_mtls_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    _needs("openssl")
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)) as mw:
        refused = s_client(mw.port, "-CAfile", str(pki.ca), "-quiet", data=b"ping\n")
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.client_cert, pki.client_key)
        raw = socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping\n")
            served = tls.recv(100).decode()
        assert wait_until(lambda: "client sent no certificate" in mw.stderr_text())
        log = mw.stderr_text()
    assert "ping" not in refused
    assert "ping" in served  # through midway to the echo server and back
    line = next(x for x in log.splitlines() if "client sent no certificate" in x)
    assert "tls: client sent no certificate" in line and "Traceback" not in log


def test_a_client_below_the_minimum_version_is_refused_in_words(pki: Pki) -> None:
    _needs("openssl")
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_chain),
            "--tls-min-version", "1.3") as mw:
        old = s_client(mw.port, "-CAfile", str(pki.ca), "-tls1_2")
        new = s_client(mw.port, "-CAfile", str(pki.ca), "-tls1_3")
        assert wait_until(lambda: "no shared protocol version" in mw.stderr_text(), 10), old
    assert "New, TLSv1.3" in new, new
    assert "alert protocol version" in old
    assert "tls: no shared protocol version" in mw.stderr_text()


def test_a_client_that_sends_nothing_is_closed_after_the_handshake_timeout(pki: Pki) -> None:
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key), "--tls-handshake-timeout-s", "0.5") as mw:
        with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as quiet:
            start = time.monotonic()
            assert quiet.recv(1) == b""  # closed by midway, not by us
            waited = time.monotonic() - start
        assert wait_until(lambda: "handshake timed out" in mw.stderr_text())
    assert 0.4 <= waited < 5
    assert "tls: handshake timed out after 0.5 s" in mw.stderr_text()


def test_a_client_that_resets_during_the_handshake_is_a_reset(pki: Pki, tmp_path: Path) -> None:
    """docs/tls.md: a reset during the handshake is a reset (reason ``reset``,
    no ``tls:`` line), as anywhere else, not a failed handshake; its detail
    names the layer it happened in, as docs/tls.md shows it."""
    access_log = tmp_path / "access.log"
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key), "--access-log", str(access_log)) as mw:
        hello = ssl.MemoryBIO()
        tls = ssl.create_default_context(cafile=str(pki.ca)).wrap_bio(
            ssl.MemoryBIO(), hello, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as raw:
            raw.sendall(hello.read())
            assert raw.recv(1)  # midway answered: the handshake is under way
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert wait_until(lambda: access_log.exists() and access_log.read_text().strip() != "")
        [record] = [json.loads(line) for line in access_log.read_text().splitlines()]
        log = mw.stderr_text()
    assert (record["reason"], record["first_close"]) == ("reset", "client")
    assert record["detail"] == "client: connection reset by peer (in inbound layer tls)"
    doc = " ".join((helpers.ROOT / "docs" / "tls.md").read_text(encoding="utf-8").split())
    assert f"`detail` `{record['detail']}`" in doc
    assert "tls:" not in log, log


def reversed_line(mw: helpers.ProxyProcess) -> bytes:
    """Send ``midway`` through ``mw`` to an ``s_server -rev`` upstream: its answer."""
    with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as plain:
        plain.sendall(b"midway\n")
        answer = b""
        while b"\n" not in answer:
            chunk = plain.recv(100)
            assert chunk, f"closed: {mw.stderr_text()}"
            answer += chunk
    return answer.strip()


def test_origination_to_openssl_s_server(pki: Pki) -> None:
    _needs("openssl")
    with s_server(pki.server_cert, pki.server_key) as up, proxy_process(
            "127.0.0.1:0", f"localhost:{up}", "--upstream-tls",
            "--upstream-tls-ca", str(pki.ca)) as mw:
        assert reversed_line(mw) == b"yawdim"  # reversed by s_server: it decrypted our bytes


@pytest.mark.parametrize("ca", ["wrong", "system"])
def test_origination_fails_verification_with_a_clear_log_line(pki: Pki, ca: str) -> None:
    _needs("openssl")
    # "wrong": the upstream's CA is not the one given; "system": a self-signed
    # upstream certificate against the system store.
    cert, key, flags = ((pki.server_cert, pki.server_key, ["--upstream-tls-ca", str(pki.other_cert)])
                        if ca == "wrong" else (pki.other_cert, pki.other_key, []))
    with s_server(cert, key) as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--upstream-tls", *flags) as mw:
        with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as plain:
            # Closed, nothing relayed (with a FIN: this client sent nothing yet; one
            # that had would get a reset, as the kernel does for unread bytes).
            assert plain.recv(100) == b""
        assert wait_until(lambda: "tls: upstream" in mw.stderr_text())
        log = mw.stderr_text()
    line = next(x for x in log.splitlines() if "tls: upstream" in x)
    reason = "unable to get local issuer certificate" if ca == "wrong" else "self-signed certificate"
    assert f"tls: upstream 127.0.0.1:{up}: certificate verify failed: {reason}" in line
    assert "Traceback" not in log


def test_a_failed_upstream_handshake_tries_the_next_upstream(pki: Pki) -> None:
    """As HAProxy's retry-on conn-failure: an upstream whose certificate does not
    verify is a failed attempt, and the client is served by the next one."""
    _needs("openssl")
    with s_server(pki.other_cert, pki.other_key) as bad, \
            s_server(pki.server_cert, pki.server_key) as good, proxy_process(
            "127.0.0.1:0", f"localhost:{bad}", f"localhost:{good}", "--upstream-tls",
            "--upstream-tls-ca", str(pki.ca)) as mw:
        for _ in range(4):  # round robin: at least two of them start with the bad one
            assert reversed_line(mw) == b"yawdim"
        assert wait_until(lambda: "trying the next one" in mw.stderr_text())
        log = mw.stderr_text()
    line = next(x for x in log.splitlines() if "trying the next one" in x)
    assert f"upstream localhost:{bad} failed: certificate verify failed: " in line, line
    assert "(tls_failed)" in line, line
    assert "Traceback" not in log


def test_the_last_upstreams_failed_handshake_is_a_failed_attempt_too(
        pki: Pki, tmp_path: Path) -> None:
    """docs/tls.md: a failed upstream handshake counts towards passive health and
    is listed in the access log's ``failures``, also when no upstream is left to
    try: a lone upstream whose certificate never verifies is ejected after
    ``eject_after`` connections, as a refusing one is, not \"connects again\";
    being the only one, it is still dialled (the panic rule, docs/balancing.md),
    and each such attempt fails the same way without a new ejection."""
    _needs("openssl")
    access = tmp_path / "access.log"
    with s_server(pki.other_cert, pki.other_key) as bad, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{bad}", "--upstream-tls", "--health-eject-after", "2",
            "--access-log", str(access)) as mw:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as plain:
                assert plain.recv(100) == b""  # closed, nothing relayed
        assert wait_until(lambda: "is down" in mw.stderr_text(), 10), mw.stderr_text()
        with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as plain:
            assert plain.recv(100) == b""  # ejected, dialled anyway: tls_failed again
        assert wait_until(lambda: len(access.read_text().splitlines()) == 3, 10)
        log = mw.stderr_text()
    down = next(x for x in log.splitlines() if "is down" in x)
    assert f"upstream 127.0.0.1:{bad} of proxy default is down: certificate verify failed" in down
    assert f"upstream 127.0.0.1:{bad} failed: certificate verify failed" in log
    assert "connects again" not in log, log
    records = [json.loads(x) for x in access.read_text().splitlines()]
    for record in records:
        assert record["reason"] == "tls_failed", record
        assert record["upstream"] is None, record
        assert record["attempts"] == 1, record
        assert [f["failure"] for f in record["failures"]] == ["tls_failed"], record
    assert log.count(" is down: ") == 1, log
    assert "dialling those ejected by passive health anyway" in log, log
    assert "Traceback" not in log


def _read_then_reset(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def resetting_server() -> contextlib.AbstractContextManager[int]:
    """A TCP upstream that accepts, reads what comes (a ClientHello), then resets."""
    return tcp_server(_read_then_reset)


def test_an_upstream_reset_during_the_handshake_is_a_failed_attempt(
        pki: Pki, tmp_path: Path) -> None:
    """docs/tls.md: an upstream that accepts, then resets during midway's
    handshake with it, is a failed handshake like any other: the next upstream
    serves the client, and the attempt counts (log line, access log
    ``failures``), not a reset passed on to the client."""
    _needs("openssl")
    access = tmp_path / "access.log"
    with resetting_server() as bad, s_server(pki.server_cert, pki.server_key) as good, \
            proxy_process("127.0.0.1:0", f"localhost:{bad}", f"localhost:{good}",
                          "--upstream-tls", "--upstream-tls-ca", str(pki.ca),
                          "--access-log", str(access)) as mw:
        for _ in range(4):  # round robin: at least two of them start with the bad one
            assert reversed_line(mw) == b"yawdim"
        assert wait_until(lambda: len(access.read_text().splitlines()) == 4, 10)
        log = mw.stderr_text()
    line = next(x for x in log.splitlines() if "trying the next one" in x)
    assert f"upstream localhost:{bad} failed: connection reset by peer (tls_failed)" in line, line
    records = [json.loads(x) for x in access.read_text().splitlines()]
    assert {r["reason"] for r in records} == {"eof"}, records
    retried = [r for r in records if r["failures"]]
    assert retried, records
    for record in retried:
        assert record["upstream"] == f"localhost:{good}", record
        assert [(f["upstream"], f["failure"]) for f in record["failures"]] == [
            (f"localhost:{bad}", "tls_failed")], record
    assert "Traceback" not in log


def test_the_last_upstreams_reset_during_the_handshake_closes_as_tls_failed(
        tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    with resetting_server() as bad, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{bad}", "--upstream-tls", "--health-eject-after", "2",
            "--access-log", str(access)) as mw:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as plain:
                assert plain.recv(100) == b""  # closed with a FIN, nothing relayed
        assert wait_until(lambda: "is down" in mw.stderr_text(), 10), mw.stderr_text()
        assert wait_until(lambda: len(access.read_text().splitlines()) == 2, 10)
        log = mw.stderr_text()
    assert f"upstream 127.0.0.1:{bad} of proxy default is down: connection reset by peer" in log
    for record in (json.loads(x) for x in access.read_text().splitlines()):
        assert (record["reason"], record["upstream"]) == ("tls_failed", None), record
        assert [f["failure"] for f in record["failures"]] == ["tls_failed"], record
    assert "Traceback" not in log


def _tls_upstream(pki: Pki, listener: socket.socket, result: dict[str, object],
                  down: bytes) -> None:
    """A TLS upstream for one connection: read BLOB_SIZE bytes, answer ``down``,
    then send close_notify and wait for midway's."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    raw, _ = listener.accept()
    raw.settimeout(TIMEOUT_S)
    with context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as tls:
        got = bytearray()
        while len(got) < BLOB_SIZE:
            chunk = tls.recv(1 << 20)
            assert chunk
            got += chunk
        result["upstream_got"] = sha256(bytes(got))
        tls.sendall(down)
        try:
            tls.unwrap()  # close_notify, then midway's, which it sends once the client's came
        except OSError as exc:
            result["upstream_end"] = repr(exc)
        else:
            result["upstream_end"] = "close_notify"


def test_reencrypt_16_mib_each_way_with_close_notify_passed_on(pki: Pki, tmp_path: Path) -> None:
    up_blob, down_blob = os.urandom(BLOB_SIZE), os.urandom(BLOB_SIZE)
    log = tmp_path / "access.log"
    result: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)
        server = threading.Thread(target=_tls_upstream, daemon=True,
                                  args=(pki, listener, result, down_blob))
        server.start()
        port = listener.getsockname()[1]
        with proxy_process("127.0.0.1:0", f"localhost:{port}", "--tls-cert",
                           str(pki.server_chain), "--upstream-tls", "--upstream-tls-ca",
                           str(pki.ca), "--access-log", str(log)) as mw:
            context = ssl.create_default_context(cafile=str(pki.ca))
            raw = socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S)
            with context.wrap_socket(raw, server_hostname="localhost",
                                     suppress_ragged_eofs=False) as tls:
                tls.sendall(up_blob)
                got = bytearray()
                while chunk := tls.recv(1 << 20):  # b"" only at a close_notify
                    got += chunk
                tls.unwrap()
            server.join(TIMEOUT_S)
            assert wait_until(lambda: log.exists() and log.read_text().strip() != "")
    assert result.get("upstream_got") == sha256(up_blob)
    assert sha256(bytes(got)) == sha256(down_blob)
    assert result.get("upstream_end") == "close_notify"
    record = json.loads(log.read_text().splitlines()[0])
    assert (record["bytes_up"], record["bytes_down"]) == (BLOB_SIZE, BLOB_SIZE)
    assert record["reason"] == "eof" and record["path"] == "copy"


@pytest.mark.one_mode
@pytest.mark.parametrize("where", ["flag", "file"])
def test_check_names_the_key_of_a_bad_certificate_path(where: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    if where == "flag":
        args = ["--check", "127.0.0.1:0", "127.0.0.1:1", "--tls-cert", str(missing)]
    else:
        config = tmp_path / "midway.toml"
        config.write_text(f'[proxy.web]\nlisten = "127.0.0.1:0"\nupstreams = "127.0.0.1:1"\n'
                          f'tls_cert = "{missing}"\n')
        args = ["--check", "--config", str(config)]
    done = subprocess.run([sys.executable, "-m", "midway", *args], capture_output=True,
                          timeout=TIMEOUT_S, cwd=helpers.ROOT)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    key = "--tls-cert" if where == "flag" else "proxy.web.tls_cert"
    assert f"{key}: cannot read {missing}: No such file or directory" in err
    assert "Traceback" not in err


def _served_certificate(port: int) -> bytes:
    """The DER of the leaf certificate midway serves on ``port``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), TIMEOUT_S)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_reload_reads_a_renewed_certificate_with_an_unchanged_configuration(
        pki: Pki, tmp_path: Path) -> None:
    # Renewal (certbot, cert-manager) rewrites the files the configuration names;
    # the configuration stays the same, and a SIGHUP must pick the new pair up.
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    config = tmp_path / "midway.toml"
    config.write_text(f'[proxy.web]\nlisten = "127.0.0.1:0"\nupstreams = "127.0.0.1:1"\n'
                      f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    before = ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())
    after = ssl.PEM_cert_to_DER_cert(pki.other_cert.read_text())
    with proxy_process("--config", str(config)) as mw:
        assert _served_certificate(mw.port) == before
        shutil.copy(pki.other_cert, cert)
        shutil.copy(pki.other_key, key)
        mw.signal(signal.SIGHUP)
        assert wait_until(lambda: "reload: done" in mw.stderr_text(), 10), mw.stderr_text()
        assert _served_certificate(mw.port) == after
        # A renewal that left a broken file keeps the running certificate.
        cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        mw.signal(signal.SIGHUP)
        assert wait_until(lambda: "still running the previous configuration"
                          in mw.stderr_text(), 10), mw.stderr_text()
        assert _served_certificate(mw.port) == after
        assert "Traceback" not in mw.stderr_text()


def _verified_by_name(port: int, ca: Path, name: str | None) -> tuple[str, bytes]:
    """Connect with TLS asking for ``name`` (none: no SNI), verifying the served
    certificate against ``ca`` and, with a name, for that name (as curl does);
    returns the certificate's common name and the first line the app sends."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = name is not None
    raw = socket.create_connection(("127.0.0.1", port), TIMEOUT_S)
    with context.wrap_socket(raw, server_hostname=name) as tls:
        cert = tls.getpeercert()
        assert cert is not None
        common = next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")
        tls.sendall(b"hello\n")
        line = tls.recv(100)
    return common, line


def test_each_route_serves_its_own_certificate_to_its_names(pki: Pki, tmp_path: Path) -> None:
    """One terminating port, three certificates: api.test's, one for shop.test
    and *.shop.test, and the proxy's (localhost) for any other name or none.
    Each client verifies the certificate for the name it asked, and reaches the
    route's upstream; a route without a certificate serves the proxy's."""
    ca_key = pki.ca.parent / "ca.key"
    leaf(tmp_path, "api", "/CN=api.test", pki.ca, ca_key, "DNS:api.test")
    leaf(tmp_path, "shop", "/CN=shop.test", pki.ca, ca_key, "DNS:shop.test,DNS:*.shop.test")
    shop = tmp_path / "shop-with-key.pem"  # the key in the certificate's file
    shop.write_bytes((tmp_path / "shop.pem").read_bytes() + (tmp_path / "shop.key").read_bytes())

    def answering(name: bytes) -> Callable[[socket.socket], None]:
        def handle(conn: socket.socket) -> None:
            conn.recv(100)
            conn.sendall(name)
        return handle

    with tcp_server(answering(b"default")) as default, tcp_server(answering(b"api")) as api, \
            tcp_server(answering(b"shop")) as shop_app, \
            tcp_server(answering(b"plain")) as plain:
        config = tmp_path / "midway.toml"
        config.write_text(f"""
[proxy.web]
listen = "127.0.0.1:0"
upstreams = "127.0.0.1:{default}"
tls_cert = "{pki.server_cert}"
tls_key = "{pki.server_key}"

[[proxy.web.routes]]
sni = "api.test"
tls_cert = "{tmp_path / 'api.pem'}"
tls_key = "{tmp_path / 'api.key'}"
upstreams = "127.0.0.1:{api}"

[[proxy.web.routes]]
sni = ["shop.test", "*.shop.test"]
tls_cert = "{shop}"
upstreams = "127.0.0.1:{shop_app}"

[[proxy.web.routes]]
sni = "localhost"
upstreams = "127.0.0.1:{plain}"
""")
        with proxy_process("--config", str(config)) as mw:
            got = {name: _verified_by_name(mw.port, pki.ca, name)
                   for name in ("api.test", "API.TEST", "shop.test", "eu.shop.test",
                                "localhost", None)}
            assert "Traceback" not in mw.stderr_text()
    assert got == {
        "api.test": ("api.test", b"api"), "API.TEST": ("api.test", b"api"),
        "shop.test": ("shop.test", b"shop"), "eu.shop.test": ("shop.test", b"shop"),
        "localhost": ("localhost", b"plain"),  # a route without a certificate
        None: ("localhost", b"default"),
    }


@pytest.mark.one_mode
def test_check_names_a_route_s_bad_key_and_a_route_certificate_without_termination(
        pki: Pki, tmp_path: Path) -> None:
    def check(proxy_tls: str, route_tls: str) -> str:
        config = tmp_path / "midway.toml"
        config.write_text(f'[proxy.web]\nlisten = "127.0.0.1:0"\nupstreams = "127.0.0.1:1"\n'
                          f'{proxy_tls}\n[[proxy.web.routes]]\nsni = "api.test"\n'
                          f'upstreams = "127.0.0.1:2"\n{route_tls}\n')
        done = subprocess.run([sys.executable, "-m", "midway", "--check", "--config",
                               str(config)], capture_output=True, timeout=TIMEOUT_S,
                              cwd=helpers.ROOT)
        assert done.returncode == 2 and "Traceback" not in done.stderr.decode(), done
        return done.stderr.decode()

    proxy = f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"'
    wrong = check(proxy, f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.other_key}"')
    assert ("proxy.web.routes[0].tls_key: the private key does not match the certificate "
            f"in {pki.server_cert}") in wrong
    alone = check("", f'tls_cert = "{pki.server_cert}"')
    assert "proxy.web.routes[0].tls_cert: needs the proxy's tls_cert" in alone
    key_only = check(proxy, f'tls_key = "{pki.server_key}"')
    assert "proxy.web.routes[0].tls_key: needs the route's tls_cert" in key_only


def test_termination_sends_the_agreed_alpn_and_the_sni_in_a_proxy_v2_header(pki: Pki) -> None:
    # The docs promise "ALPN when the protocol is known (... a TLS-terminating
    # layer's)": what the upstream behind midway reads in the v2 header.
    from midway.layers.proxy_protocol import ProxyProtocolParser

    got: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)

        def upstream() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT_S)
                parser = ProxyProtocolParser("v2")
                header = None
                while header is None:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    header = parser.feed(chunk)
                got["header"] = header
                conn.sendall(b"ok")

        thread = threading.Thread(target=upstream, daemon=True)
        thread.start()
        with proxy_process("127.0.0.1:0", f"127.0.0.1:{listener.getsockname()[1]}",
                           "--tls-cert", str(pki.server_chain), "--tls-alpn", "h2",
                           "--tls-alpn", "http/1.1", "--proxy-protocol-out", "v2") as mw:
            context = ssl.create_default_context(cafile=str(pki.ca))
            context.set_alpn_protocols(["h2", "http/1.1"])
            raw = socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == "h2"
                assert tls.recv(2) == b"ok"
            thread.join(TIMEOUT_S)
    header = got.get("header")
    assert header is not None, "no PROXY header reached the upstream"
    assert header.authority == "localhost"  # type: ignore[attr-defined]
    assert header.alpn == b"h2"  # type: ignore[attr-defined]


def test_a_bad_record_after_the_handshake_is_a_reset_named_as_tls(pki: Pki, tmp_path: Path) -> None:
    """docs/tls.md: a bad record (or a fatal alert) on an open connection resets
    both ways, reason ``reset``; the access log's detail says it was TLS, not the
    errno OpenSSL's error happens to carry (1, which reads "permission denied")."""
    access_log = tmp_path / "access.log"
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key), "--access-log", str(access_log)) as mw:
        context = ssl.create_default_context(cafile=str(pki.ca))
        raw = socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping\n")
            assert tls.recv(5) == b"ping\n"  # relayed: the session is open
            # An application-data record that no key decrypts, on the same socket.
            with socket.socket(fileno=os.dup(tls.fileno())) as under:
                under.sendall(b"\x17\x03\x03\x00\x20" + b"x" * 32)
                under.settimeout(TIMEOUT_S)
                with pytest.raises(ConnectionResetError):
                    while under.recv(65536):  # what is left of the session, then the reset
                        pass
        assert wait_until(lambda: access_log.exists() and access_log.read_text().strip() != "")
        [record] = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert (record["reason"], record["first_close"]) == ("reset", "client"), record
    assert record["detail"] == "client: tls: decryption failed or bad record mac", record


@pytest.mark.one_mode
@pytest.mark.parametrize("name", ["bad..name", ".example.com", "a" * 64 + ".example.com"])
def test_check_refuses_an_upstream_tls_sni_that_is_no_host_name(name: str) -> None:
    """Such a name cannot be sent as SNI (Python's ssl refuses to encode it): it
    used to pass --check, then every connection logged a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "midway", "--check", "127.0.0.1:0", "localhost:1",
         "--upstream-tls", "--upstream-tls-sni", name],
        capture_output=True, timeout=TIMEOUT_S, cwd=helpers.ROOT)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert f"--upstream-tls-sni: {name!r} is not a host name" in err, err
    assert "Traceback" not in err


@pytest.mark.one_mode
def test_check_warns_of_an_expired_certificate_and_passes(pki: Pki, tmp_path: Path) -> None:
    """docs/tls.md: an expired certificate is served (a late renewal must not stop
    the proxy) with a warning; --check, which an operator runs after a renewal,
    says it too rather than a bare "configuration OK"."""
    csr, expired = tmp_path / "old.csr", tmp_path / "old.pem"
    for argv in (["req", "-new", "-key", str(pki.server_key), "-subj", "/CN=localhost",
                  "-out", str(csr)],
                 ["x509", "-req", "-in", str(csr), "-CA", str(pki.ca), "-CAkey",
                  str(pki.ca.parent / "ca.key"), "-days", "-1", "-out", str(expired)]):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=TIMEOUT_S)
    done = subprocess.run(
        [sys.executable, "-m", "midway", "--check", "127.0.0.1:0", "127.0.0.1:1",
         "--tls-cert", str(expired), "--tls-key", str(pki.server_key)],
        capture_output=True, timeout=TIMEOUT_S, cwd=helpers.ROOT)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert done.stdout.decode() == "midway: configuration OK (1 proxy: default)\n"
    assert err.startswith(f"midway: warning: proxy.default.tls_cert: the certificate in "
                          f"{expired} expired on "), err
    assert err.endswith("GMT: clients will refuse it; renew it and reload\n"), err


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_proxy_header_on_a_tls_port_is_named_in_the_log(pki: Pki, version: str) -> None:
    """A balancer with send-proxy in front of a TLS listener without
    proxy_protocol_in: the log line says what came and what to set, not only
    that the client "does not speak TLS"."""
    from midway.layers.proxy_protocol import build_v1, build_v2

    build = build_v1 if version == "v1" else build_v2
    header = build(("203.0.113.5", 1234), ("192.0.2.1", 443))
    with echo_server() as up, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{up}", "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key)) as mw:
        with socket.create_connection(("127.0.0.1", mw.port), TIMEOUT_S) as raw:
            raw.sendall(header + b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00")
            raw.settimeout(TIMEOUT_S)
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(100):
                    pass
        assert wait_until(lambda: "tls:" in mw.stderr_text(), 10)
        log = mw.stderr_text()
    assert ("tls: client sent a PROXY protocol header (behind a load balancer with "
            "send-proxy? set proxy_protocol_in)") in log, log


@pytest.mark.parametrize("cert", ["verified", "wrong"])
def test_active_checks_of_a_tls_upstream_run_over_tls(pki: Pki, cert: str) -> None:
    """docs/balancing.md: with upstream_tls an active check does what a connection
    does, the handshake (verified) and then send/expect over TLS, as HAProxy checks
    an ``ssl`` server.  In plaintext a TLS server never answered the check: the
    upstream was marked down at the first one and every client closed
    (no_upstream), although its connections would have worked; and a certificate
    that does not verify must fail the check in words."""
    _needs("openssl")
    cert_file, key_file = ((pki.server_cert, pki.server_key) if cert == "verified"
                           else (pki.other_cert, pki.other_key))
    with s_server(cert_file, key_file) as up, proxy_process(
            "127.0.0.1:0", f"localhost:{up}", "--upstream-tls", "--upstream-tls-ca", str(pki.ca),
            "--admin", "127.0.0.1:0", "--health-interval-s", "0.2", "--health-send", r"midway\n",
            "--health-expect", "yawdim") as mw:
        assert wait_until(lambda: any("admin API" in line for line in mw.stderr_lines), 10)
        admin = int(next(line for line in mw.stderr_lines
                         if "admin API" in line).rsplit(":", 1)[1])

        def checks() -> list[dict[str, object]]:
            return [u["last_check"] for u in _api_upstreams(admin).values()]

        if cert == "wrong":
            assert wait_until(lambda: "is down" in mw.stderr_text(), 10), mw.stderr_text()
            down = next(x for x in mw.stderr_text().splitlines() if "is down" in x)
            assert ("is down: certificate verify failed: self-signed certificate "
                    "(1 check)") in down, down
            return
        assert wait_until(lambda: checks()[0] is not None, 10)
        seen: list[dict[str, object]] = []
        while len(seen) < 3:  # three checks in a row pass: the reply was decrypted
            assert wait_until(lambda: checks()[0] not in seen, 10)
            seen.append(checks()[0])
        assert [c["passed"] for c in seen] == [True] * 3, seen
        assert "is down" not in mw.stderr_text(), mw.stderr_text()


def test_a_connection_in_its_handshake_is_listed_as_such_then_with_its_sni(pki: Pki) -> None:
    """``GET /connections`` (``list_connections``) said ``connecting`` of a client
    midway was still doing its TLS handshake with; once relaying, its SNI shows."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def main() -> None:
        async with serve(hold) as up, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{up}", tls_cert=str(pki.server_cert),
                tls_key=str(pki.server_key)) as proxy:
            async def listed(state: str) -> dict[str, object]:
                async with asyncio.timeout(5):
                    while not (rows := proxy.list_connections()) or rows[0]["state"] != state:
                        await asyncio.sleep(0.01)
                return rows[0]

            quiet = await asyncio.open_connection(proxy.host, proxy.port)
            assert (await listed("TLS handshake"))["phase"] == "inbound"
            quiet[1].close()
            client = ssl.create_default_context(cafile=str(pki.ca))
            _, writer = await asyncio.open_connection(proxy.host, proxy.port, ssl=client,
                                                      server_hostname="localhost")
            relaying = await listed("open")
            assert (relaying["phase"], relaying["sni"], relaying["route"]) == (
                "relay", "localhost", None)
            writer.close()
    run(main())
