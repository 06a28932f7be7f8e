"""What a reflection client sees: grpcurl `describe` on every symbol kind, and a raw reflection stream.

The same cases run against a service server and through the gateway, so both answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.support.gateway import grpcurl

REFLECTION_VERSIONS = ("v1", "v1alpha")
LIST_PLANS_METHOD = "parley.billing.v1.BillingService.ListPlans"


@dataclass(frozen=True)
class DescribeCase:
    """`grpcurl describe <symbol>` answers "<symbol> is <kind>:" and a schema holding each of `shows`."""

    symbol: str
    kind: str
    shows: tuple[str, ...]


# The symbol the issue was filed about: the stock Python reflection could not resolve methods.
DESCRIBE_LIST_PLANS = DescribeCase(
    LIST_PLANS_METHOD,
    "a method",
    # The comment comes from the contract's source info.
    (
        "// Lists the plans on sale; public and cacheable.",
        'option (.google.api.http) = { get:"/v1/billing/plans"',
    ),
)

DESCRIBE_CASES: tuple[DescribeCase, ...] = (
    DescribeCase(
        "parley.billing.v1.BillingService",
        "a service",
        ("rpc ListPlans ( .parley.billing.v1.ListPlansRequest ) returns (",),
    ),
    DESCRIBE_LIST_PLANS,
    DescribeCase(
        "parley.billing.v1.ListPlansRequest",
        "a message",
        ("message ListPlansRequest {", "int32 page_size = 1;"),
    ),
    DescribeCase(
        "google.protobuf.DescriptorProto.ExtensionRange",
        "a message",
        ("message ExtensionRange {", "int32 start = 1;"),
    ),
    DescribeCase("parley.billing.v1.ListPlansRequest.page_size", "a field", ("int32 page_size = 1;",)),
    DescribeCase("parley.common.v1.PlanTier", "an enum", ("enum PlanTier {", "PLAN_TIER_PRO = 2;")),
    DescribeCase("google.protobuf.FieldDescriptorProto.Type", "an enum", ("enum Type {", "TYPE_STRING = 9;")),
    # grpcurl names enum values under their enum (jhump/protoreflect's naming).
    DescribeCase("parley.common.v1.PlanTier.PLAN_TIER_PRO", "an enum value", ("PLAN_TIER_PRO = 2;",)),
    DescribeCase(
        "google.protobuf.FieldDescriptorProto.Type.TYPE_STRING", "an enum value", ("TYPE_STRING = 9;",)
    ),
    DescribeCase(
        "google.api.http",
        "an extension",
        ("extend .google.protobuf.MethodOptions {", ".google.api.HttpRule http = 72295728;"),
    ),
)


async def assert_grpcurl_describes(
    target: str, case: DescribeCase, *, transport: Sequence[str] = ("-plaintext",)
) -> None:
    """`transport`: grpcurl's flags for the target: plaintext for the gateway, the operator's
    certificate (tests.support.pki.grpcurl_tls) for a service port."""
    result = await grpcurl(*transport, target, "describe", case.symbol)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{case.symbol} is {case.kind}:\n"), result.stdout
    for line in case.shows:
        assert line in result.stdout, result.stdout


async def reflect(
    channel: grpc.aio.Channel, version: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Send `requests` on one `grpc.reflection.<version>.ServerReflection` stream; return the answers.

    v1 and v1alpha messages are the same on the wire, so v1alpha's classes encode both.
    """
    stream = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [response async for response in stream(iter(requests))]


def listed_services(response: reflection_pb2.ServerReflectionResponse) -> list[str]:
    return [service.name for service in response.list_services_response.service]


def files_of(response: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(serialized)
        for serialized in response.file_descriptor_response.file_descriptor_proto
    ]


def symbol_request(symbol: str) -> reflection_pb2.ServerReflectionRequest:
    return reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)


def service_names_in(files: Sequence[descriptor_pb2.FileDescriptorProto]) -> set[str]:
    return {f"{file.package}.{service.name}" for file in files for service in file.service}
