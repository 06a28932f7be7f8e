"""Prometheus metrics: one registry per process, owned by the composition root."""

from __future__ import annotations

from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from services.common.listeners import PortInUseError, is_address_in_use

# Latency buckets from 1 ms to 10 s: RPCs here range from cache hits to provider calls.
RPC_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RpcMetrics:
    """RED metrics per RPC: rate and errors by code, and a latency histogram."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "parley_rpc_server_handled_total",
            "RPCs completed by the server, by method and gRPC status code.",
            ("grpc_service", "grpc_method", "grpc_code"),
            registry=registry,
        )
        self.latency = Histogram(
            "parley_rpc_server_handling_seconds",
            "Time from receiving an RPC to its final status.",
            ("grpc_service", "grpc_method"),
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "parley_rpc_server_in_flight",
            "RPCs currently being handled.",
            ("grpc_service", "grpc_method"),
            registry=registry,
        )


class HealthMetrics:
    """Whether each dependency answered its last probe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dependency_up = Gauge(
            "parley_dependency_up",
            "1 when the dependency answered its last health probe, else 0.",
            ("dependency",),
            registry=registry,
        )


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors, and nothing shared between servers."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server."""

    server: WSGIServer
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, *, setting: str = "metrics_port"
) -> MetricsEndpoint:
    """Serve `registry` on http://host:port/metrics in a background thread; port 0 picks a free one.

    `setting` names the port's setting, for the error when the port is taken (`PortInUseError`)."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        if is_address_in_use(error):
            raise PortInUseError(setting, host, port) from None
        raise
    return MetricsEndpoint(server=server, port=int(server.server_port))
