"""Certificates for TLS tests, made at test time with ``openssl`` (Debian's
``openssl`` package): a CA, a server leaf for ``localhost`` and 127.0.0.1 and a
client leaf, both signed by it, and an unrelated self-signed certificate (the
"wrong CA").  EC P-256 keys: quick to make."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import helpers

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    server_chain: Path
    """The server leaf followed by the CA: a chain in one file, key included."""
    client_cert: Path
    client_key: Path
    other_cert: Path
    """Self-signed, for ``localhost``: signed by no CA midway or a client trusts."""
    other_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def leaf(where: Path, name: str, subject: str, ca: Path, ca_key: Path, san: str) -> None:
    """A leaf certificate ``where/NAME.pem`` (key ``NAME.key``) for ``subject`` and
    the subjectAltName ``san``, signed by ``ca`` (its key ``ca_key``)."""
    key, csr, cert = where / f"{name}.key", where / f"{name}.csr", where / f"{name}.pem"
    _openssl("req", "-new", *_EC, "-subj", subject, "-keyout", str(key), "-out", str(csr))
    ext = where / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert))


def make_pki(where: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip(helpers.needs("openssl", apt="openssl"))
    ca, ca_key = where / "ca.pem", where / "ca.key"
    _openssl("req", "-x509", *_EC, "-days", "1", "-subj", "/CN=midway test CA",
             "-keyout", str(ca_key), "-out", str(ca))
    leaf(where, "server", "/CN=localhost", ca, ca_key, "DNS:localhost,IP:127.0.0.1")
    leaf(where, "client", "/CN=test client", ca, ca_key, "DNS:client.test")
    other, other_key = where / "other.pem", where / "other.key"
    _openssl("req", "-x509", *_EC, "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(other_key), "-out", str(other))
    chain = where / "server-chain.pem"
    chain.write_bytes((where / "server.pem").read_bytes() + ca.read_bytes()
                      + (where / "server.key").read_bytes())
    return Pki(ca=ca, server_cert=where / "server.pem", server_key=where / "server.key",
               server_chain=chain, client_cert=where / "client.pem",
               client_key=where / "client.key", other_cert=other, other_key=other_key)
