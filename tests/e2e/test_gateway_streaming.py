"""Server-streaming RPCs through the real gateway: SSE for JSON clients, a gRPC stream for gRPC clients.

Real Envoy and the real edge server in front of a test upstream: a ChatService servicer defined here
that streams scripted replies, so the gateway's streaming path is proven before the chat service
itself can generate anything. Clients are httpx (HTTP/1.1), the generated gRPC stub and grpcurl.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import any_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from tests.support.gateway import (
    TEST_API_KEY,
    TEST_API_KEY_HEADERS,
    HealthUpstream,
    RunningGateway,
    embedded_test_topology,
    grpcurl,
    public_service_names,
    running_gateway,
    start_health_upstream,
    wait_for_healthz,
)
from tests.support.pki import ServicePki

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

STREAM_MESSAGE = "parley.chat.v1.ChatService/StreamMessage"
# A generous bound on waiting for one event, so a gateway that buffers fails the test instead of hanging it.
EVENT_TIMEOUT_S = 10.0

# The conversation id chooses how the scripted upstream behaves.
COMPLETES = "c1"
INTERRUPTED = "c-interrupted"  # start, one delta, then an `error` event and a clean end of the RPC
ABORTED_AFTER_START = "c-aborted"  # start and deltas, then a non-OK gRPC status instead of an event
REFUSED = "c-refused"  # a non-OK gRPC status before any event (e.g. no credit)

# StreamMessage needs a caller: the stand-in auth of start_health_upstream knows this key.
API_KEY_METADATA = (("x-api-key", TEST_API_KEY),)

# The second delta holds blank lines: JSON escapes them, so they cannot end an SSE event early.
DELTAS = ("Hel", "lo,\n\nworld", "!")


def error_info_any(reason: str, metadata: dict[str, str]) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="parley.dev", metadata=metadata))
    return detail


def scripted_reply(conversation_id: str, content: str) -> list[chat_pb2.StreamMessageResponse]:
    """The events the test upstream streams for a conversation (REFUSED streams none)."""
    start = chat_pb2.StreamMessageResponse(
        start=chat_pb2.StreamStart(
            user_message=chat_pb2.Message(
                id="m-user",
                conversation_id=conversation_id,
                role=chat_pb2.MESSAGE_ROLE_USER,
                content=content,
            ),
            assistant_message_id="m-assistant",
            model="local-echo",
        )
    )
    deltas = [
        chat_pb2.StreamMessageResponse(delta=chat_pb2.StreamDelta(text=text, index=index))
        for index, text in enumerate(DELTAS)
    ]
    if conversation_id == REFUSED:
        return []
    if conversation_id == INTERRUPTED:
        interrupted = status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message="The model provider stopped responding.",
            details=[error_info_any("GENERATION_INTERRUPTED", {"provider": "local"})],
        )
        return [start, deltas[0], chat_pb2.StreamMessageResponse(error=interrupted)]
    if conversation_id == ABORTED_AFTER_START:
        return [start, *deltas]
    final = chat_pb2.StreamMessageResponse(
        final=chat_pb2.StreamFinal(
            message_id="m-assistant",
            usage=chat_pb2.Usage(input_tokens=12, output_tokens=3),
            finish_reason=chat_pb2.FINISH_REASON_STOP,
        )
    )
    return [start, *deltas, final]


class ScriptedChat(chat_pb2_grpc.ChatServiceServicer):
    """Streams `scripted_reply`; a test can hold a reply after its start event until it says so.

    Holding the upstream is how the tests prove events arrive one by one: the client reads the start
    event while the rest of the reply does not exist yet, so nothing on the way can have buffered it.
    """

    def __init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        # request_id -> the kinds of events yielded so far, in order.
        self.produced: defaultdict[str, list[str]] = defaultdict(list)

    def hold_after_start(self, request_id: str) -> asyncio.Event:
        """The reply to `request_id` waits after its start event until the returned event is set."""
        gate = asyncio.Event()
        self._gates[request_id] = gate
        return gate

    async def StreamMessage(
        self, request: chat_pb2.StreamMessageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.StreamMessageResponse]:
        if request.conversation_id == REFUSED:
            refused = status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED,
                message="Not enough credit to generate a reply.",
                details=[error_info_any("INSUFFICIENT_CREDITS", {"balance": "0"})],
            )
            await context.abort_with_status(rpc_status.to_status(refused))
        for position, event in enumerate(scripted_reply(request.conversation_id, request.content)):
            if position == 1 and request.request_id in self._gates:
                await self._gates[request.request_id].wait()
            self.produced[request.request_id].append(str(event.WhichOneof("event")))
            yield event
        if request.conversation_id == ABORTED_AFTER_START:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "The model provider went away.")


@pytest.fixture(scope="module")
def chat() -> ScriptedChat:
    return ScriptedChat()  # type: ignore[abstract]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def upstream(chat: ScriptedChat, service_pki: ServicePki) -> AsyncIterator[HealthUpstream]:
    # Every area's cluster points at this one port, so it reports SERVING for every public service.
    server = await start_health_upstream(
        public_service_names(),
        pki=service_pki,
        servicers=[functools.partial(chat_pb2_grpc.add_ChatServiceServicer_to_server, chat)],
    )
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(upstream: HealthUpstream, service_pki: ServicePki) -> AsyncIterator[RunningGateway]:
    topology = embedded_test_topology(upstream.port, pki=service_pki)
    async with running_gateway(topology, pki=service_pki) as running:
        await wait_for_healthz(running.http_url, 200)
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def client(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=gateway.http_url, timeout=EVENT_TIMEOUT_S, headers=TEST_API_KEY_HEADERS
    ) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="module")
async def chat_stub(gateway: RunningGateway) -> AsyncIterator[chat_pb2_grpc.ChatServiceAsyncStub]:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[misc]


def new_request_id() -> str:
    return str(uuid.uuid4())


def stream_path(conversation_id: str) -> str:
    return f"/v1/conversations/{conversation_id}/messages:stream"


def assert_http1_response_headers(response: httpx.Response, content_type: str) -> None:
    assert response.http_version == "HTTP/1.1"
    assert response.headers["content-type"] == content_type
    # gRPC transport headers are for gRPC clients only.
    assert [name for name in response.headers if name.startswith("grpc-")] == []


async def sse_events(response: httpx.Response) -> AsyncIterator[Any]:
    """The events of an SSE body as they arrive, insisting each is exactly `data: {json}\\n\\n`."""
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        while b"\n\n" in pending:
            frame, pending = pending.split(b"\n\n", 1)
            assert frame.startswith(b"data: {"), frame
            assert b"\n" not in frame, frame
            yield json.loads(frame.removeprefix(b"data: "))
    assert pending == b"", f"bytes after the last complete event: {pending!r}"


async def next_event(events: AsyncIterator[Any]) -> Any:
    return await asyncio.wait_for(anext(events), EVENT_TIMEOUT_S)


async def remaining_events(events: AsyncIterator[Any]) -> list[Any]:
    async def collect() -> list[Any]:
        return [event async for event in events]

    return await asyncio.wait_for(collect(), EVENT_TIMEOUT_S)


def start_json(conversation_id: str) -> dict[str, Any]:
    """The start event as JSON clients see it: proto field names, enums by name, defaults printed."""
    return {
        "start": {
            "user_message": {
                "id": "m-user",
                "conversation_id": conversation_id,
                "parent_id": "",
                "role": "MESSAGE_ROLE_USER",
                "content": "hi",
                "model": "",
                "provider": "",
                "finish_reason": "FINISH_REASON_UNSPECIFIED",
            },
            "assistant_message_id": "m-assistant",
            "model": "local-echo",
        }
    }


async def test_json_clients_get_the_reply_as_server_sent_events_one_by_one(
    client: httpx.AsyncClient, chat: ScriptedChat
) -> None:
    request_id = new_request_id()
    release = chat.hold_after_start(request_id)

    async with client.stream(
        "POST", stream_path(COMPLETES), json={"content": "hi", "request_id": request_id}
    ) as response:
        assert response.status_code == 200
        assert_http1_response_headers(response, "text/event-stream")
        # v1 is deprecated: a stream announces it in its headers like any other response.
        assert response.headers["parley-api-version"] == "v1"
        assert response.headers["deprecation"].startswith("@")
        assert response.headers["sunset"].endswith(" GMT")
        events = sse_events(response)
        first = await next_event(events)
        # The upstream is still holding everything after the start event, so the client reading it
        # proves the gateway forwards each event as it comes instead of buffering the reply.
        assert chat.produced[request_id] == ["start"]
        release.set()
        rest = await remaining_events(events)

    assert [first, *rest] == [
        start_json(COMPLETES),
        {"delta": {"text": "Hel", "index": 0}},
        {"delta": {"text": "lo,\n\nworld", "index": 1}},
        {"delta": {"text": "!", "index": 2}},
        {
            "final": {
                "message_id": "m-assistant",
                "usage": {"input_tokens": "12", "output_tokens": "3"},
                "finish_reason": "FINISH_REASON_STOP",
            }
        },
    ]
    assert chat.produced[request_id] == ["start", "delta", "delta", "delta", "final"]


async def test_a_stream_without_a_credential_is_refused_before_it_starts(
    gateway: RunningGateway, chat: ScriptedChat, chat_stub: chat_pb2_grpc.ChatServiceAsyncStub
) -> None:
    json_request_id, grpc_request_id = new_request_id(), new_request_id()
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=EVENT_TIMEOUT_S) as anonymous:
        response = await anonymous.post(
            stream_path(COMPLETES), json={"content": "hi", "request_id": json_request_id}
        )

    assert response.status_code == 401, response.text
    assert_http1_response_headers(response, "application/json")
    assert response.json()["details"][0]["reason"] == "UNAUTHENTICATED"

    call = chat_stub.StreamMessage(
        chat_pb2.StreamMessageRequest(conversation_id=COMPLETES, content="hi", request_id=grpc_request_id)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The upstream never started either reply.
    assert chat.produced[json_request_id] == []
    assert chat.produced[grpc_request_id] == []


async def test_an_error_after_the_start_is_an_error_event_in_the_stream(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", stream_path(INTERRUPTED), json={"content": "hi"}) as response:
        assert response.status_code == 200
        assert_http1_response_headers(response, "text/event-stream")
        events = await remaining_events(sse_events(response))

    assert events == [
        start_json(INTERRUPTED),
        {"delta": {"text": "Hel", "index": 0}},
        {
            "error": {
                "code": code_pb2.UNAVAILABLE,
                "message": "The model provider stopped responding.",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "GENERATION_INTERRUPTED",
                        "domain": "parley.dev",
                        "metadata": {"provider": "local"},
                    }
                ],
            }
        },
    ]


async def test_an_error_before_the_first_event_is_an_ordinary_json_error(client: httpx.AsyncClient) -> None:
    response = await client.post(stream_path(REFUSED), json={"content": "hi"})

    assert response.status_code == 429
    assert_http1_response_headers(response, "application/json")
    assert response.json() == {
        "code": code_pb2.RESOURCE_EXHAUSTED,
        "message": "Not enough credit to generate a reply.",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "INSUFFICIENT_CREDITS",
                "domain": "parley.dev",
                "metadata": {"balance": "0"},
            }
        ],
    }


async def test_a_grpc_status_after_the_start_reaches_grpc_clients_but_not_sse_clients(
    client: httpx.AsyncClient, chat_stub: chat_pb2_grpc.ChatServiceAsyncStub
) -> None:
    """Why services must end a failed stream with an `error` event rather than a gRPC status."""
    async with client.stream("POST", stream_path(ABORTED_AFTER_START), json={"content": "hi"}) as response:
        assert response.status_code == 200
        assert_http1_response_headers(response, "text/event-stream")
        events = await remaining_events(sse_events(response))
    # The trailer carrying the status has no place in HTTP/1: the SSE stream just ends, with neither
    # a final nor an error event, which is all a JSON client can tell.
    assert [next(iter(event)) for event in events] == ["start", "delta", "delta", "delta"]

    call = chat_stub.StreamMessage(
        chat_pb2.StreamMessageRequest(conversation_id=ABORTED_AFTER_START), metadata=API_KEY_METADATA
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for message in call:
            received.append(message)
    assert received == scripted_reply(ABORTED_AFTER_START, "")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == "The model provider went away."


@pytest.mark.parametrize("conversation_id", [COMPLETES, INTERRUPTED])
async def test_grpc_clients_get_the_same_messages_as_a_grpc_stream(
    chat_stub: chat_pb2_grpc.ChatServiceAsyncStub, chat: ScriptedChat, conversation_id: str
) -> None:
    request_id = new_request_id()
    release = chat.hold_after_start(request_id)

    call = chat_stub.StreamMessage(
        chat_pb2.StreamMessageRequest(conversation_id=conversation_id, content="hi", request_id=request_id),
        metadata=API_KEY_METADATA,
    )
    messages = aiter(call)
    first = await next_event(messages)
    assert chat.produced[request_id] == ["start"]
    release.set()
    rest = await remaining_events(messages)

    assert [first, *rest] == scripted_reply(conversation_id, "hi")
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("conversation_id", [COMPLETES, INTERRUPTED])
async def test_grpcurl_streams_the_messages_through_the_gateway(
    gateway: RunningGateway, conversation_id: str
) -> None:
    request = json.dumps({"conversation_id": conversation_id, "content": "hi"})

    result = await grpcurl(
        "-plaintext", "-H", f"x-api-key: {TEST_API_KEY}", "-d", request, gateway.grpc_target, STREAM_MESSAGE
    )

    assert result.returncode == 0, result.stderr
    assert parse_grpcurl_messages(result.stdout) == scripted_reply(conversation_id, "hi")


def parse_grpcurl_messages(stdout: str) -> list[chat_pb2.StreamMessageResponse]:
    """grpcurl prints one pretty-printed JSON object per streamed message, back to back."""
    decoder = json.JSONDecoder()
    messages = []
    position = 0
    while stdout[position:].strip():
        position += len(stdout[position:]) - len(stdout[position:].lstrip())
        document, position = decoder.raw_decode(stdout, position)
        messages.append(json_format.ParseDict(document, chat_pb2.StreamMessageResponse()))
    return messages
