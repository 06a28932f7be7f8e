"""OpenTelemetry tracing: a tracer provider per process, exporting only when an endpoint is set."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def create_tracer_provider(*, service: str, otlp_endpoint: str | None) -> TracerProvider:
    """A provider that records spans (so logs carry trace ids) and exports them when configured."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"parley-{service}"}))
    if otlp_endpoint:
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    return provider
