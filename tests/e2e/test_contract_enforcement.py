"""The contract as the services enforce it, attacked through the real gateway of `parley up`
(issue 11, finding 4): protobuf bodies that do not parse, and requests without their REQUIRED fields,
over gRPC (the real curl binary, and generated stubs) and over JSON."""

from __future__ import annotations

import base64
import secrets
import string
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.chat.v2 import chat_pb2 as chat_v2_pb2
from parley.chat.v2 import chat_pb2_grpc as chat_v2_pb2_grpc
from services.common.errors import details_of
from tests.support.parley_process import EmbeddedPorts, ParleyProcess, parley_up_serving

pytestmark = pytest.mark.envoy

CURL = "curl"
PASSWORD = "violet-harbour-lantern-42"
LOGIN = "/parley.auth.v1.AuthService/Login"
STREAM_MESSAGE = "/parley.chat.v2.ChatService/StreamMessage"


@dataclass(frozen=True)
class Deployment:
    process: ParleyProcess
    ports: EmbeddedPorts

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def grpc_target(self) -> str:
        """The gateway, for gRPC clients (plaintext, HTTP/2 prior knowledge)."""
        return f"127.0.0.1:{self.ports.http}"


@pytest.fixture(scope="module")
def parley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    data_dir = tmp_path_factory.mktemp("parley-contract")
    with parley_up_serving(data_dir, log_path=data_dir / "parley.log") as (process, ports):
        yield Deployment(process, ports)


@pytest.fixture(scope="module")
def http(parley: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=parley.url, timeout=15.0) as client:
        yield client


@pytest.fixture(scope="module")
def channel(parley: Deployment) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(parley.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def access_token(http: httpx.Client) -> str:
    email = "".join(secrets.choice(string.ascii_lowercase) for _ in range(12)) + "@example.com"
    registered = http.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Eve"}
    )
    assert registered.status_code == 200, registered.text
    signed_in = http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert signed_in.status_code == 200, signed_in.text
    token: str = signed_in.json()["tokens"]["access_token"]
    return token


# --- malformed protobuf bodies ----------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcAnswer:
    headers: dict[str, str]
    status: status_pb2.Status

    @property
    def reason(self) -> str:
        info = details_of(self.status)["ErrorInfo"]
        assert isinstance(info, error_details_pb2.ErrorInfo)
        reason: str = info.reason
        return reason


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def curl_grpc(deployment: Deployment, method: str, body: bytes, *headers: str) -> GrpcAnswer:
    """POST a raw gRPC body with the real curl binary, as the finding did; the status comes back in
    the headers of a trailers-only response (or in the trailers, which curl prints with them)."""
    command = [CURL, "-sS", "-i", "--http2-prior-knowledge", "-X", "POST", f"{deployment.url}{method}"]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-"]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run(command, input=body, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    fields: dict[str, str] = {}
    for line in done.stdout.decode(errors="replace").splitlines():
        name, colon, value = line.partition(":")
        if colon and not name.startswith("HTTP/"):
            fields[name.strip().lower()] = value.strip()
    assert "grpc-status" in fields, done.stdout
    details = fields["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
    return GrpcAnswer(fields, status)


def log_lines_about(deployment: Deployment, request_id: str) -> list[str]:
    return [line for line in deployment.process.output().splitlines() if request_id in line]


def assert_refused_as_malformed(deployment: Deployment, answer: GrpcAnswer, message_type: str) -> None:
    assert answer.headers["grpc-status"] == "3"
    assert answer.status.code == 3
    assert answer.reason == "MALFORMED_REQUEST"
    assert answer.status.message == f"The request body is not a valid {message_type} protobuf message."
    for leak in ("DecodeError", "class", "Unexpected", "Traceback"):
        assert leak not in answer.headers["grpc-message"]
    # Envoy's access log line is the only one about the request: the service writes none, and no
    # traceback or ERROR line at all.
    request_id = answer.headers["x-request-id"]
    assert len(log_lines_about(deployment, request_id)) <= 1, log_lines_about(deployment, request_id)
    output = deployment.process.output()
    assert "Traceback" not in output
    assert "DecodeError" not in output
    assert not [line for line in output.splitlines() if '"level": "error"' in line]


def test_the_reported_malformed_login_is_invalid_argument_without_a_traceback(parley: Deployment) -> None:
    # The body of `printf '\0\0\0\0\2\n\377' | curl --http2-prior-knowledge -X POST .../Login`.
    answer = curl_grpc(parley, LOGIN, b"\0\0\0\0\2\n\377")
    assert_refused_as_malformed(parley, answer, "parley.auth.v1.LoginRequest")


def test_the_finding_command_runs_as_written(parley: Deployment, tmp_path: Path) -> None:
    """The finding's exact shell pipeline, printf and all, through a real shell."""
    script = tmp_path / "probe.sh"
    script.write_text(
        "printf '\\0\\0\\0\\0\\2\\n\\377' | curl -sS -i --http2-prior-knowledge -X POST "
        f"127.0.0.1:{parley.ports.http}/parley.auth.v1.AuthService/Login "
        "-H 'content-type: application/grpc' -H 'te: trailers' --data-binary @-\n"
    )
    done = subprocess.run(["sh", str(script)], capture_output=True, timeout=30, check=False)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, done.stderr
    assert "grpc-status: 3" in output
    assert "grpc-status: 2" not in output  # UNKNOWN, what the finding saw
    assert "DecodeError" not in output


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\n\x05ab", id="truncated body"),
        pytest.param(b"\x0f\x00", id="wire type 7"),
        pytest.param(b"\x0e\x00", id="wire type 6"),
        pytest.param(b"\x12\x03\xff\xfe\xfd", id="bad utf-8"),
    ],
)
def test_other_malformed_bodies_are_invalid_argument_too(parley: Deployment, body: bytes) -> None:
    answer = curl_grpc(parley, LOGIN, grpc_frame(body))
    assert_refused_as_malformed(parley, answer, "parley.auth.v1.LoginRequest")


def test_a_malformed_body_on_a_server_streaming_rpc_is_invalid_argument(
    parley: Deployment, access_token: str
) -> None:
    answer = curl_grpc(parley, STREAM_MESSAGE, grpc_frame(b"\n\xff"), f"authorization: Bearer {access_token}")
    assert_refused_as_malformed(parley, answer, "parley.chat.v2.StreamMessageRequest")


def test_a_well_formed_body_over_curl_still_reaches_the_service(parley: Deployment) -> None:
    body = auth_pb2.LoginRequest(email="nobody@example.com", password=PASSWORD).SerializeToString()
    answer = curl_grpc(parley, LOGIN, grpc_frame(body))
    assert answer.headers["grpc-status"] == "16"
    assert answer.reason == "INVALID_CREDENTIALS"


# --- REQUIRED fields --------------------------------------------------------------------------------


def field_violations(response: httpx.Response) -> list[tuple[str, str]]:
    """The BadRequest of a 400 JSON error body, as (field, reason) pairs."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["code"] == 3
    info = next(detail for detail in body["details"] if detail["@type"].endswith("google.rpc.ErrorInfo"))
    assert info["reason"] == "INVALID_ARGUMENT"
    bad_request = next(
        detail for detail in body["details"] if detail["@type"].endswith("google.rpc.BadRequest")
    )
    return [(violation["field"], violation["reason"]) for violation in bad_request["field_violations"]]


def test_the_reported_empty_forgot_password_is_refused(http: httpx.Client) -> None:
    response = http.post("/v1/auth/forgot-password", json={})
    assert field_violations(response) == [("email", "REQUIRED_FIELD")]

    accepted = http.post("/v1/auth/forgot-password", json={"email": "nobody@example.com"})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"accepted": True}


def test_required_fields_are_enforced_on_json_routes(http: httpx.Client, access_token: str) -> None:
    bearer = {"authorization": f"Bearer {access_token}"}
    assert field_violations(http.post("/v1/auth/register", json={})) == [
        ("email", "REQUIRED_FIELD"),
        ("password", "REQUIRED_FIELD"),
        ("display_name", "REQUIRED_FIELD"),
    ]
    assert field_violations(http.post("/v1/auth/login", json={"email": "ada@example.com"})) == [
        ("password", "REQUIRED_FIELD")
    ]
    assert field_violations(http.post("/v1/users/me/api-keys", json={"scopes": []}, headers=bearer)) == [
        ("name", "REQUIRED_FIELD")
    ]
    # Server streaming over JSON: refused before the stream starts, as a plain JSON error.
    assert field_violations(http.post("/v2/conversations/c1/messages:stream", json={}, headers=bearer)) == [
        ("parts", "REQUIRED_FIELD")
    ]

    created = http.post("/v1/users/me/api-keys", json={"name": "ci"}, headers=bearer)
    assert created.status_code == 200, created.text
    assert created.json()["secret"].startswith("pk_")
    renamed = http.patch("/v1/users/me", json={"display_name": "Eve L."}, headers=bearer)
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["user"]["display_name"] == "Eve L."


def grpc_violations(call: Any) -> list[tuple[str, str]]:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    error = refused.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = details_of(status)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    return [(violation.field, violation.reason) for violation in bad_request.field_violations]


def test_required_fields_are_enforced_over_grpc_through_the_gateway(
    channel: grpc.Channel, access_token: str
) -> None:
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    assert grpc_violations(lambda: auth.ForgotPassword(auth_pb2.ForgotPasswordRequest())) == [
        ("email", "REQUIRED_FIELD")
    ]
    assert grpc_violations(lambda: auth.Login(auth_pb2.LoginRequest(password=PASSWORD))) == [
        ("email", "REQUIRED_FIELD")
    ]
    accepted = auth.ForgotPassword(auth_pb2.ForgotPasswordRequest(email="nobody@example.com"))
    assert accepted.accepted

    # Over JSON the transcoder always sets the body field; a gRPC client can leave the resource out.
    metadata = (("authorization", f"Bearer {access_token}"),)
    assert grpc_violations(
        lambda: auth.UpdateCurrentUser(auth_pb2.UpdateCurrentUserRequest(), metadata=metadata)
    ) == [("user", "REQUIRED_FIELD")]

    chat = chat_v2_pb2_grpc.ChatServiceStub(channel)
    assert grpc_violations(
        lambda: list(
            chat.StreamMessage(chat_v2_pb2.StreamMessageRequest(conversation_id="c1"), metadata=metadata)
        )
    ) == [("parts", "REQUIRED_FIELD")]


def test_the_log_stays_clean_of_tracebacks(parley: Deployment) -> None:
    # Runs last in this module: nothing any test above sent may have written a traceback.
    output = parley.process.output()
    assert "Traceback" not in output
    assert not [line for line in output.splitlines() if '"level": "error"' in line]
