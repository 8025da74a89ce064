"""Host and port, one type and one spelling: `host:port`, IPv6 literals as `[v6]:port`."""

from __future__ import annotations

from dataclasses import dataclass


def host_port(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_url(host: str, port: int) -> str:
    """`http://host:port`, with IPv6 literals in brackets."""
    return f"http://{host_port(host, port)}"


@dataclass(frozen=True, slots=True)
class Address:
    """A host (DNS name or IP literal, without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


def split_host_port(value: str) -> tuple[str, str] | None:
    """`HOST:PORT` or `[v6]:PORT` -> (host without brackets, port text); None without a colon."""
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port
