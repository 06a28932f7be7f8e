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
from services.common.db import Database
from services.common.identity import IdentityResolver, NoTokenVerifier
from services.common.logs import JsonFormatter
from services.common.metrics import new_registry
from services.common.server import ServerDeps, ServiceRegistration, create_server
from services.common.settings import load_settings
from services.common.telemetry import create_tracer_provider
from services.runtime.process import service_registrations

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class _FailingBilling(billing_pb2_grpc.BillingServiceServicer):
    """Application code with a bug, so the error path logs inside the RPC's span."""

    async def GetPlan(
        self, request: billing_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetPlanResponse:
        raise RuntimeError("boom")


@pytest.fixture
async def traced(database: Database) -> AsyncIterator[tuple[InMemorySpanExporter, grpc.aio.Channel]]:
    spans = InMemorySpanExporter()
    provider = create_tracer_provider(service="test", otlp_endpoint=None)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server, port = create_server(
        load_settings(grpc_port=0, metrics_port=0),
        ServerDeps(
            services=[
                *service_registrations("billing", database)[1:],
                ServiceRegistration(
                    "parley.billing.v1.BillingService",
                    _FailingBilling(),  # type: ignore[abstract]
                    billing_pb2_grpc.add_BillingServiceServicer_to_server,
                ),
            ],
            identity=IdentityResolver(gateway_secret=None, token_verifier=NoTokenVerifier()),
            registry=new_registry(),
            tracer_provider=provider,
        ),
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield spans, channel
    await channel.close()
    await server.stop()
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
    assert "RuntimeError: boom" in crash["exception"]
