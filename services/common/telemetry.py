"""OpenTelemetry tracing: a tracer provider per process, exporting only when an endpoint is set."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased


def create_tracer_provider(
    *, service: str, otlp_endpoint: str | None, record_spans: bool | None = None
) -> TracerProvider:
    """A provider that records and exports spans when an endpoint is configured.

    Without one, spans are not recorded (nothing would read them), which saves their cost on every
    call; they still carry trace and span ids, so logs and event envelopes keep the trace.
    `record_spans=True` records anyway, for a caller that adds its own span processor.
    """
    record = bool(otlp_endpoint) if record_spans is None else record_spans
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"parley-{service}"}),
        sampler=ParentBased(ALWAYS_ON) if record else ALWAYS_OFF,
    )
    if otlp_endpoint:
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    return provider


def records_spans(provider: TracerProvider) -> bool:
    """Whether `provider` records spans (see `create_tracer_provider`)."""
    return provider.sampler is not ALWAYS_OFF
