"""Prometheus metrics of one relay: one CollectorRegistry per app, so tests can run several."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class RelayMetrics:
    registry: CollectorRegistry
    sessions_active: Gauge
    sessions_total: Counter
    bytes_relayed: Counter
    connect_seconds: Histogram
    routes: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> RelayMetrics:
        """The relay's metrics in `registry` (default: a new one of their own)."""
        registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        return cls(
            registry=registry,
            sessions_active=Gauge(
                "vncgate_sessions_active", "Open viewer sessions, by target.",
                ["namespace", "name"], registry=registry),
            sessions_total=Counter(
                "vncgate_sessions", "Finished sessions, by target and WebSocket close code.",
                ["namespace", "name", "code"], registry=registry),
            bytes_relayed=Counter(
                "vncgate_relayed_bytes", "Bytes relayed; direction is to_server or to_client.",
                ["direction"], registry=registry),
            connect_seconds=Histogram(
                "vncgate_connect_seconds",
                "Time to connect to a VNC server and read its RFB greeting.",
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                registry=registry),
            routes=Gauge("vncgate_routes", "Routes in this relay's table.", registry=registry),
        )
