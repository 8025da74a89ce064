"""Certificates made by the test with openssl: a CA of its own and server certificates it signs."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str | Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True,
                          input=stdin, timeout=30).stdout


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path

    def spki_sha256(self) -> str:
        """base64(sha256(SubjectPublicKeyInfo)), as chromium's
        --ignore-certificate-errors-spki-list takes it."""
        public = _openssl("x509", "-in", self.cert, "-noout", "-pubkey")
        der = _openssl("pkey", "-pubin", "-outform", "DER", stdin=public)
        return base64.b64encode(hashlib.sha256(der).digest()).decode()


def make_ca(directory: Path) -> Pem:
    directory.mkdir(parents=True, exist_ok=True)
    ca = Pem(directory / "ca.pem", directory / "ca.key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", ca.key, "-out", ca.cert, "-days", "2",
             "-subj", "/CN=vncgate test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def make_server_cert(ca: Pem, directory: Path, common_name: str) -> Pem:
    """A certificate for 127.0.0.1 and localhost, signed by `ca`, with a key of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    pem = Pem(directory / "tls.crt", directory / "tls.key")
    csr, extensions = directory / "tls.csr", directory / "ext.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                          "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", pem.key, "-out", csr, "-subj", f"/CN={common_name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
             "-out", pem.cert, "-days", "2", "-extfile", extensions)
    return pem
