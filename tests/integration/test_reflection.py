"""Server reflection on a service server: the production factory on port 0, the real interceptor chain,
billing on a migrated SQLite database, asked by the real grpcurl binary and by raw reflection streams
of both protocol versions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_reflection.v1alpha import reflection_pb2

from parley.billing.v1 import billing_pb2
from services.common.db import Database
from services.common.migrate import upgrade_async
from tests.support.gateway import grpcurl
from tests.support.pki import ServicePki, grpcurl_tls
from tests.support.reflection import (
    DESCRIBE_CASES,
    LIST_PLANS_METHOD,
    REFLECTION_VERSIONS,
    DescribeCase,
    assert_grpcurl_describes,
    files_of,
    listed_services,
    reflect,
    symbol_request,
)
from tests.support.servers import RunningServer, hosted, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

BILLING_SERVICES = [
    "parley.billing.v1.BillingAdminService",
    "parley.billing.v1.BillingInternalService",
    "parley.billing.v1.BillingService",
]
BILLING_FILE = "parley/billing/v1/billing.proto"
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def billing(
    tmp_path_factory: pytest.TempPathFactory, service_pki: ServicePki
) -> AsyncIterator[RunningServer]:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('reflection') / 'parley.db'}"
    await upgrade_async(url)
    database = Database(url, connect_timeout_s=3.0)
    try:
        async with serving(hosted(("billing",), database), pki=service_pki) as running:
            yield running
    finally:
        await database.dispose()


def target(running: RunningServer) -> str:
    return f"127.0.0.1:{running.port}"


def operator(running: RunningServer) -> list[str]:
    """grpcurl's flags for the service port, as an operator runs it (docs/service-identity.md)."""
    return grpcurl_tls(running.pki.files("operator"), server="billing")


async def test_grpcurl_lists_every_service_with_health_and_both_reflection_versions(
    billing: RunningServer,
) -> None:
    result = await grpcurl(*operator(billing), target(billing), "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == sorted(
        [
            *BILLING_SERVICES,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    )


async def test_grpcurl_lists_the_methods_of_a_service(billing: RunningServer) -> None:
    result = await grpcurl(*operator(billing), target(billing), "list", "parley.billing.v1.BillingService")

    assert result.returncode == 0, result.stderr
    service = billing_pb2.DESCRIPTOR.services_by_name["BillingService"]
    assert result.stdout.split() == sorted(method.full_name for method in service.methods)


@pytest.mark.parametrize("case", DESCRIBE_CASES, ids=lambda case: case.symbol)
async def test_grpcurl_describes_every_kind_of_symbol(billing: RunningServer, case: DescribeCase) -> None:
    await assert_grpcurl_describes(target(billing), case, transport=operator(billing))


async def test_grpcurl_describes_internal_services_on_the_service_port(billing: RunningServer) -> None:
    result = await grpcurl(
        *operator(billing),
        target(billing),
        "describe",
        "parley.billing.v1.BillingInternalService.ReserveCredits",
    )

    assert result.returncode == 0, result.stderr
    assert "is a method:" in result.stdout


async def test_grpcurl_prints_a_request_template(billing: RunningServer) -> None:
    result = await grpcurl(
        *operator(billing), "-msg-template", target(billing), "describe", "parley.billing.v1.ListPlansRequest"
    )

    assert result.returncode == 0, result.stderr
    template = json.loads(result.stdout.split("Message template:\n", 1)[1])
    assert template == {"pageSize": 0, "pageToken": "", "showRetired": False}


async def test_grpcurl_invokes_a_method_it_learnt_by_reflection(billing: RunningServer) -> None:
    result = await grpcurl(
        *operator(billing),
        "-d",
        '{"page_size": 2}',
        target(billing),
        "parley.billing.v1.BillingService/ListPlans",
    )

    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert [plan["id"] for plan in reply["plans"]] == ["free", "pro"]
    assert reply["nextPageToken"]


async def test_grpcurl_reports_an_unknown_symbol(billing: RunningServer) -> None:
    result = await grpcurl(*operator(billing), target(billing), "describe", "parley.billing.v1.NoSuchThing")

    assert result.returncode != 0
    assert "Symbol not found: parley.billing.v1.NoSuchThing" in result.stderr


@pytest.mark.parametrize("version", REFLECTION_VERSIONS)
async def test_each_version_lists_the_services(billing: RunningServer, version: str) -> None:
    [response] = await reflect(
        billing.channel, version, reflection_pb2.ServerReflectionRequest(list_services="")
    )

    assert set(BILLING_SERVICES) <= set(listed_services(response))
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        listed_services(response)
    )


@pytest.mark.parametrize("version", REFLECTION_VERSIONS)
async def test_each_version_resolves_a_method_and_sends_imports_once_per_stream(
    billing: RunningServer, version: str
) -> None:
    first, second = await reflect(
        billing.channel,
        version,
        symbol_request(LIST_PLANS_METHOD),
        symbol_request("parley.billing.v1.ListPlansResponse"),
    )

    first_files = files_of(first)
    assert first.original_request == symbol_request(LIST_PLANS_METHOD)
    assert first_files[0].name == BILLING_FILE
    names = [file.name for file in first_files]
    assert len(names) == len(set(names))
    # Every import, transitively, so that the client can build the file.
    assert {dependency for file in first_files for dependency in file.dependency} <= set(names)
    assert {"parley/common/v1/common.proto", "google/api/annotations.proto", "google/api/http.proto"} <= set(
        names
    )
    assert [file.name for file in files_of(second)] == [BILLING_FILE]


@pytest.mark.parametrize("version", REFLECTION_VERSIONS)
async def test_each_version_resolves_extensions(billing: RunningServer, version: str) -> None:
    by_number, numbers = await reflect(
        billing.channel,
        version,
        reflection_pb2.ServerReflectionRequest(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="google.protobuf.MethodOptions", extension_number=72295728
            )
        ),
        reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="google.protobuf.MethodOptions"),
    )

    assert files_of(by_number)[0].name == "google/api/annotations.proto"
    assert numbers.all_extension_numbers_response.base_type_name == "google.protobuf.MethodOptions"
    assert 72295728 in numbers.all_extension_numbers_response.extension_number


@pytest.mark.parametrize("version", REFLECTION_VERSIONS)
async def test_each_version_answers_errors_in_the_stream_and_carries_on(
    billing: RunningServer, version: str
) -> None:
    requests = [
        symbol_request("parley.billing.v1.NoSuchThing"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="parley/nope.proto"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="google.protobuf.MethodOptions", extension_number=1
            )
        ),
        reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="parley.billing.v1.Nope"),
        reflection_pb2.ServerReflectionRequest(host="only-a-host"),
        reflection_pb2.ServerReflectionRequest(file_by_filename=BILLING_FILE),
    ]

    responses = await reflect(billing.channel, version, *requests)

    codes = [response.error_response.error_code for response in responses]
    assert codes == [NOT_FOUND, NOT_FOUND, NOT_FOUND, NOT_FOUND, INVALID_ARGUMENT, 0]
    assert responses[0].error_response.error_message == "Symbol not found: parley.billing.v1.NoSuchThing"
    assert [response.original_request for response in responses] == requests
    assert files_of(responses[-1])[0].name == BILLING_FILE


async def test_enum_values_resolve_as_protobuf_scopes_them_too(billing: RunningServer) -> None:
    sibling, nested = await reflect(
        billing.channel,
        "v1",
        symbol_request("parley.common.v1.PLAN_TIER_PRO"),
        symbol_request("google.protobuf.FieldDescriptorProto.TYPE_STRING"),
    )

    assert files_of(sibling)[0].name == "parley/common/v1/common.proto"
    assert files_of(nested)[0].name == "google/protobuf/descriptor.proto"
