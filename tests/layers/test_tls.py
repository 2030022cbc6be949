"""The TLS keys of a proxy: what is refused before anything starts, with the key
named (midway/layers/tls.py's checks, run by ``--check`` and by every start or
reconfigure), and the words a failed handshake is logged with."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from midway.config.load import config_from_dict
from midway.config.schema import ProxyConfig
from midway.errors import ConfigError
from midway.layers.tls import (
    TlsOrigination,
    TlsTermination,
    build_tls_layers,
    check_tls,
    describe_tls_error,
)

from ..tlspki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def proxy(upstreams: str | list[str] = "127.0.0.1:1", **keys: Any) -> ProxyConfig:
    config = config_from_dict({"proxy": {"web": {"listen": "127.0.0.1:0",
                                                 "upstreams": upstreams, **keys}}})
    return config.proxies[0]


def refused(config: ProxyConfig) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        check_tls(config)
    with pytest.raises(ConfigError):
        build_tls_layers(config)  # what a start or a reconfigure runs
    return caught.value


def test_keys_are_loaded_with_their_defaults() -> None:
    config = proxy()
    assert (config.tls_cert, config.tls_min_version, config.tls_handshake_timeout_s) == ("", "1.2", 10.0)
    assert (config.upstream_tls, config.upstream_tls_verify) == (False, True)
    assert build_tls_layers(config) == ((), ())


def test_a_key_of_termination_without_tls_cert_is_refused() -> None:
    for key, value in [("tls_key", "k.pem"), ("tls_alpn", ["h2"]), ("tls_client_ca", "ca.pem"),
                       ("tls_min_version", "1.3")]:
        err = refused(proxy(**{key: value}))
        assert (err.path, err.message) == (f"proxy.web.{key}", "needs tls_cert (TLS termination)")


def test_a_key_of_origination_without_upstream_tls_is_refused() -> None:
    err = refused(proxy(upstream_tls_sni="example.com"))
    assert (err.path, err.message) == ("proxy.web.upstream_tls_sni", "needs upstream_tls = true")
    err = refused(proxy(upstream_tls_verify=False))
    assert (err.path, err.message) == ("proxy.web.upstream_tls_verify", "needs upstream_tls = true")


def test_tls_keys_in_defaults_need_one_proxy_that_uses_them(pki: Pki) -> None:
    """As proxy_protocol_trusted: [defaults] may hold the TLS keys of the proxies
    that speak TLS while others do not; a key no proxy can use is refused."""
    defaults = {"tls_alpn": ["http/1.1"], "tls_min_version": "1.3",
                "upstream_tls_ca": str(pki.ca)}

    def load(**first: Any) -> tuple[ProxyConfig, ...]:
        return config_from_dict({
            "defaults": defaults,
            "proxy": {"a": {"listen": "127.0.0.1:0", "upstreams": "localhost:1", **first},
                      "b": {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1"}}}).proxies

    a, b = load(tls_cert=str(pki.server_chain), upstream_tls=True)
    for config in (a, b):
        check_tls(config)  # b inherits keys it does not use: that is fine
    assert (a.tls_alpn, a.tls_min_version, a.upstream_tls_ca) == (("http/1.1",), "1.3",
                                                                   str(pki.ca))
    assert build_tls_layers(b) == ((), ())
    with pytest.raises(ConfigError) as caught:
        load(upstream_tls=True)
    assert (caught.value.path, caught.value.message) == (
        "defaults.tls_alpn", "needs tls_cert (TLS termination) in one proxy")
    with pytest.raises(ConfigError) as caught:
        load(tls_cert=str(pki.server_chain))
    assert (caught.value.path, caught.value.message) == (
        "defaults.upstream_tls_ca", "needs upstream_tls = true in one proxy")


def test_the_loader_refuses_a_version_and_a_timeout_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"proxy\.web\.tls_min_version: '1\.1' is not one of"):
        proxy(tls_min_version="1.1")
    with pytest.raises(ConfigError, match=r"proxy\.web\.tls_handshake_timeout_s: must be at least"):
        proxy(tls_handshake_timeout_s=0)


def test_a_missing_certificate_names_tls_cert(tmp_path: Path) -> None:
    err = refused(proxy(tls_cert=str(tmp_path / "nope.pem")))
    assert err.path == "proxy.web.tls_cert"
    assert err.message == f"cannot read {tmp_path / 'nope.pem'}: No such file or directory"


def test_a_file_without_a_certificate_names_tls_cert(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    err = refused(proxy(tls_cert=str(junk), tls_key=str(pki.server_key)))
    assert (err.path, err.message) == ("proxy.web.tls_cert", f"{junk} holds no PEM certificate")
    err = refused(proxy(tls_cert=str(pki.server_cert)))  # no key in the cert file
    assert (err.path, err.message) == ("proxy.web.tls_cert",
                                       f"{pki.server_cert} holds no PEM private key")


def test_a_key_of_another_certificate_names_tls_key(pki: Pki) -> None:
    err = refused(proxy(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key)))
    assert err.path == "proxy.web.tls_key"
    assert err.message == f"the private key does not match the certificate in {pki.server_cert}"


def test_a_key_of_another_type_names_tls_key(tmp_path: Path, pki: Pki) -> None:
    # An RSA key for an EC certificate (or the reverse): OpenSSL says "no
    # certificate assigned", which named tls_cert and not the problem.
    rsa_key = tmp_path / "rsa.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                    "rsa_keygen_bits:2048", "-out", str(rsa_key)],
                   check=True, capture_output=True, timeout=60)
    err = refused(proxy(tls_cert=str(pki.server_cert), tls_key=str(rsa_key)))
    assert (err.path, err.message) == (
        "proxy.web.tls_key", f"the private key does not match the certificate in "
                             f"{pki.server_cert} (a key of another type: RSA for an "
                             "ECDSA certificate, or the reverse)")
    err = refused(proxy(upstream_tls=True, upstream_tls_cert=str(pki.client_cert),
                        upstream_tls_key=str(rsa_key)))
    assert err.path == "proxy.web.upstream_tls_key"
    assert "the private key does not match the certificate" in err.message


def test_a_chain_with_the_ca_first_says_the_leaf_must_come_first(tmp_path: Path, pki: Pki) -> None:
    reversed_chain = tmp_path / "reversed.pem"
    reversed_chain.write_text(pki.ca.read_text() + pki.server_cert.read_text())
    err = refused(proxy(tls_cert=str(reversed_chain), tls_key=str(pki.server_key)))
    assert (err.path, err.message) == (
        "proxy.web.tls_key", f"the private key does not match the certificate in "
                             f"{reversed_chain} (its first certificate: the leaf must come "
                             "first, then its chain)")


def test_a_damaged_certificate_or_key_is_named_in_words(tmp_path: Path, pki: Pki) -> None:
    # OpenSSL says "[SSL] PEM lib (_ssl.c:3905)" for both, and names no file.
    leaf, ca = pki.server_cert.read_text(), pki.ca.read_text()
    bad_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    chain = tmp_path / "chain.pem"
    chain.write_text(leaf + bad_der)
    err = refused(proxy(tls_cert=str(chain), tls_key=str(pki.server_key)))
    assert (err.path, err.message) == (
        "proxy.web.tls_cert", f"cannot load {chain}: certificate 2 of the file is damaged "
                              "(not a valid X.509 certificate)")
    key = pki.server_key.read_text()
    lines = key.splitlines()
    lines[1] = lines[1][:10] + ("Q" if lines[1][10] != "Q" else "R") + lines[1][11:]
    damaged = tmp_path / "damaged.key"
    damaged.write_text("\n".join(lines) + "\n")
    err = refused(proxy(tls_cert=str(pki.server_cert), tls_key=str(damaged)))
    assert (err.path, err.message) == (
        "proxy.web.tls_key", f"cannot load {damaged}: the private key is damaged "
                             "(not a valid PEM private key)")
    both = tmp_path / "both.pem"  # the key in the certificate's file: tls_cert is named
    both.write_text(leaf + ca + "\n".join(lines) + "\n")
    err = refused(proxy(tls_cert=str(both)))
    assert err.path == "proxy.web.tls_cert" and "the private key is damaged" in err.message
    err = refused(proxy(upstream_tls=True, upstream_tls_ca=str(chain)))
    assert (err.path, err.message) == (
        "proxy.web.upstream_tls_ca", f"cannot load {chain}: certificate 2 of the file is "
                                     "damaged (not a valid X.509 certificate)")


def test_an_expired_certificate_is_served_with_a_warning(
        tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    # Loaded (as HAProxy and nginx do: a late renewal must not stop the proxy),
    # but said at every start and reload: clients refuse it at each handshake.
    ca_key = pki.ca.parent / "ca.key"
    csr, expired = tmp_path / "old.csr", tmp_path / "old.pem"
    subprocess.run(["openssl", "req", "-new", "-key", str(pki.server_key), "-subj",
                    "/CN=localhost", "-out", str(csr)], check=True, capture_output=True,
                   timeout=30)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki.ca),
                    "-CAkey", str(ca_key), "-days", "-1", "-out", str(expired)],
                   check=True, capture_output=True, timeout=30)
    with caplog.at_level(logging.WARNING, logger="midway"):
        inbound, _ = build_tls_layers(proxy(tls_cert=str(expired), tls_key=str(pki.server_key)))
    assert inbound
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"proxy.web.tls_cert: the certificate in {expired} "
                                  "expired on ")
    assert warnings[0].endswith("GMT: clients will refuse it; renew it and reload")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="midway"):
        build_tls_layers(proxy(upstream_tls=True, upstream_tls_cert=str(expired),
                               upstream_tls_key=str(pki.server_key)))
        build_tls_layers(proxy(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"proxy.web.upstream_tls_cert: the certificate in {expired} expired on "), warnings


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(
        tmp_path: Path, pki: Pki) -> None:
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True, timeout=30)
    err = refused(proxy(tls_cert=str(pki.server_cert), tls_key=str(encrypted)))
    assert err.path == "proxy.web.tls_key" and "the private key is encrypted" in err.message


def test_a_bad_ca_file_names_its_key(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    err = refused(proxy(tls_cert=str(pki.server_chain), tls_client_ca=str(junk)))
    assert (err.path, err.message) == (
        "proxy.web.tls_client_ca", f"cannot load {junk}: certificate 1 of the file is "
                                   "damaged (its PEM block is not valid base64)")
    err = refused(proxy(upstream_tls=True, upstream_tls_ca=str(tmp_path / "none.pem")))
    assert err.path == "proxy.web.upstream_tls_ca" and "cannot read" in err.message


def test_a_unix_upstream_needs_a_name_to_verify() -> None:
    err = refused(proxy(upstreams="unix:/run/app.sock", upstream_tls=True))
    assert err.path == "proxy.web.upstream_tls_sni"
    check_tls(proxy(upstreams="unix:/run/app.sock", upstream_tls=True,
                    upstream_tls_sni="app.internal"))
    check_tls(proxy(upstreams="unix:/run/app.sock", upstream_tls=True,
                    upstream_tls_verify=False))


def test_layers_are_built_with_the_settings(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    config = proxy(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                   tls_alpn=["h2", "http/1.1"], tls_client_ca=str(pki.ca),
                   tls_min_version="1.3", tls_handshake_timeout_s=3,
                   upstream_tls=True, upstream_tls_ca=str(pki.ca),
                   upstream_tls_sni="backend.internal",
                   upstream_tls_cert=str(pki.client_cert), upstream_tls_key=str(pki.client_key))
    with caplog.at_level(logging.WARNING, logger="midway"):
        (inbound,), (outbound,) = build_tls_layers(config)
    assert not caplog.records  # verification on: nothing to warn about
    assert isinstance(inbound, TlsTermination) and isinstance(outbound, TlsOrigination)
    assert inbound.context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert inbound.context.verify_mode is ssl.CERT_REQUIRED
    assert inbound.handshake_timeout_s == 3.0
    assert outbound.server_name == "backend.internal"
    assert outbound.context.verify_mode is ssl.CERT_REQUIRED and outbound.context.check_hostname


def test_turning_verification_off_is_a_warning_once_per_build(
        caplog: pytest.LogCaptureFixture) -> None:
    config = proxy(upstream_tls=True, upstream_tls_verify=False)
    with caplog.at_level(logging.WARNING, logger="midway"):
        _, (outbound,) = build_tls_layers(config)
        check_tls(config)  # --check: no warning of its own
    assert [r.getMessage() for r in caplog.records] == [
        "web: upstream_tls_verify is off: upstream certificates are not checked "
        "(anyone on the path can pose as the upstream)"]
    assert isinstance(outbound, TlsOrigination)
    assert outbound.context.verify_mode is ssl.CERT_NONE


def _error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason
    return exc


@pytest.mark.parametrize(("reason", "peer", "words"), [
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "client", "client sent no certificate"),
    ("NO_SHARED_CIPHER", "client", "no shared cipher"),
    ("UNSUPPORTED_PROTOCOL", "client", "no shared protocol version"),
    ("HTTP_REQUEST", "client", "client sent plain HTTP to a TLS port"),
    ("TLSV1_ALERT_UNKNOWN_CA", "client", "client does not trust midway's certificate (unknown CA)"),
    ("SOMETHING_NEW", "upstream", "something new"),
])
def test_handshake_failures_in_words(reason: str, peer: str, words: str) -> None:
    assert describe_tls_error(_error(reason), peer) == words
