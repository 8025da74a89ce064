"""What a VNC server needs for the security types the relay answers: a VncAuth password file
(TigerVNC's `vncpasswd -f`) and, for VeNCrypt X509, a CA and a server certificate for
SERVER_NAME and 127.0.0.1, made with openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

VNCPASSWD = shutil.which("vncpasswd") or "/usr/bin/vncpasswd"
SERVER_NAME = "vnc.test.invalid"


def write_vnc_password(path: Path, password: str) -> Path:
    """A VncAuth password file for Xvnc's -PasswordFile."""
    with path.open("wb") as out:
        subprocess.run([VNCPASSWD, "-f"], input=password.encode() + b"\n", stdout=out,
                       check=True)
    return path


def make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for SERVER_NAME and 127.0.0.1 in `folder`: ca.crt,
    server.crt, server.key (RSA, which every VeNCrypt server takes)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=vncgate test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={SERVER_NAME}",
        "-keyout", "server.key", "-out", "server.csr")
    (folder / "san.ext").write_text(f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt")
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"
