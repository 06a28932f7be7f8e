"""Traces and logs from the real interceptor chain: a span per RPC, context continued from the caller,
and JSON log lines that carry the trace and request ids."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.common.logs import JsonFormatter
from services.common.telemetry import create_tracer_provider
from tests.support.pki import ServicePki
from tests.support.servers import crashing_billing, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
async def traced(service_pki: ServicePki) -> AsyncIterator[tuple[InMemorySpanExporter, grpc.aio.Channel]]:
    spans = InMemorySpanExporter()
    provider = create_tracer_provider(service="test", otlp_endpoint=None, record_spans=True)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    async with serving([crashing_billing()], pki=service_pki, tracer_provider=provider) as running:
        yield spans, running.channel
    provider.shutdown()


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("billing"))
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


async def test_each_rpc_gets_a_server_span_that_continues_the_callers_trace(
    traced: tuple[InMemorySpanExporter, grpc.aio.Channel],
) -> None:
    spans, channel = traced
    stub = billing_pb2_grpc.BillingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetPlan(
            billing_pb2.GetPlanRequest(plan_id="pro"), metadata=(("traceparent", TRACEPARENT),)
        )
    (span,) = [s for s in spans.get_finished_spans() if s.name.endswith("BillingService/GetPlan")]
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.attributes is not None
    assert span.attributes["rpc.service"] == "parley.billing.v1.BillingService"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]


async def test_log_lines_inside_an_rpc_carry_trace_and_request_ids(
    traced: tuple[InMemorySpanExporter, grpc.aio.Channel], json_log: io.StringIO
) -> None:
    _, channel = traced
    stub = billing_pb2_grpc.BillingServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetPlan(
            billing_pb2.GetPlanRequest(plan_id="pro"),
            metadata=(("traceparent", TRACEPARENT), ("x-request-id", "req-obs-1")),
        )
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    (crash,) = [r for r in records if r["message"].startswith("unhandled error")]
    assert crash["trace_id"] == TRACE_ID
    assert len(crash["span_id"]) == 16
    assert crash["request_id"] == "req-obs-1"
    assert crash["rpc"] == "/parley.billing.v1.BillingService/GetPlan"
    assert crash["level"] == "error"
    assert crash["service"] == "billing"
    assert "RuntimeError: secret internals" in crash["exception"]
