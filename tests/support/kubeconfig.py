"""A kubeconfig for the relay in front of kmock's emulated API server (no TLS, a fixed token)."""

from __future__ import annotations

from pathlib import Path


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{server}"}}}}]
users: [{{name: relay, user: {{token: relay-service-account-token}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: relay}}}}]
current-context: kmock
""")
    return path
