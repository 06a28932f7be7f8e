"""Request bodies that are not the method's protobuf message, and requests that leave out REQUIRED
fields, through the production server factory and the real call pipeline: a typed INVALID_ARGUMENT,
never grpc's UNKNOWN, and never a traceback or an ERROR line in the log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from services.common.server import contract_only_services
from tests.support.pki import ServicePki
from tests.support.polling import eventually
from tests.support.servers import RunningServer, rich_status, serving

LOGIN = "/parley.auth.v1.AuthService/Login"
STREAM_MESSAGE = "/parley.chat.v1.ChatService/StreamMessage"
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

# Protobuf encodings that do not parse: field 1 (a string) claiming 0x7f bytes of which none follow,
# a length that stops mid-way, a varint that never ends, and wire types 6 and 7, which do not exist.
MALFORMED = {
    "truncated length": b"\n\xff",
    "truncated body": b"\n\x05ab",
    "endless varint": b"\x08" + b"\xff" * 11,
    "wire type 6": b"\x0e\x00",
    "wire type 7": b"\x0f\x00",
    "bad utf-8 in a string": b"\n\x02\xff\xfe",
}


@pytest.fixture
async def running(service_pki: ServicePki) -> AsyncIterator[RunningServer]:
    registrations = [
        *contract_only_services(auth_pb2, auth_pb2_grpc),
        *contract_only_services(chat_pb2, chat_pb2_grpc),
    ]
    async with serving(registrations, pki=service_pki) as running:
        yield running


def reason_of(error: grpc.aio.AioRpcError) -> str:
    info = rich_status(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    reason: str = info.reason
    return reason


def violations_of(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    bad_request = rich_status(error)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    return [(violation.field, violation.reason) for violation in bad_request.field_violations]


async def unary_refusal(running: RunningServer, method: str, body: bytes) -> grpc.aio.AioRpcError:
    call = running.channel.unary_unary(method)  # no serializers: the bytes go as they are
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(body)
    return refused.value


async def streaming_refusal(running: RunningServer, method: str, body: bytes) -> grpc.aio.AioRpcError:
    call = running.channel.unary_stream(method)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call(body):
            pass
    return refused.value


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing above INFO and no traceback: a client's bad bytes are the client's problem."""
    loud = [record for record in caplog.records if record.levelno > logging.INFO or record.exc_info]
    assert loud == [], [record.getMessage() for record in loud]


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_unary_body_is_invalid_argument_and_quiet(
    running: RunningServer, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    refused = await unary_refusal(running, LOGIN, MALFORMED[case])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        refused.details() == "The request body is not a valid parley.auth.v1.LoginRequest protobuf message."
    )
    assert reason_of(refused) == "MALFORMED_REQUEST"
    assert "DecodeError" not in (refused.details() or "")
    assert_quiet(caplog)


async def test_a_malformed_server_streaming_body_is_invalid_argument_and_quiet(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    refused = await streaming_refusal(running, STREAM_MESSAGE, MALFORMED["truncated length"])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(refused) == "MALFORMED_REQUEST"
    assert "StreamMessageRequest" in (refused.details() or "")
    assert_quiet(caplog)


async def test_a_malformed_message_in_a_request_stream_is_invalid_argument_and_quiet(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    call = running.channel.stream_stream(REFLECTION)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call(iter([MALFORMED["wire type 7"]])):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(refused.value) == "MALFORMED_REQUEST"
    assert_quiet(caplog)


async def test_a_known_field_sent_with_another_valid_wire_type_parses_as_unknown_and_is_then_validated(
    running: RunningServer,
) -> None:
    # Field 1 (email, a string) as a fixed32: protobuf keeps it as an unknown field, so the request
    # parses, and it is the missing email and password that refuse it.
    refused = await unary_refusal(running, LOGIN, b"\x0d\x00\x00\x00\x00")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(refused) == [("email", "REQUIRED_FIELD"), ("password", "REQUIRED_FIELD")]


async def test_a_well_formed_body_still_reaches_the_servicer(running: RunningServer) -> None:
    body = auth_pb2.LoginRequest(email="ada@example.com", password="pw").SerializeToString()
    refused = await unary_refusal(running, LOGIN, body)
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED  # the contract-only servicer answered


async def test_required_fields_are_enforced_on_unary_and_streaming_rpcs(running: RunningServer) -> None:
    auth: auth_pb2_grpc.AuthServiceAsyncStub = auth_pb2_grpc.AuthServiceStub(running.channel)  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as forgot:
        await auth.ForgotPassword(auth_pb2.ForgotPasswordRequest())
    assert forgot.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(forgot.value) == "INVALID_ARGUMENT"
    assert violations_of(forgot.value) == [("email", "REQUIRED_FIELD")]

    chat: chat_pb2_grpc.ChatServiceAsyncStub = chat_pb2_grpc.ChatServiceStub(running.channel)  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for _ in chat.StreamMessage(chat_pb2.StreamMessageRequest(conversation_id="c1")):
            pass
    assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(stream.value) == [("content", "REQUIRED_FIELD")]


async def test_malformed_bodies_are_counted_as_invalid_argument(running: RunningServer) -> None:
    await unary_refusal(running, LOGIN, MALFORMED["wire type 6"])
    labels = {"grpc_service": "parley.auth.v1.AuthService", "grpc_method": "Login"}
    sample = running.registry.get_sample_value
    # The client may see the reply before the server's pipeline has finished counting it.
    await eventually(
        lambda: sample("parley_rpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"}) == 1,
        what="the refusal counted",
        timeout_s=5.0,
        interval_s=0.01,
    )
    assert sample("parley_rpc_server_in_flight", labels) == 0
